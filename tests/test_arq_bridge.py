"""What stepcast relies on in arq, checked: the pinned version, the source of every arq
function stepcast.arq_bridge mirrors or leans on, the private methods it overrides and the
attributes it touches; and, against a real Redis, that arq's own enqueue, reader and worker
agree with the queue's scripts on the layout.

A failure here after an arq upgrade names what moved and what to re-check in the bridge."""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.metadata
import inspect
import signal
import tomllib
import uuid
from collections.abc import Callable
from pathlib import Path
from signal import Signals
from typing import Any

import arq
import pytest
from arq import func
from arq.connections import RedisSettings
from arq.constants import (
    expires_extra_ms,
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)
from arq.jobs import Job, JobStatus, deserialize_job_raw
from arq.worker import Worker

from gpu_worker.worker import GpuWorker
from stepcast import arq_bridge, queue
from stepcast.arq_bridge import ArqWorker
from stepcast.params import Preview
from tests.conftest import eventually, fox_params

ROOT = Path(__file__).resolve().parent.parent
QUEUE = "stepcast:test-queue"


def resolve(name: str) -> Any:
    """The object a dotted name names: the longest importable module, then attributes."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            found = getattr(found, part)
        return found
    raise LookupError(name)


def source_hash(name: str) -> str:
    return hashlib.sha256(inspect.getsource(resolve(name)).encode()).hexdigest()[:16]


def test_the_installed_arq_is_the_pinned_one() -> None:
    pinned = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"arq=={arq_bridge.ARQ_VERSION}" in pinned, "pyproject.toml must pin arq to ARQ_VERSION exactly"
    installed = importlib.metadata.version("arq")
    assert installed == arq.VERSION == arq_bridge.ARQ_VERSION, (
        f"arq {installed} is installed, stepcast.arq_bridge is written for {arq_bridge.ARQ_VERSION}: "
        "re-check every entry of RELIED_ON, then move the pin"
    )


@pytest.mark.parametrize("name", sorted(arq_bridge.RELIED_ON))
def test_the_arq_source_we_rely_on_is_unchanged(name: str) -> None:
    recorded, recheck = arq_bridge.RELIED_ON[name]
    now = source_hash(name)
    assert now == recorded, (
        f"arq's {name} is not the one stepcast.arq_bridge was written against (its source hashes to "
        f"{now}, not {recorded}): re-check {recheck}; then record {now} in RELIED_ON"
    )


@pytest.mark.parametrize("name", sorted(arq_bridge.OVERRIDDEN))
def test_the_arq_methods_we_override_exist_with_the_parameters_we_expect(name: str) -> None:
    assert hasattr(Worker, name), f"arq's Worker has no {name} any more: ArqWorker's override is never called"
    parameters = tuple(inspect.signature(getattr(Worker, name)).parameters)
    assert parameters == arq_bridge.OVERRIDDEN[name], (
        f"arq's Worker.{name} now takes {parameters}: re-check ArqWorker.{name} and what it routes to"
    )


def overrides(cls: type) -> set[str]:
    """The names ``cls`` defines that arq's Worker has too (dunders aside)."""
    return {name for name in vars(cls) if hasattr(Worker, name) and not name.startswith("__")}


def test_only_the_bridge_overrides_arqs_worker() -> None:
    """A name of ours that arq's Worker also has would replace arq's (or be replaced) unseen."""
    unlisted = overrides(ArqWorker) ^ set(arq_bridge.OVERRIDDEN)
    assert not unlisted, f"ArqWorker's overrides and OVERRIDDEN differ in {unlisted}"
    assert overrides(GpuWorker) == set(), (
        "the worker overrides arq's Worker directly: route the hook through stepcast.arq_bridge"
    )


async def noop(ctx: dict[str, Any]) -> None:
    pass


async def test_a_worker_has_the_attributes_the_bridge_touches() -> None:
    worker = Worker(functions=[func(noop, name="noop")], queue_name=QUEUE, handle_signals=False, max_jobs=3)
    missing = [name for name in arq_bridge.ATTRIBUTES if not hasattr(worker, name)]
    assert not missing, f"arq's Worker no longer has {missing}: re-check ArqWorker"
    assert isinstance(worker.sem, asyncio.BoundedSemaphore) and worker.job_counter == 0
    assert worker.tasks == {} and worker.allow_pick_jobs is True and worker.max_jobs == 3
    assert worker._pool is None and worker._handle_signals is False
    assert worker.health_check_key == arq_bridge.health_check_key(QUEUE)


async def test_the_layout_is_arqs() -> None:
    job_id = str(uuid.uuid4())
    assert arq_bridge.job_key(job_id) == job_key_prefix + job_id
    assert arq_bridge.in_progress_key(job_id) == in_progress_key_prefix + job_id
    assert arq_bridge.result_key(job_id) == result_key_prefix + job_id
    prefixes = (job_key_prefix, result_key_prefix, in_progress_key_prefix, retry_key_prefix)
    assert arq_bridge.run_keys(job_id) == tuple(prefix + job_id for prefix in prefixes)
    assert expires_extra_ms == arq_bridge.JOB_EXPIRY_MS
    raw = arq_bridge.encode_job(queue.TASK_NAME, (job_id,), {"params": {"steps": 2}}, 1234)
    assert deserialize_job_raw(raw, deserializer=arq_bridge.deserialize) == (
        queue.TASK_NAME,
        [job_id],
        {"params": {"steps": 2}},
        None,
        1234,
    )
    redis = queue.connect("redis://127.0.0.1:1")  # a lazy pool: nothing connects
    assert redis.job_serializer is arq_bridge.serialize and redis.job_deserializer is arq_bridge.deserialize
    await redis.aclose(close_connection_pool=True)


