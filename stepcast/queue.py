"""The work queue: arq's queue in Redis, a thin dispatcher behind Postgres.

The arq job id is the stepcast job id, so enqueueing twice is harmless. :func:`enqueue_in` is
arq's enqueue in one script, and wakes idle workers; :class:`Consumer` is a worker's side (take,
hold, finish) in fewer round trips than arq's; a queued job carries its :class:`Ticket`. Jobs are
JSON, never pickle (:func:`serialize`). Why each: docs/design.md, "Inside the worker".
"""

from __future__ import annotations

import json
import logging
import socket
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix, retry_key_prefix
from arq.jobs import deserialize_job, serialize_job
from arq.utils import timestamp_ms, to_unix_ms
from redis.asyncio import ConnectionPool
from redis.asyncio.client import Pipeline

from stepcast.jobs import Job
from stepcast.round_trips import GatheredScripts

logger = logging.getLogger(__name__)

TASK_NAME = "run_job"
# How long arq keeps a job key; Postgres and the recovery pass outlive it.
ARQ_EXPIRY = timedelta(days=1)
KEEPALIVE = {socket.TCP_KEEPIDLE: 30, socket.TCP_KEEPINTVL: 10, socket.TCP_KEEPCNT: 3}

# KEYS: job key, result key, queue. ARGV: serialized job, expiry ms, score, job id, wake channel.
_ENQUEUE = """
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then return 0 end
redis.call('PSETEX', KEYS[1], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
redis.call('PUBLISH', ARGV[5], ARGV[4])
return 1
"""


# KEYS: queue. ARGV: now (ms), in-progress lifetime (ms), how many, in-progress
# key prefix, most entries to look at, job key prefix. Returns {id, score, job,
# id, score, job, ...}, where job is arq's serialized job (false if it is gone).
# The in-progress and job keys are not in KEYS: like arq, this needs one Redis, not a cluster.
_TAKE = """
local want, limit = tonumber(ARGV[3]), tonumber(ARGV[5])
local taken, seen = {}, 0
while seen < limit do
    local page = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', seen, 100)
    if #page == 0 then break end
    for i = 1, #page, 2 do
        local key = ARGV[4] .. page[i]
        if redis.call('EXISTS', key) == 0 then
            redis.call('PSETEX', key, ARGV[2], '1')
            taken[#taken + 1] = page[i]
            taken[#taken + 1] = page[i + 1]
            taken[#taken + 1] = redis.call('GET', ARGV[6] .. page[i])
            if #taken == 3 * want then return taken end
        end
    end
    seen = seen + #page / 2
end
return taken
"""
# Jobs held by workers stay at the head of the queue until they finish: a take
# looks past this many (each worker holds at most 4 × its batch size).
TAKE_SCAN_LIMIT = 10_000

# KEYS: queue, job key, in-progress key. ARGV: job id.
_DONE = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2], KEYS[3])
return 1
"""


@dataclass(frozen=True)
class Ticket:
    """What a worker needs to start a job before its claim returns: the params and preview
    settings of its row, copied when it is enqueued (they never change)."""

    params: dict[str, Any]
    preview: dict[str, Any] | None

    @classmethod
    def of(cls, job: Job) -> Ticket:
        return cls(job.params, job.preview)


class Taken(NamedTuple):
    job_id: str
    score: int
    ticket: Ticket | None  # None for a job enqueued without one


def serialize(data: dict[str, Any]) -> bytes:
    """arq's job or result as JSON (its ``job_serializer``): data only."""
    return json.dumps(data, separators=(",", ":")).encode()


def deserialize(raw: bytes) -> dict[str, Any]:
    """arq's ``job_deserializer``: a JSON object, or an error. A pickle (arq's default
    format, which runs code as it loads) is not JSON, so it is refused, never loaded."""
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError("an arq job is a JSON object")
    return value


def wake_channel(queue_name: str) -> str:
    return f"stepcast:wake:{queue_name}"


def connect(redis_url: str) -> ArqRedis:
    """A lazy pool: a server starts (and reports not ready) while Redis is down."""
    pool = ConnectionPool.from_url(
        redis_url,
        socket_connect_timeout=2,
        health_check_interval=30,
        # A half-open connection (failover, NAT time-out) is found within about a minute.
        socket_keepalive=True,
        socket_keepalive_options=KEEPALIVE,
    )
    return ArqRedis(pool, job_serializer=serialize, job_deserializer=deserialize)


