"""Every change of a job's state goes through here: a seq, the fenced write, the event.

A state change (``requeued``, the terminal events) is written to Postgres first, with a seq
reserved before the write, and emitted after; ``queued``, ``started`` and ``progress`` are only
emitted. Each emit names the attempt it speaks for (:class:`Speaker`); seqs come in blocks from
Postgres whenever Redis has none for the job. Why: docs/events.md.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from stepcast.db import TRANSIENT_ERRORS, Database, retrying
from stepcast.events import (
    BEHIND,
    FENCED,
    NEED_BLOCK,
    Block,
    Event,
    EventLog,
    Queued,
    Requeued,
    Terminal,
)
from stepcast.jobs import Job
from stepcast.status import Status

logger = logging.getLogger(__name__)

T = TypeVar("T")

SEQ_BLOCK = 1024  # seqs reserved in Postgres at a time (a new job's first block: stepcast/migrations)
TERMINAL_TRIES = 6  # about 6 s of back-off for a Redis blip at the end of a job
RESTAMPS = 3  # times a terminal event whose seq the log has passed takes a later one


@dataclass(frozen=True)
class Speaker:
    """Who emits for a job: the attempt its events speak for, and whether that is a worker
    running it (whose blocks Postgres grants only while it holds the job)."""

    attempt: int
    worker: bool = False

    @classmethod
    def waiting(cls, job: Job) -> Speaker:
        """The server or the recovery pass, for a job that waits (or is taken from a worker)."""
        return cls(job.attempt + 1)

    @classmethod
    def running(cls, job: Job) -> Speaker:
        return cls(job.attempt, worker=True)


def last_published(answers: list[int]) -> int | None:
    """The seq of the last event published, from what the log answered for each."""
    return max((answer for answer in answers if answer > 0), default=None)


def _first_of(job: Job) -> tuple[int, Block]:
    """A new job's first event: the attempt it speaks for (the one the job will run as), and
    the block of seqs its insert reserved."""
    return Speaker.waiting(job).attempt, Block(1, job.seq_ceiling)


class Lifecycle:
    def __init__(self, db: Database, events: EventLog, *, db_retry_s: float = 0.0) -> None:
        self.db = db
        self.events = events
        self.db_retry_s = db_retry_s

    def announce_in(self, pipe: Pipeline, job: Job, event: Queued) -> None:
        """A new job's ``queued``, on ``pipe`` (its enqueue shares the round trip), with the
        seqs its insert reserved (the schema: stepcast/migrations): offered to Redis this once."""
        attempt, block = _first_of(job)
        self.events.emit_in(pipe, str(job.id), job.owner, event, attempt=attempt, block=block)

    async def announce(self, job: Job, event: Queued) -> None:
        """:meth:`announce_in` on its own (the event plane is not the queue's Redis)."""
        attempt, block = _first_of(job)
        await self.events.emit(str(job.id), job.owner, event, attempt=attempt, block=block)

    async def emit(
        self,
        job_id: uuid.UUID,
        owner: str,
        event: Event,
        speaker: Speaker,
        *,
        position_update: bool = False,
        tries: int = 1,
    ) -> int | None:
        """Emit an event with the next seq; that seq, or None if it was not published (fenced,
        nothing new, or Redis unreachable ``tries`` times: a watcher gets a snapshot)."""
        answers = await self._emit(job_id, owner, [event], speaker, 0, position_update, tries)
        return last_published(answers)

    async def emit_all(
        self, job_id: uuid.UUID, owner: str, events: Sequence[Event], speaker: Speaker
    ) -> list[int]:
        """:meth:`emit` for each of ``events``, in this order and one round trip (two when the
        job needs a fresh block of seqs on the way); what the log answered for each (its seq,
        or a code such as :data:`~stepcast.events.FENCED`), nothing if Redis was unreachable."""
        return await self._emit(job_id, owner, events, speaker, 0, False, 1)

    async def _emit(
        self,
        job_id: uuid.UUID,
        owner: str,
        events: Sequence[Event],
        speaker: Speaker,
        seq: int,
        position_update: bool,
        tries: int,
    ) -> list[int]:
        """What the log answered for each event (a seq or one of its codes), in order; nothing
        if Redis was unreachable. ``seq``: a reserved one (of a single event), or 0 for the next."""
        key = str(job_id)
        for attempt in range(tries):
            try:
                answers = await self.events.emit_all(
                    key, owner, events, attempt=speaker.attempt, seq=seq, position_update=position_update
                )
                if NEED_BLOCK in answers and not position_update:
                    # The counter's block ran out (or Redis lost it): those events go again, in
                    # order, with a fresh block. Only those: another emitter may have given the
                    # counter a block between two of ours, and what went out must not repeat.
                    again = [index for index, answer in enumerate(answers) if answer == NEED_BLOCK]
                    try:
                        fresh = await self._block(job_id, speaker)
                    except TRANSIENT_ERRORS:  # Postgres away too: not published, a snapshot later
                        kind = events[again[0]].type
                        logger.warning("no seqs for %s: Postgres unreachable", kind, extra={"job_id": key})
                        return answers
                    if fresh is None:
                        return answers
                    retried = await self.events.emit_all(
                        key, owner, [events[i] for i in again], attempt=speaker.attempt, seq=seq, block=fresh
                    )
                    for index, answer in zip(again, retried, strict=True):
                        answers[index] = answer
            except RedisError:
                kinds = ", ".join(sorted({event.type for event in events}))
                logger.warning("could not publish %s", kinds, extra={"job_id": key}, exc_info=True)
                if attempt + 1 < tries:
                    await asyncio.sleep(0.1 * 2**attempt)
                continue
            fenced = [event.type for event, answer in zip(events, answers, strict=True) if answer == FENCED]
            if fenced:
                logger.info(
                    "%s not published: a newer attempt or the end came first",
                    ", ".join(fenced),
                    extra={"job_id": key},
                )
            return answers
        return []

    async def reserve(self, job_id: uuid.UUID, speaker: Speaker) -> int | None:
        """A seq for an event recorded in Postgres before it is emitted; None if the job has
        moved past ``speaker``. Without Redis, the first seq of a fresh block from Postgres."""
        key = str(job_id)
        try:
            seq = await self.events.reserve(key, attempt=speaker.attempt)
            if seq == NEED_BLOCK:
                block = await self._block(job_id, speaker)
                if block is None:
                    return None
                seq = await self.events.reserve(key, attempt=speaker.attempt, block=block)
            if seq == FENCED:
                return None
            if seq > 0:
                return seq
        except RedisError:
            logger.warning(
                "could not reserve a seq in Redis; taking one from Postgres", extra={"job_id": key}
            )
        block = await self._block(job_id, speaker)
        return None if block is None else block.lo

    async def _block(self, job_id: uuid.UUID, speaker: Speaker) -> Block | None:
        fence = speaker.attempt if speaker.worker else None
        hi = await self._retrying(
            "reserve seqs", lambda: self.db.seqs.reserve(job_id, SEQ_BLOCK, attempt=fence)
        )
        return None if hi is None else Block.ending_at(hi, SEQ_BLOCK)

    async def finish(
        self,
        job: Job,
        status: Status,
        speaker: Speaker,
        write: Callable[[int], Awaitable[Job | None]],
        event: Terminal | Callable[[Job], Awaitable[Terminal]],
        *,
        seq: int | None = None,
    ) -> Job | None:
        """Record a terminal state (``write`` with the reserved seq, fenced), then emit it with
        that seq. The job's row as written, or None if the job had moved on. ``event``: the
        event, or how to make it from the row (a completed job's timings)."""
        log = {"job_id": str(job.id), "attempt": job.attempt}
        if seq is None:
            seq = await self.reserve(job.id, speaker)
        if seq is None:
            logger.warning("%s not recorded: the job moved on", status.value, extra=log)
            return None
        reserved = seq
        done = await self._written(status.value, lambda: write(reserved))
        if done is None:
            # The write (or a retry of it) may have committed with its reply lost: the seq
            # is ours alone, so a row that has it is our write.
            current = await self._retrying("read back", lambda: self.db.jobs.get(job.id))
            if current is None or current.last_seq != reserved or current.status is not status:
                logger.warning("%s not recorded: the job moved on", status.value, extra=log)
                return None
            done = current
        emitted = event if isinstance(event, Event) else await event(done)
        for _ in range(RESTAMPS):
            answers = await self._emit(job.id, job.owner, [emitted], speaker, seq, False, TERMINAL_TRIES)
            if answers != [BEHIND]:
                break
            # Events came after the seq was reserved (the write waited long): a later seq,
            # recorded in place of the first (fenced by it), so that the log does not end
            # below what watchers have already seen.
            later = await self._restamp(job, speaker, seq)
            if later is None:
                break
            seq = later
        return done

    async def _restamp(self, job: Job, speaker: Speaker, seq: int) -> int | None:
        # The job is terminal: a block for it is no worker's to fence.
        later = await self.reserve(job.id, Speaker(speaker.attempt))
        if later is None:
            return None
        moved = await self._retrying("restamp", lambda: self.db.seqs.restamp(job.id, seq, later))
        return later if moved else None

    async def requeue(
        self, job: Job, reason: str, write: Callable[[], Awaitable[Job | None]], *, resume_step: int = 0
    ) -> Job | None:
        """Back to the queue (``write``, fenced), then ``requeued``, saying where the next attempt
        continues: from then on Redis refuses the events (and checkpoints) of the attempt that
        let it go."""
        done = await self._written("requeue", write)
        if done is None:  # its reply may have been lost: is the job back in the queue, as we left it?
            current = await self._retrying("read back", lambda: self.db.jobs.get(job.id))
            if current is not None and (current.status, current.attempt) == (Status.PENDING, job.attempt):
                done = current
        if done is not None:
            event = Requeued(attempt=job.attempt + 1, reason=reason, resumed_from_step=resume_step)
            await self.emit(job.id, job.owner, event, Speaker(job.attempt + 1), tries=TERMINAL_TRIES)
        return done

    async def _written(self, what: str, write: Callable[[], Awaitable[Job | None]]) -> Job | None:
        """The row ``write`` returned; None if it matched nothing or Postgres went away before
        it answered (then the caller reads the row back to learn which)."""
        try:
            return await self._retrying(what, write)
        except TRANSIENT_ERRORS:
            logger.warning("%s: no answer from Postgres; reading the job back", what, exc_info=True)
            return None

    async def _retrying(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        if self.db_retry_s <= 0:
            return await operation()
        return await retrying(operation, what=what, deadline_s=self.db_retry_s)
