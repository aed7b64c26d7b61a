"""The work queue in Redis: a submit announces and enqueues a job in one round trip; a
worker takes the oldest due jobs nobody holds, also in one, and lets them go: done (the
jobs of a batch together) or released to the next worker."""

from __future__ import annotations

import asyncio
import pickle
import uuid
from pathlib import Path
from typing import Any

import pytest
from arq import func
from arq.connections import RedisSettings
from arq.jobs import DeserializationError, Job

from gpu_worker.runner import Released
from gpu_worker.worker import GpuWorker
from stepcast import arq_bridge, queue
from stepcast.events import Block, EventLog, Queued
from stepcast.params import Preview
from stepcast.settings import Settings
from tests.conftest import Stack, fox_params, model_queue

QUEUE = "stepcast:test-queue"


async def test_a_take_follows_the_scores_skips_held_jobs_and_holds_what_it_takes(settings: Settings) -> None:
    redis = queue.connect(settings.redis_url)
    try:
        ids = [uuid.uuid4() for _ in range(5)]
        tags = [1_000.0, 1_000.5, 2_000.25, 9e15, 9e15 + 8]  # fair tags: virtual time, not due times
        for job_id, tag in zip(reversed(ids), reversed(tags), strict=True):  # queued last first
            assert await queue.enqueue(redis, job_id, QUEUE, place=tag)
        held = str(ids[0])  # another worker holds the first
        await redis.psetex(arq_bridge.in_progress_key(held), 60_000, b"1")

        consumer = queue.Consumer(redis, QUEUE, lease_s=5)
        first = await consumer.take(2)
        assert [taken.job_id for taken in first] == [str(ids[1]), str(ids[2])]
        assert [taken.score for taken in first] == tags[1:3]  # exactly: Postgres orders by the same
        assert [taken.ticket for taken in first] == [None, None]  # enqueued without one
        for taken in first:  # now this worker's, for one lease
            assert 4_000 < await redis.pttl(arq_bridge.in_progress_key(taken.job_id)) <= 5_000

        rest = await consumer.take(10)  # a score far past now is taken in its turn all the same
        assert [taken.job_id for taken in rest] == [str(ids[3]), str(ids[4])]
        assert await consumer.take(10) == []

        await redis.delete(arq_bridge.in_progress_key(held))  # its worker died: the hold lapsed
        assert [taken.job_id for taken in await consumer.take(10)] == [held]
    finally:
        await redis.aclose(close_connection_pool=True)


async def test_a_take_looks_past_a_long_head_of_held_jobs(settings: Settings) -> None:
    redis = queue.connect(settings.redis_url)
    try:
        ids = [uuid.uuid4() for _ in range(250)]  # more than one page of the script's scan
        for index, job_id in enumerate(ids):
            await queue.enqueue(redis, job_id, QUEUE, place=float(index))
        for job_id in ids[:-1]:
            await redis.psetex(arq_bridge.in_progress_key(str(job_id)), 60_000, b"1")
        taken = await queue.Consumer(redis, QUEUE, lease_s=5).take(4)
        assert [held.job_id for held in taken] == [str(ids[-1])]
    finally:
        await redis.aclose(close_connection_pool=True)


async def test_a_submit_announces_and_enqueues_in_one_round_trip_even_after_redis_lost_its_scripts(
    settings: Settings,
) -> None:
    redis = queue.connect(settings.redis_url)
    events = EventLog(redis, stream_max=100, ttl_s=60)
    ticket = queue.Ticket(fox_params(steps=4), Preview(every=2, max_px=64))
    try:
        job_id = uuid.uuid4()
        await redis.script_flush()  # as after a Redis restart: no script is cached
        async with redis.pipeline(transaction=False) as pipe:
            queued = Queued(position=1, eta_s=None)
            events.emit_in(pipe, str(job_id), "owner", queued, attempt=1, block=Block(1, 1024))
            queue.enqueue_in(pipe, redis, job_id, QUEUE, ticket=ticket)
            assert await pipe.execute() == [1, 1]  # the event's seq; enqueued
        assert (await events.read(str(job_id))).events == [
            {
                "type": "queued",
                "job_id": str(job_id),
                "seq": 1,
                "position": 1,
                "eta_s": None,
                "estimated_start_at": None,
            }
        ]
        [taken] = await queue.Consumer(redis, QUEUE, lease_s=5).take(1)
        assert (taken.job_id, taken.ticket) == (str(job_id), ticket)  # the job comes with its ticket
        assert not await queue.enqueue(redis, job_id, QUEUE)  # arq holds it: refused, as arq's own
    finally:
        await redis.aclose(close_connection_pool=True)


