"""The event log's Lua script, against a real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from stepcast.events import EventLog, encode


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
