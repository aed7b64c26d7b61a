"""The work queue: arq on Redis, a thin dispatcher behind Postgres.

The arq job id is the stepcast job id, so enqueueing twice is harmless: arq
refuses a ``_job_id`` that is already queued.
"""

from __future__ import annotations

import socket
import uuid

from arq.connections import ArqRedis
from redis.asyncio import ConnectionPool

TASK_NAME = "run_job"
KEEPALIVE = {socket.TCP_KEEPIDLE: 30, socket.TCP_KEEPINTVL: 10, socket.TCP_KEEPCNT: 3}


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


async def enqueue(arq: ArqRedis, job_id: uuid.UUID, queue_name: str) -> bool:
    """Queue the job; False if arq already holds it."""
    job = await arq.enqueue_job(TASK_NAME, str(job_id), _job_id=str(job_id), _queue_name=queue_name)
    return job is not None
