"""A job the worker claimed, as the parts that run it share it: the dispatcher (its pipeline call),
the execution (its events, lease and outcome) and the step publisher (its progress)."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from gpu_worker.checkpoints import Snapshot
from gpu_worker.mailbox import Mailbox
from gpu_worker.pipeline import Generation
from stepcast.jobs import Job
from stepcast.params import JobParams

Outcome = Generation | Exception


class Step(NamedTuple):
    """A step the pipeline thread reports: its preview's pixels if it has one, when it ended,
    and the job's state then if a checkpoint is due. A quiet one (the step a stopped job
    ended on) is not published: only its checkpoint is kept."""

    step: int
    pixels: Any
    done_at: float  # perf_counter
    snapshot: Snapshot | None = None
    quiet: bool = False


@dataclass
class Claimed:
    """A claimed job; shared with the dispatcher, the heartbeat and the cancel listener."""

    job: Job
    params: JobParams
    last_seq: int
    stop: threading.Event  # its Waiting's
    steps: Mailbox[Step]  # its Waiting's
    batch: list[Claimed] = field(default_factory=list)
    outcome: asyncio.Future[Outcome] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    pipeline_s: float | None = None
    # When its pipeline call began (perf_counter), which may be before its claim returned.
    pipeline_started: float = field(default_factory=time.perf_counter)
    step: int = 0
    resumed_from: int = 0  # the step its checkpoint held (0: from the start)
    checkpoint_step: int = 0  # the step of the newest checkpoint saved
    handed_back: Job | None = None  # its row, back in the queue (shutdown)
    stop_reason: str | None = None
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.step = self.checkpoint_step = self.resumed_from

    def halt(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self.stop.set()
        self.stopped.set()

    def batch_stops(self) -> bool:
        """Whether the pipeline stops at the next step: nobody in the batch still wants it."""
        return all(mate.stop.is_set() for mate in self.batch)
