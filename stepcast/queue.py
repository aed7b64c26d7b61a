"""The work queue: arq's queue in Redis, a thin dispatcher behind Postgres.

The arq job id is the stepcast job id, so enqueueing twice is harmless. :func:`enqueue_in` is
arq's enqueue in one script, and wakes idle workers; :class:`Consumer` is a worker's side (take,
hold, finish) in fewer round trips than arq's; a queued job carries its :class:`Ticket`. Jobs are
JSON, never pickle (:func:`serialize`). Why each: docs/design.md, "Inside the worker".
"""

from __future__ import annotations

import logging
import socket
import uuid
from dataclasses import dataclass
from typing import Any, NamedTuple

from arq.connections import ArqRedis
from redis.asyncio import ConnectionPool
from redis.asyncio.client import Pipeline

from stepcast import arq_bridge
from stepcast.jobs import Job
from stepcast.params import JobParams, Preview
from stepcast.redis_keys import wake_channel
from stepcast.round_trips import Arg, GatheredScripts

logger = logging.getLogger(__name__)

TASK_NAME = "run_job"
KEEPALIVE = {socket.TCP_KEEPIDLE: 30, socket.TCP_KEEPINTVL: 10, socket.TCP_KEEPCNT: 3}
# Every Redis client of ours (the queue's, the event plane's): a node that is down is given up
# on in 2 s, a half-open connection (failover, NAT time-out) is found within about a minute.
CONNECTION_OPTIONS: dict[str, Any] = {
    "socket_connect_timeout": 2,
    "health_check_interval": 30,
    "socket_keepalive": True,
    "socket_keepalive_options": KEEPALIVE,
}
# Jobs held by workers stay at the head of the queue until they finish: a take
# looks past this many (each worker holds at most 4 × its batch size).
TAKE_SCAN_LIMIT = 10_000


@dataclass(frozen=True)
class Ticket:
    """What a worker needs to start a job before its claim returns: the params and preview
    settings of its row, copied when it is enqueued (they never change), and whether an
    earlier attempt left a checkpoint to resume from (the step it holds; 0: none)."""

    params: JobParams
    preview: Preview | None
    resume_from: int = 0

    @classmethod
    def of(cls, job: Job) -> Ticket:
        return cls(job.params, job.preview, job.resumed_from_step or 0)

    def to_json(self) -> dict[str, Any]:
        data = {"params": self.params.to_json(), "preview": self.preview.to_json() if self.preview else None}
        return {**data, "resume_from": self.resume_from} if self.resume_from else data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Ticket:
        """Raises TypeError, ValueError or KeyError on a ticket that is not one."""
        params, preview, resume_from = data.get("params"), data.get("preview"), data.get("resume_from", 0)
        if not isinstance(params, dict) or not isinstance(preview, dict | None):
            raise TypeError("a ticket holds params (an object) and preview (an object or null)")
        if not isinstance(resume_from, int) or isinstance(resume_from, bool) or resume_from < 0:
            raise TypeError("a ticket's resume_from is a step (an integer, 0 or more)")
        return cls(JobParams.from_json(params), Preview.from_json(preview), resume_from)


class Taken(NamedTuple):
    job_id: str
    score: float
    ticket: Ticket | None  # None for a job enqueued without one


def connect(redis_url: str) -> ArqRedis:
    """A lazy pool: a server starts (and reports not ready) while Redis is down."""
    pool = ConnectionPool.from_url(redis_url, **CONNECTION_OPTIONS)
    return ArqRedis(pool, job_serializer=arq_bridge.serialize, job_deserializer=arq_bridge.deserialize)


def place_of(job: Job) -> float:
    """The job's score in its queue: its fair tag (docs/scheduling.md), which Postgres orders
    the queue by too; a job from before fair shares, its creation time in ms (its tag since)."""
    return job.fair_tag if job.fair_tag is not None else arq_bridge.score_of(job.created_at)


async def enqueue(
    arq: ArqRedis,
    job_id: uuid.UUID,
    queue_name: str,
    *,
    place: float | None = None,
    ticket: Ticket | None = None,
    afresh: bool = False,
) -> bool:
    """Queue the job and wake the idle workers; False if arq already holds it.

    The queue runs jobs in score order (ties by id): ``place`` is the job's
    (:func:`place_of`); None, the time now in ms, as arq's own enqueue. A job
    enqueued again goes back to its place. ``afresh``: forget arq's keys of an
    earlier run first (a dead worker's, or those left when the queue lost the
    job), which would make arq refuse or delay the same id.
    """
    if afresh:
        await arq.delete(*arq_bridge.run_keys(str(job_id)))
    keys, args = _enqueue_call(job_id, queue_name, place, ticket)
    added = await arq.register_script(arq_bridge.ENQUEUE_SCRIPT)(keys=keys, args=args)
    return bool(added)