async def test_jobs_done_together_leave_the_queue_in_one_round_trip_and_a_released_one_stays(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis = queue.connect(settings.redis_url)
    try:
        ids = [uuid.uuid4() for _ in range(4)]
        for index, job_id in enumerate(ids):
            await queue.enqueue(redis, job_id, QUEUE, place=float(index))
        consumer = queue.Consumer(redis, QUEUE, lease_s=60)
        taken = [held.job_id for held in await consumer.take(4)]
        assert taken == [str(job_id) for job_id in ids]
        pipelines = 0
        pipeline = redis.pipeline

        def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal pipelines
            pipelines += 1
            return pipeline(*args, **kwargs)

        monkeypatch.setattr(redis, "pipeline", counted)
        await asyncio.gather(*(consumer.done(job_id) for job_id in taken[:3]))  # a batch finishing
        assert pipelines == 1 and await redis.zrange(QUEUE, 0, -1) == [taken[3].encode()]
        for job_id in taken[:3]:  # arq's keys are gone: the id may be enqueued again
            assert not await redis.exists(arq_bridge.job_key(job_id), arq_bridge.in_progress_key(job_id))
        assert await queue.enqueue(redis, ids[0], QUEUE)

        # Shutting down mid-run: the job goes back with a ticket that says where it resumes,
        # and the next worker takes it at once.
        handed_back = queue.Ticket(fox_params(steps=40), None, resume_from=17)
        ttl_ms = await redis.pttl(arq_bridge.job_key(taken[3]))
        await consumer.release(taken[3], handed_back)
        other = queue.Consumer(redis, QUEUE, lease_s=60)
        [again] = await other.take(1)
        assert (again.job_id, again.ticket) == (taken[3], handed_back)
        assert 0 < await redis.pttl(arq_bridge.job_key(taken[3])) <= ttl_ms  # its expiry kept
        with pytest.raises(TypeError, match="resume_from"):
            queue.Ticket.from_json({**handed_back.to_json(), "resume_from": "17"})
    finally:
        await redis.aclose(close_connection_pool=True)


async def test_a_release_in_flight_when_its_job_task_is_cancelled_ends_before_the_worker_closes(
    settings: Settings,
) -> None:
    class SlowRelease(queue.Consumer):
        async def release(self, job_id: str, ticket: queue.Ticket | None = None) -> None:
            await asyncio.sleep(0.2)  # Redis slow to answer, as on a loaded machine
            await super().release(job_id, ticket)

    async def never_claimed(ctx: dict[str, Any], job_id: str, ticket: queue.Ticket | None) -> None:
        raise Released()

    worker = GpuWorker(
        functions=[func(never_claimed, name=queue.TASK_NAME)],
        redis_settings=RedisSettings.from_dsn(settings.redis_url),
        queue_name=QUEUE,
        handle_signals=False,
        idle_poll_s=1,
        renew_s=10,
        redis_pool=queue.connect(settings.redis_url),  # what arq's main would open
    )
    worker.consumer = SlowRelease(worker.pool, QUEUE, lease_s=30)
    job_id = str(uuid.uuid4())
    await queue.enqueue(worker.pool, uuid.UUID(job_id), QUEUE)
    [taken] = await worker.consumer.take(1)
    task = await worker.start_job_task(taken.job_id, worker.run_taken(taken))
    await asyncio.sleep(0.05)  # the runner let it go: its release is on its way
    task.cancel()  # shutdown cancels the job's task meanwhile
    await worker.close()
    redis = queue.connect(settings.redis_url)
    try:
        assert await redis.zscore(QUEUE, job_id) is not None  # still queued, in its place
        assert not await redis.exists(arq_bridge.in_progress_key(job_id))  # and free at once
    finally:
        await redis.aclose(close_connection_pool=True)


class Planted:
    """A pickle that runs code as it loads: it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return Path.touch, (self.marker,)


async def test_a_pickle_planted_in_redis_is_refused_unread_and_jobs_still_run(
    stack: Stack, tmp_path: Path
) -> None:
    """Before: arq's default pickle, so a worker taking the planted job ran its code."""
    marker = tmp_path / "pwned"
    arq_job = {"t": None, "f": queue.TASK_NAME, "a": (), "k": {"params": Planted(marker)}, "et": 0}
    redis = queue.connect(stack.settings.redis_url)
    try:
        planted = str(uuid.uuid4())  # ahead of everything in the queue
        await redis.set(arq_bridge.job_key(planted), pickle.dumps(arq_job))
        await redis.zadd(model_queue(stack.settings), {planted: 1})
        job = await stack.wait((await stack.submit(steps=2))["id"])  # taken after the planted one
        assert job["status"] == "completed"
        assert await redis.zscore(model_queue(stack.settings), planted) is None  # taken and let go
        assert not marker.exists(), "the worker ran the planted pickle"
        await redis.set(arq_bridge.job_key(planted), pickle.dumps(arq_job))
        with pytest.raises(DeserializationError):  # arq's own reader, on stepcast's pool
            await Job(planted, redis, _deserializer=redis.job_deserializer).info()
    finally:
        await redis.aclose(close_connection_pool=True)
    assert not marker.exists(), "arq's reader ran the planted pickle"