async def enqueue(
    arq: ArqRedis,
    job_id: uuid.UUID,
    queue_name: str,
    *,
    place: datetime | None = None,
    ticket: Ticket | None = None,
    afresh: bool = False,
) -> bool:
    """Queue the job and wake the idle workers; False if arq already holds it.

    arq orders its queue by score, the enqueue time by default; ``place`` (a
    job's creation time) puts a job enqueued again back where it was, ahead of
    the jobs that came after it, rather than at the end. ``afresh``: forget
    arq's keys of an earlier run first (a dead worker's, or those left when the
    queue lost the job), which would make arq refuse or delay the same id.
    """
    if afresh:
        key = str(job_id)
        prefixes = (job_key_prefix, result_key_prefix, in_progress_key_prefix, retry_key_prefix)
        await arq.delete(*(prefix + key for prefix in prefixes))
    keys, args = _enqueue_call(job_id, queue_name, place, ticket)
    added = await arq.register_script(_ENQUEUE)(keys=keys, args=args)
    return bool(added)


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
    pipe: Pipeline, arq: ArqRedis, job_id: uuid.UUID, queue_name: str, *, ticket: Ticket | None = None
) -> None:
    """:func:`enqueue` queued on ``pipe`` (one of ``arq``'s), to share its round trip (whether
    it was added comes back from ``pipe.execute()``). The script's text goes along."""
    keys, args = _enqueue_call(job_id, queue_name, None, ticket)
    pipe.execute_command("EVAL", _ENQUEUE, len(keys), *keys, *args)


def _enqueue_call(
    job_id: uuid.UUID,
    queue_name: str,
    place: datetime | None,
    ticket: Ticket | None,
) -> tuple[list[str], list[bytes | str | int]]:
    now_ms = timestamp_ms()
    key = str(job_id)
    kwargs = {"params": ticket.params, "preview": ticket.preview} if ticket is not None else {}
    job = serialize_job(TASK_NAME, (key,), kwargs, None, now_ms, serializer=serialize)
    score = to_unix_ms(place) if place is not None else now_ms
    expiry_ms = int(ARQ_EXPIRY.total_seconds() * 1000)
    keys = [job_key_prefix + key, result_key_prefix + key, queue_name]
    return keys, [job, expiry_ms, score, key, wake_channel(queue_name)]


class Consumer:
    """A worker's side of one queue: it takes jobs, holds them for ``lease_s`` at a time
    (renew while working), and lets them go: done, off the queue; released, back to
    the next worker in their place."""

    def __init__(self, arq: ArqRedis, queue_name: str, *, lease_s: float) -> None:
        self.arq = arq
        self.queue_name = queue_name
        self.lease_ms = int(lease_s * 1000)
        self._take = arq.register_script(_TAKE)
        self._done = arq.register_script(_DONE)
        self._scripts = GatheredScripts(arq)  # a batch's jobs finish together: one round trip

    async def take(self, count: int) -> list[Taken]:
        """Up to ``count`` due jobs, oldest first, that no worker holds: now held by this
        one, each with its ticket."""
        args: list[str | int] = [
            timestamp_ms(),
            self.lease_ms,
            count,
            in_progress_key_prefix,
            TAKE_SCAN_LIMIT,
            job_key_prefix,
        ]
        flat = await self._take(keys=[self.queue_name], args=args)
        return [
            Taken(flat[i].decode(), int(float(flat[i + 1])), self._ticket(flat[i], flat[i + 2]))
            for i in range(0, len(flat), 3)
        ]

    def _ticket(self, job_id: bytes, serialized: bytes | None) -> Ticket | None:
        """The ticket in arq's job; None if there is none (the job is claimed first then)."""
        if serialized is None:
            return None
        try:
            kwargs = deserialize_job(serialized, deserializer=deserialize).kwargs
        except Exception as exc:  # the row in Postgres is the truth: the claim reads it
            logger.warning("job %s: unreadable arq job (%s)", job_id.decode(), exc)
            return None
        params, preview = kwargs.get("params"), kwargs.get("preview")
        if not isinstance(params, dict) or not isinstance(preview, dict | None):
            return None
        return Ticket(params, preview)

    async def renew(self, job_ids: list[str]) -> None:
        """Hold these jobs for one more lease."""
        async with self.arq.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.pexpire(in_progress_key_prefix + job_id, self.lease_ms)
            await pipe.execute()

    async def done(self, job_id: str) -> None:
        """Finished with, whatever the outcome (Postgres has it): off the queue, arq's keys gone."""
        keys = [self.queue_name, job_key_prefix + job_id, in_progress_key_prefix + job_id]
        await self._scripts.call(self._done, keys, [job_id])

    async def release(self, job_id: str) -> None:
        """Not run here after all (shutdown): queued in its place, free for the next worker."""
        await self.arq.delete(in_progress_key_prefix + job_id)