async def test_arq_installs_its_signal_handlers_through_ours() -> None:
    installed: list[tuple[Signals, str]] = []
    stopped: list[str] = []

    class Recording(ArqWorker):
        def install_signal_handler(self, signum: Signals, handler: Callable[[Signals], None]) -> None:
            installed.append((signum, handler.__name__))

        def stopping(self) -> None:
            stopped.append("stopping")

    worker = Recording(functions=[func(noop, name="noop")], handle_signals=True, job_completion_wait=1)
    grace = "handle_sig_wait_for_completion"
    assert installed == [(signal.SIGINT, grace), (signal.SIGTERM, grace)]
    worker.handle_sig(signal.SIGTERM)
    assert stopped == ["stopping"]


async def test_arqs_loop_and_close_reach_our_hooks(redis_url: str) -> None:
    seen: list[Any] = []

    async def probe(ctx: dict[str, Any], number: int) -> None:
        seen.append(("ran", number, "redis" in ctx))

    class Probe(ArqWorker):
        started = False

        async def poll_once(self) -> None:
            if self.taking_jobs and not self.started:
                self.started = True
                await self.start_job_task("probe", self.call_function("probe", 7))
                seen.append(("in hand", self.jobs_in_hand, self.held_job_ids()))
            await self.end_poll()
            await asyncio.sleep(0.01)

        def job_task_ended(self) -> None:
            seen.append(("ended", self.jobs_in_hand))

        def stopping(self) -> None:
            seen.append("stopping")

        async def before_pool_closes(self) -> None:
            seen.append("closing")

    worker = Probe(
        functions=[func(probe, name="probe")],
        redis_settings=RedisSettings.from_dsn(redis_url),
        handle_signals=False,
        poll_delay=0,
    )
    running = asyncio.create_task(worker.async_run())

    async def ended() -> bool:
        return ("ended", 0) in seen and not worker.held_job_ids()

    await eventually(ended, timeout_s=10)
    await worker.close()
    await asyncio.gather(running, return_exceptions=True)
    assert seen == [("in hand", 1, ["probe"]), ("ran", 7, True), ("ended", 0), "stopping", "closing"]


async def test_a_job_arq_enqueues_is_taken_by_our_queue_and_arq_sees_our_hold(redis_url: str) -> None:
    redis = queue.connect(redis_url)
    try:
        job_id = str(uuid.uuid4())
        ticket = queue.Ticket(fox_params(steps=2), Preview(every=2, max_px=64))
        job = await redis.enqueue_job(
            queue.TASK_NAME, job_id, _job_id=job_id, _queue_name=QUEUE, **ticket.to_json()
        )
        assert job is not None and await job.status() == JobStatus.queued
        assert not await queue.enqueue(redis, uuid.UUID(job_id), QUEUE)  # arq's refusal of a known id

        consumer = queue.Consumer(redis, QUEUE, lease_s=5)
        [taken] = await consumer.take(5)
        assert (taken.job_id, taken.ticket) == (job_id, ticket)
        assert await job.status() == JobStatus.in_progress  # arq reads our hold as its own

        await consumer.done(job_id)
        assert await job.status() == JobStatus.not_found
        assert not await redis.exists(*arq_bridge.run_keys(job_id))
    finally:
        await redis.aclose(close_connection_pool=True)


async def test_a_job_our_queue_enqueues_is_read_and_run_by_arq(redis_url: str) -> None:
    redis = queue.connect(redis_url)
    try:
        job_id = uuid.uuid4()
        ticket = queue.Ticket(fox_params(steps=2), None)
        assert await queue.enqueue(redis, job_id, QUEUE, ticket=ticket)
        job = Job(str(job_id), redis, _queue_name=QUEUE, _deserializer=redis.job_deserializer)
        assert await job.status() == JobStatus.queued
        info = await job.info()
        assert info is not None
        assert (info.function, info.args, info.kwargs) == (
            queue.TASK_NAME,
            [str(job_id)],
            {"params": ticket.params.to_json(), "preview": None},
        )
        # Kept as long as arq keeps a job it enqueues itself.
        expiry_ms = await redis.pttl(arq_bridge.job_key(str(job_id)))
        assert expires_extra_ms - 60_000 < expiry_ms <= expires_extra_ms
        assert await redis.enqueue_job(queue.TASK_NAME, _job_id=str(job_id), _queue_name=QUEUE) is None

        ran: list[tuple[str, dict[str, Any]]] = []

        async def run_job(ctx: dict[str, Any], job_id: str, **kwargs: Any) -> None:
            ran.append((job_id, kwargs))

        worker = Worker(
            functions=[func(run_job, name=queue.TASK_NAME)],
            redis_pool=redis,
            queue_name=QUEUE,
            burst=True,
            poll_delay=0.05,
            handle_signals=False,
            keep_result=0,
            job_serializer=arq_bridge.serialize,
            job_deserializer=arq_bridge.deserialize,
        )
        await asyncio.wait_for(worker.async_run(), 10)  # arq's own take, read and finish
        assert ran == [(str(job_id), ticket.to_json())]
        assert await redis.zcard(QUEUE) == 0 and await job.status() == JobStatus.not_found
    finally:
        await redis.aclose(close_connection_pool=True)
