"""The work queue: arq on Redis, a thin dispatcher behind Postgres.

The arq job id is the stepcast job id, so enqueueing twice is harmless: a
``_job_id`` that is already queued is refused, as arq's own enqueue does.

arq workers poll their queue (every ``poll_delay_s``); an enqueue also
publishes the job id on the queue's wake channel, so an idle worker takes the
job at once rather than at its next poll. A wake-up lost in a reconnect costs
one poll interval, nothing more.

The enqueue is arq's (the same job key, serialized job, queue entry and
refusal of a known id) in one script: one round trip on the submit path
instead of arq's four (watch, exists, the transaction, then the wake-up).
A worker's :func:`take` is arq's too (a job is its worker's while its
in-progress key lives), also in one script: it scans the head of the queue
past the jobs other workers hold, where arq reads a page of the queue and
then spends four round trips on each job in it, held or not.
"""

from __future__ import annotations

import socket
import uuid
from datetime import datetime, timedelta

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix
from arq.jobs import Serializer, serialize_job
from arq.utils import timestamp_ms, to_unix_ms
from redis.asyncio import ConnectionPool
from redis.asyncio.client import Pipeline

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
# key prefix, most entries to look at. Returns {id, score, id, score, ...}.
# The in-progress keys are not in KEYS: like arq, this needs one Redis, not a cluster.
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
            if #taken == 2 * want then return taken end
        end
    end
    seen = seen + #page / 2
end
return taken
"""
# Jobs held by workers stay at the head of the queue until they finish: a take
# looks past this many (each worker holds at most 4 × its batch size).
TAKE_SCAN_LIMIT = 10_000


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
    return ArqRedis(pool)


async def enqueue(
    arq: ArqRedis, job_id: uuid.UUID, queue_name: str, *, place: datetime | None = None
) -> bool:
    """Queue the job and wake the idle workers; False if arq already holds it.

    arq orders its queue by score, the enqueue time by default; ``place`` (a
    job's creation time) puts a job enqueued again back where it was, ahead of
    the jobs that came after it, rather than at the end.
    """
    keys, args = _enqueue_call(job_id, queue_name, place, arq.job_serializer)
    added = await arq.register_script(_ENQUEUE)(keys=keys, args=args)
    return bool(added)


def enqueue_in(pipe: Pipeline, arq: ArqRedis, job_id: uuid.UUID, queue_name: str) -> None:
    """:func:`enqueue` queued on ``pipe`` (one of ``arq``'s), to share its round trip (whether
    it was added comes back from ``pipe.execute()``). The script's text goes along."""
    keys, args = _enqueue_call(job_id, queue_name, None, arq.job_serializer)
    pipe.execute_command("EVAL", _ENQUEUE, len(keys), *keys, *args)


def _enqueue_call(
    job_id: uuid.UUID, queue_name: str, place: datetime | None, serializer: Serializer | None
) -> tuple[list[str], list[bytes | str | int]]:
    now_ms = timestamp_ms()
    key = str(job_id)
    job = serialize_job(TASK_NAME, (key,), {}, None, now_ms, serializer=serializer)
    score = to_unix_ms(place) if place is not None else now_ms
    expiry_ms = int(ARQ_EXPIRY.total_seconds() * 1000)
    keys = [job_key_prefix + key, result_key_prefix + key, queue_name]
    return keys, [job, expiry_ms, score, key, wake_channel(queue_name)]


async def take(arq: ArqRedis, queue_name: str, count: int, *, lease_s: float) -> list[tuple[str, int]]:
    """Up to ``count`` due jobs, oldest first, that no worker holds: now this worker's
    for ``lease_s`` (arq's in-progress key; renew it while working). (job id, score) each."""
    script = arq.register_script(_TAKE)
    args: list[str | int] = [
        timestamp_ms(),
        int(lease_s * 1000),
        count,
        in_progress_key_prefix,
        TAKE_SCAN_LIMIT,
    ]
    flat = await script(keys=[queue_name], args=args)
    return [(flat[i].decode(), int(float(flat[i + 1]))) for i in range(0, len(flat), 2)]
