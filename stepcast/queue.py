"""The work queue: arq on Redis, a thin dispatcher behind Postgres.

The arq job id is the stepcast job id, so enqueueing twice is harmless: arq
refuses a ``_job_id`` that is already queued.
"""

from __future__ import annotations

import uuid

from arq.connections import ArqRedis
from redis.asyncio import ConnectionPool

TASK_NAME = "run_job"


def connect(redis_url: str) -> ArqRedis:
    """A lazy pool: a server starts (and reports not ready) while Redis is down."""
    return ArqRedis(ConnectionPool.from_url(redis_url, socket_connect_timeout=2, health_check_interval=30))


async def enqueue(arq: ArqRedis, job_id: uuid.UUID, queue_name: str) -> bool:
    """Queue the job; False if arq already holds it."""
    job = await arq.enqueue_job(TASK_NAME, str(job_id), _job_id=str(job_id), _queue_name=queue_name)
    return job is not None