async def rescore(arq: ArqRedis, job: Job) -> None:
    """Move a queued job to its place (:func:`place_of`), if its queue holds it."""
    await arq.zadd(job.queue, {str(job.id): place_of(job)}, xx=True)


async def held(arq: ArqRedis, jobs: list[Job]) -> set[uuid.UUID]:
    """Which of these jobs their queue holds (waiting, or taken by a worker that has not
    finished with it): its own membership, not arq's job key."""
    if not jobs:
        return set()
    async with arq.pipeline(transaction=False) as pipe:
        for job in jobs:
            pipe.zscore(job.queue, str(job.id))
        scores = await pipe.execute()
    return {job.id for job, score in zip(jobs, scores, strict=True) if score is not None}


def enqueue_in(
    pipe: Pipeline,
    arq: ArqRedis,
    job_id: uuid.UUID,
    queue_name: str,
    *,
    place: float | None = None,
    ticket: Ticket | None = None,
) -> None:
    """:func:`enqueue` queued on ``pipe`` (one of ``arq``'s), to share its round trip (whether
    it was added comes back from ``pipe.execute()``). The script's text goes along."""
    keys, args = _enqueue_call(job_id, queue_name, place, ticket)
    pipe.execute_command("EVAL", arq_bridge.ENQUEUE_SCRIPT, len(keys), *keys, *args)


def _enqueue_call(
    job_id: uuid.UUID,
    queue_name: str,
    place: float | None,
    ticket: Ticket | None,
) -> tuple[list[str], list[Arg]]:
    now_ms = arq_bridge.now_ms()
    key = str(job_id)
    kwargs = ticket.to_json() if ticket is not None else {}
    job = arq_bridge.encode_job(TASK_NAME, (key,), kwargs, now_ms)
    score = place if place is not None else now_ms
    return arq_bridge.enqueue_call(queue_name, key, job, score, wake_channel(queue_name))


class Consumer:
    """A worker's side of one queue: it takes jobs, holds them for ``lease_s`` at a time
    (renew while working), and lets them go: done, off the queue; released, back to
    the next worker in their place."""

    def __init__(self, arq: ArqRedis, queue_name: str, *, lease_s: float) -> None:
        self.arq = arq
        self.queue_name = queue_name
        self.lease_ms = int(lease_s * 1000)
        self._take = arq.register_script(arq_bridge.TAKE_SCRIPT)
        self._done = arq.register_script(arq_bridge.DONE_SCRIPT)
        self._scripts = GatheredScripts(arq)  # a batch's jobs finish together: one round trip

    async def take(self, count: int) -> list[Taken]:
        """Up to ``count`` jobs no worker holds, first in the queue's order: now held by this
        one, each with its ticket."""
        keys, args = arq_bridge.take_call(
            self.queue_name, hold_ms=self.lease_ms, count=count, scan_limit=TAKE_SCAN_LIMIT
        )
        flat = await self._take(keys=keys, args=args)
        return [
            Taken(flat[i].decode(), float(flat[i + 1]), self._ticket(flat[i], flat[i + 2]))
            for i in range(0, len(flat), 3)
        ]

    def _ticket(self, job_id: bytes, serialized: bytes | None) -> Ticket | None:
        """The ticket in arq's job; None if there is none (the job is claimed first then)."""
        if serialized is None:
            return None
        try:
            kwargs = arq_bridge.job_kwargs(serialized)
            return Ticket.from_json(kwargs) if "params" in kwargs else None  # enqueued without one
        except Exception as exc:  # the row in Postgres is the truth: the claim reads it
            logger.warning("job %s: unreadable arq job or ticket (%s)", job_id.decode(), exc)
            return None

    async def renew(self, job_ids: list[str]) -> None:
        """Hold these jobs for one more lease."""
        async with self.arq.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.pexpire(arq_bridge.in_progress_key(job_id), self.lease_ms)
            await pipe.execute()

    async def done(self, job_id: str) -> None:
        """Finished with, whatever the outcome (Postgres has it): off the queue, arq's keys gone."""
        await self._scripts.call(self._done, *arq_bridge.done_call(self.queue_name, job_id))

    async def release(self, job_id: str, ticket: Ticket | None = None) -> None:
        """Not run here after all (shutdown): queued in its place, free for the next worker;
        with ``ticket``, that one in place of the one it was queued with (a job handed back
        mid-run: its checkpoint's step)."""
        async with self.arq.pipeline(transaction=True) as pipe:
            if ticket is not None:
                job = arq_bridge.encode_job(TASK_NAME, (job_id,), ticket.to_json(), arq_bridge.now_ms())
                pipe.set(arq_bridge.job_key(job_id), job, xx=True, keepttl=True)
            pipe.delete(arq_bridge.in_progress_key(job_id))
            await pipe.execute()
