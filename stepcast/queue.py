"""The work queue: arq on Redis, a thin dispatcher behind Postgres.

The arq job id is the stepcast job id, so enqueueing twice is harmless: arq
refuses a ``_job_id`` that is already queued.

arq workers poll their queue (every ``poll_delay_s``); an enqueue also
publishes on the queue's wake channel, so an idle worker starts the job within
milliseconds rather than at its next poll. A wake-up lost in a reconnect costs
one poll interval, nothing more.
"""

from __future__ import annotations

import socket
import uuid
from datetime import datetime, timedelta

from arq.connections import ArqRedis
from redis.asyncio import ConnectionPool

TASK_NAME = "run_job"
# How long arq keeps a job key; Postgres and the recovery pass outlive it.
ARQ_EXPIRY = timedelta(days=1)
KEEPALIVE = {socket.TCP_KEEPIDLE: 30, socket.TCP_KEEPINTVL: 10, socket.TCP_KEEPCNT: 3}


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
    """Queue the job; False if arq already holds it.

    arq orders its queue by score, the enqueue time by default; ``place`` (a
    job's creation time) puts a job enqueued again back where it was, ahead of
    the jobs that came after it, rather than at the end.
    """
    job = await arq.enqueue_job(
        TASK_NAME,
        str(job_id),
        _job_id=str(job_id),
        _queue_name=queue_name,
        _defer_until=place,
        _expires=ARQ_EXPIRY if place is not None else None,
    )
    if job is None:
        return False
    await arq.publish(wake_channel(queue_name), b"")
    return True
