"""The work queue: arq on Redis, a thin dispatcher behind Postgres.

The arq job id is the stepcast job id, so enqueueing twice is harmless: a
``_job_id`` that is already queued is refused, as arq's own enqueue does.

arq workers poll their queue (every ``poll_delay_s``); an enqueue also
publishes the job id on the queue's wake channel, so an idle worker takes that
job at once rather than at its next poll. A wake-up lost in a reconnect costs
one poll interval, nothing more.

The enqueue is arq's (the same job key, serialized job, queue entry and
refusal of a known id) in one script: one round trip on the submit path
instead of arq's four (watch, exists, the transaction, then the wake-up).
"""

from __future__ import annotations

import socket
import uuid
from datetime import datetime, timedelta

from arq.connections import ArqRedis
from arq.constants import job_key_prefix, result_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms, to_unix_ms
from redis.asyncio import ConnectionPool

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
    now_ms = timestamp_ms()
    key = str(job_id)
    job = serialize_job(TASK_NAME, (key,), {}, None, now_ms, serializer=arq.job_serializer)
    score = to_unix_ms(place) if place is not None else now_ms
    expiry_ms = int(ARQ_EXPIRY.total_seconds() * 1000)
    script = arq.register_script(_ENQUEUE)
    keys = [job_key_prefix + key, result_key_prefix + key, queue_name]
    added = await script(keys=keys, args=[job, expiry_ms, score, key, wake_channel(queue_name)])
    return bool(added)
