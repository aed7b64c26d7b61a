"""The event log's Lua script and the gathering of Redis calls, against a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from stepcast.batched import Pipelined
from stepcast.events import EventLog, encode
from stepcast.processes import free_port


@pytest.fixture
async def log(redis_url: str) -> AsyncIterator[EventLog]:
    redis = Redis.from_url(redis_url)
    yield EventLog(redis, stream_max=100, ttl_s=60)
    await redis.aclose()


async def kinds(log: EventLog) -> list[tuple[int, str]]:
    return [(event["seq"], event["type"]) for event in await log.read("j")]


async def test_seqs_follow_the_floor_and_never_go_back(log: EventLog) -> None:
    assert await log.emit("j", "o", "queued", {"position": 2}, floor=5) == 6  # floor from Postgres
    assert await log.emit("j", "o", "started", {"attempt": 1}) == 7
    await log.redis.delete("stepcast:{j}:seq")  # the counter is evicted; the stream survives
    assert await log.emit("j", "o", "progress", {"step": 1}, floor=1) == 8
    assert await kinds(log) == [(6, "queued"), (7, "started"), (8, "progress")]
    assert [e["seq"] for e in await log.read("j", after_seq=6)] == [7, 8]


async def test_position_updates_never_precede_the_submit_or_follow_start_or_a_reserved_seq(
    log: EventLog,
) -> None:
    # The announcer saw the job's row before the submit announced it: the submit's comes first.
    assert await log.emit("j", "o", "queued", {"position": 2}, position_update=True) == 0
    await log.emit("j", "o", "queued", {"position": 2})
    assert await log.emit("j", "o", "queued", {"position": 2}, position_update=True) == 0  # nothing new
    assert await log.emit("j", "o", "queued", {"position": 1}, position_update=True) == 2
    reserved = await log.reserve("j", floor=0)
    assert reserved == 3
    assert await log.emit("j", "o", "queued", {"position": 1}, position_update=True) == 0
    assert await log.emit("j", "o", "canceled", seq=reserved) == 3
    assert await log.emit("j", "o", "canceled", seq=2) == -1  # the stream is past it: refused
    assert await log.emit("j", "o", "queued", {"position": 1}, position_update=True) == 0
    assert await kinds(log) == [(1, "queued"), (2, "queued"), (3, "canceled")]


async def test_a_requeued_job_hears_its_position_until_it_starts(log: EventLog) -> None:
    for kind in ["queued", "started", "requeued"]:
        await log.emit("j", "o", kind)
    assert await log.emit("j", "o", "queued", {"position": 1}, position_update=True) == 4
    await log.emit("j", "o", "started")
    assert await log.emit("j", "o", "queued", {"position": 1}, position_update=True) == 0
    assert await kinds(log) == [(1, "queued"), (2, "started"), (3, "requeued"), (4, "queued"), (5, "started")]


def test_encoding_is_flat_with_seq_third() -> None:
    head, tail = encode("progress", "j", {"step": 1, "total": 2})
    assert head + "9" + tail == '{"type":"progress","job_id":"j","seq":9,"step":1,"total":2}'
    head, tail = encode("canceled", "j", {})
    assert head + "3" + tail == '{"type":"canceled","job_id":"j","seq":3}'


@pytest.fixture
def pipelines(log: EventLog, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The pipelines (round trips) the log's client opens from here on."""
    opened = []
    pipeline = log.redis.pipeline

    def counted(*args: Any, **kwargs: Any) -> Any:
        opened.append(kwargs)
        return pipeline(*args, **kwargs)

    monkeypatch.setattr(log.redis, "pipeline", counted)
    return opened


async def test_a_batchs_events_of_one_step_share_a_round_trip_and_survive_a_script_flush(
    log: EventLog, pipelines: list[dict[str, Any]]
) -> None:
    jobs = [f"b{i}" for i in range(5)]
    assert await asyncio.gather(*(log.emit(job, "o", "started", {"attempt": 1}) for job in jobs)) == [1] * 5
    assert len(pipelines) == 1  # five events, one round trip

    await log.redis.script_flush()  # as after a Redis restart
    steps = await asyncio.gather(
        *(log.emit(job, "o", "progress", {"step": 1}) for job in jobs), log.reserve("b0", floor=0)
    )
    assert steps == [2, 2, 2, 2, 2, 3]  # each call loaded its script again and ran once
    assert len(pipelines) == 2
    assert await log.emit("solo", "o", "queued") == 1  # a lone call needs no pipeline
    assert len(pipelines) == 2
    for job in jobs:
        assert [(e["seq"], e["type"]) for e in await log.read(job)] == [(1, "started"), (2, "progress")]


async def test_logs_read_together_share_a_round_trip(log: EventLog, pipelines: list[dict[str, Any]]) -> None:
    for job, count in (("r0", 1), ("r1", 3), ("r2", 0)):
        for _ in range(count):
            await log.emit(job, "o", "progress", {"step": 1})  # alone: no pipeline
    reads = await asyncio.gather(log.read("r0"), log.read("r1", after_seq=1), log.read("r2"))
    assert [[event["seq"] for event in events] for events in reads] == [[1], [2, 3], []]
    assert len(pipelines) == 1


async def test_pipelined_calls_get_their_own_replies_and_their_own_errors(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    pipelined = Pipelined(redis)
    await redis.set("p:text", "not a number")

    def count(key: str) -> Callable[[Pipeline], object]:
        return lambda pipe: pipe.set(key, 0).incr(key).incr(key)

    replies = await asyncio.gather(
        pipelined(count("p:a")),
        pipelined(lambda pipe: pipe.get("p:a").incr("p:text").set("p:b", 1)),
        pipelined(count("p:c")),
        return_exceptions=True,
    )
    assert replies[0] == [True, 1, 2] and replies[2] == [True, 1, 2]
    assert isinstance(replies[1], ResponseError)  # its INCR failed; the others' commands did not
    assert await redis.get("p:b") == b"1"  # and its own later commands still ran, as in any pipeline
    assert await pipelined(lambda pipe: pipe.get("p:a")) == [b"2"]  # alone
    with pytest.raises(ResponseError):
        await pipelined(lambda pipe: pipe.incr("p:text"))
    await redis.aclose()


async def test_a_cancelled_call_does_not_hold_back_the_calls_that_joined_it(log: EventLog) -> None:
    leader = asyncio.create_task(log.emit("c0", "o", "queued"))
    joined = [asyncio.create_task(log.emit(job, "o", "queued")) for job in ("c1", "c2")]
    await asyncio.sleep(0)  # c0 leads and yields once; c1 and c2 join it
    leader.cancel()
    assert await asyncio.gather(*joined) == [1, 1]
    assert leader.cancelled() and await log.read("c0") == []


async def test_when_redis_is_unreachable_every_call_of_a_pipeline_gets_its_own_error() -> None:
    unreachable = Redis.from_url(f"redis://127.0.0.1:{free_port()}", socket_connect_timeout=1)
    log = EventLog(unreachable, stream_max=10, ttl_s=60)
    errors = await asyncio.gather(
        *(log.emit(f"u{i}", "o", "queued") for i in range(3)), return_exceptions=True
    )
    assert all(isinstance(error, RedisConnectionError) for error in errors)
    assert len({id(error) for error in errors}) == 3
    await unreachable.aclose()
