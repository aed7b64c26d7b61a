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

from stepcast.cli.processes import free_port
from stepcast.db import Database
from stepcast.events import (
    BEHIND,
    FENCED,
    NEED_BLOCK,
    UNCHANGED,
    Block,
    Canceled,
    EventLog,
    Failed,
    Progress,
    Queued,
    Requeued,
    Started,
    encode,
)
from stepcast.lifecycle import Lifecycle, Speaker, last_published
from stepcast.redis_keys import event_keys
from stepcast.round_trips import GatheredCommands
from tests.test_database import insert


@pytest.fixture
async def log(redis_url: str) -> AsyncIterator[EventLog]:
    redis = Redis.from_url(redis_url)
    yield EventLog(redis, stream_max=100, ttl_s=60)
    await redis.aclose()


async def kinds(log: EventLog, job: str = "j") -> list[tuple[int, str]]:
    return [(event["seq"], event["type"]) for event in (await log.read(job)).events]


FIRST = Block(1, 1024)  # a new job's block, as the insert reserves it
QUEUED = Queued(position=2, eta_s=None)
STARTED = Started(attempt=1, worker="w")
STEP = Progress(step=1, total=2, eta_s=0.5)


async def test_seqs_come_from_blocks_and_a_lost_counter_is_never_guessed(log: EventLog) -> None:
    assert await log.emit("j", "o", QUEUED, attempt=1) == NEED_BLOCK  # no counter, no block: ask Postgres
    assert await log.emit("j", "o", QUEUED, attempt=1, block=FIRST) == 1
    assert await log.emit("j", "o", STARTED, attempt=1, block=FIRST) == 2  # the block in use wins
    await log.redis.delete(event_keys("j")[0])  # the counter is lost; the stream survives
    assert await log.emit("j", "o", STEP, attempt=1) == NEED_BLOCK
    assert await log.emit("j", "o", STEP, attempt=1, block=Block(1, 5)) == NEED_BLOCK  # below the stream
    assert await log.emit("j", "o", STEP, attempt=1, block=Block(1025, 2048)) == 1025
    assert await kinds(log) == [(1, "queued"), (2, "started"), (1025, "progress")]
    assert [e["seq"] for e in (await log.read("j", after_seq=1)).events] == [2, 1025]
    assert (await log.read("j", after_seq=5000)).top == 1025


async def test_a_used_up_block_asks_for_the_next_one(log: EventLog) -> None:
    assert await log.emit("j", "o", QUEUED, attempt=1, block=Block(1, 2)) == 1
    assert await log.reserve("j", attempt=1) == 2
    assert await log.reserve("j", attempt=1) == NEED_BLOCK
    assert await log.reserve("j", attempt=1, block=Block(3, 4)) == 3  # contiguous: no gap
    assert await log.emit("j", "o", Canceled(), attempt=1, seq=3) == 3
    assert await kinds(log) == [(1, "queued"), (3, "canceled")]


async def test_an_older_attempt_is_fenced_and_a_log_ends_at_its_terminal_event(log: EventLog) -> None:
    await log.emit("j", "o", STARTED, attempt=1, block=FIRST)
    assert await log.emit("j", "o", Requeued(attempt=2, reason="lease_expired"), attempt=2) == 2
    assert await log.emit("j", "o", STEP, attempt=1) == FENCED  # the stale attempt 1
    assert await log.reserve("j", attempt=1) == 3  # a terminal write: Postgres fences it
    assert await log.emit("j", "o", Started(attempt=2, worker="w2"), attempt=2) == 4
    assert await log.emit("j", "o", Failed(code="x", message="y"), attempt=1, seq=3) == BEHIND
    assert await log.emit("j", "o", Failed(code="x", message="y"), attempt=2) == 5
    assert await log.emit("j", "o", STEP, attempt=2) == FENCED  # nothing after the end
    assert await log.reserve("j", attempt=3) == FENCED
    assert await kinds(log) == [(1, "started"), (2, "requeued"), (4, "started"), (5, "failed")]


async def test_a_finished_jobs_log_leaves_redis_soon_after_its_terminal_event(log: EventLog) -> None:
    log = EventLog(log.redis, stream_max=100, ttl_s=86_400, finished_ttl_s=600, channels=log.channels)
    counter, stream = event_keys("j")
    await log.emit("j", "o", STARTED, attempt=1, block=FIRST)
    await log.emit("j", "o", STEP, attempt=1)
    assert 86_000 < await log.redis.ttl(stream) <= 86_400  # a running job's log stays for resumes
    assert await log.emit("j", "o", Canceled(), attempt=1, seq=await log.reserve("j", attempt=1)) == 3
    assert 0 < await log.redis.ttl(stream) <= 600
    assert 0 < await log.redis.ttl(counter) <= 600
    assert await log.emit("j", "o", STEP, attempt=1) == FENCED  # and nothing brings the day back
    assert await log.redis.ttl(stream) <= 600


async def test_a_reservation_fences_no_attempt(log: EventLog) -> None:
    assert await log.emit("j", "o", STARTED, attempt=1, block=FIRST) == 1
    assert await log.reserve("j", attempt=2) == 2  # the recovery pass's; its write may fail
    assert await log.emit("j", "o", STEP, attempt=1) == 3  # attempt 1 still runs, and is heard


async def test_a_stream_ahead_of_its_counter_takes_a_fresh_block(log: EventLog) -> None:
    await log.emit("j", "o", QUEUED, attempt=1, block=FIRST)
    # An older stepcast, counting elsewhere during a rolling upgrade, appends seq 2.
    text = '{"type":"queued","job_id":"j","seq":2,"position":1,"eta_s":null}'
    await log.redis.xadd(event_keys("j")[1], {"e": text}, id="2-0")
    assert await log.emit("j", "o", STARTED, attempt=1) == NEED_BLOCK  # not 2 again
    assert await log.reserve("j", attempt=1) == NEED_BLOCK
    assert await log.emit("j", "o", STARTED, attempt=1, block=Block(1025, 2048)) == 1025


async def test_a_counter_of_another_replication_history_takes_a_fresh_block(log: EventLog) -> None:
    assert await log.emit("j", "o", QUEUED, attempt=1, block=FIRST) == 1
    assert await log.emit("j", "o", STARTED, attempt=1) == 2
    # A replica promoted in a failover (or an AOF replayed after a crash) serves a new
    # replication id, and may have lost seqs watchers saw: the counter it kept is not trusted.
    counter, _ = event_keys("j")
    await log.redis.hset(counter, "rid", "an-older-primary")
    assert await log.emit("j", "o", STEP, attempt=1) == NEED_BLOCK
    assert await log.reserve("j", attempt=1) == NEED_BLOCK
    assert await log.emit("j", "o", STEP, attempt=1, block=Block(1025, 2048)) == 1025
    assert await log.emit("j", "o", STEP, attempt=1) == 1026  # trusted again, in this history
    # One written before counters named their history (an older stepcast) is taken as this one's.
    await log.redis.hdel(counter, "rid")
    assert await log.emit("j", "o", STEP, attempt=1) == 1027


async def test_position_updates_never_precede_the_submit_or_follow_start_or_a_reserved_seq(
    log: EventLog,
) -> None:
    def at(position: int) -> Queued:
        return Queued(position=position, eta_s=None)

    # The announcer saw the job's row before the submit announced it: the submit's comes first.
    assert await log.emit("j", "o", at(2), attempt=1, position_update=True) == UNCHANGED
    await log.emit("j", "o", at(2), attempt=1, block=FIRST)
    assert await log.emit("j", "o", at(2), attempt=1, position_update=True) == UNCHANGED  # nothing new
    assert await log.emit("j", "o", at(1), attempt=1, position_update=True) == 2
    reserved = await log.reserve("j", attempt=1)
    assert reserved == 3
    assert await log.emit("j", "o", at(1), attempt=1, position_update=True) == UNCHANGED
    assert await log.emit("j", "o", Canceled(), attempt=1, seq=reserved) == 3
    assert await log.emit("j", "o", Canceled(), attempt=1, seq=2) == FENCED  # the log has ended
    assert await log.emit("j", "o", at(1), attempt=1, position_update=True) == FENCED
    assert await kinds(log) == [(1, "queued"), (2, "queued"), (3, "canceled")]


async def test_a_reserved_seq_the_stream_is_past_is_refused(log: EventLog) -> None:
    await log.emit("j", "o", QUEUED, attempt=1, block=FIRST)
    await log.emit("j", "o", STARTED, attempt=1)
    assert await log.emit("j", "o", Canceled(), attempt=1, seq=2) == BEHIND


async def test_a_requeued_job_hears_its_position_until_it_starts(log: EventLog) -> None:
    await log.emit("j", "o", QUEUED, attempt=1, block=FIRST)
    await log.emit("j", "o", STARTED, attempt=1)
    await log.emit("j", "o", Requeued(attempt=2, reason="worker_shutdown"), attempt=2)
    assert await log.emit("j", "o", Queued(position=1, eta_s=None), attempt=2, position_update=True) == 4
    await log.emit("j", "o", Started(attempt=2, worker="w"), attempt=2)
    assert await log.emit("j", "o", Queued(position=1, eta_s=0.1), attempt=2, position_update=True) == 0
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
    started = (log.emit(job, "o", STARTED, attempt=1, block=FIRST) for job in jobs)
    assert await asyncio.gather(*started) == [1] * 5
    assert len(pipelines) == 1  # five events, one round trip

    await log.redis.script_flush()  # as after a Redis restart
    steps = await asyncio.gather(
        *(log.emit(job, "o", STEP, attempt=1) for job in jobs), log.reserve("b0", attempt=1)
    )
    assert steps == [2, 2, 2, 2, 2, 3]  # each call loaded its script again and ran once
    assert len(pipelines) == 2
    assert await log.emit("solo", "o", QUEUED, attempt=1, block=FIRST) == 1  # a lone call needs no pipeline
    assert len(pipelines) == 2
    for job in jobs:
        assert await kinds(log, job) == [(1, "started"), (2, "progress")]


async def test_a_jobs_steps_sent_together_keep_their_order_in_one_round_trip(
    log: EventLog, pipelines: list[dict[str, Any]]
) -> None:
    await log.emit("j", "o", STARTED, attempt=1, block=FIRST)
    steps = [Progress(step=step, total=6, eta_s=0.1) for step in range(1, 7)]
    assert await log.emit_all("j", "o", steps[:3], attempt=1) == [2, 3, 4]
    assert len(pipelines) == 1
    await log.redis.script_flush()  # as after a Redis restart: loaded again, still in order
    assert await log.emit_all("j", "o", steps[3:], attempt=1) == [5, 6, 7]
    assert [(event["seq"], event.get("step")) for event in (await log.read("j")).events] == [
        (1, None), (2, 1), (3, 2), (4, 3), (5, 4), (6, 5), (7, 6)
    ]  # fmt: skip


async def test_steps_sent_together_keep_their_order_across_a_fresh_block(
    log: EventLog, database_url: str
) -> None:
    db = await Database.connect(database_url, max_size=1)
    try:
        job = (await insert(db)).job
        key = str(job.id)
        # The counter has two seqs left (2 and 3) when five steps come together.
        await log.emit(key, job.owner, STARTED, attempt=1, block=Block(1, 3))
        steps = [Progress(step=step, total=5, eta_s=0.1) for step in range(1, 6)]
        answers = await Lifecycle(db, log).emit_all(job.id, job.owner, steps, Speaker.waiting(job))
        last = last_published(answers)
    finally:
        await db.close()
    events = (await log.read(key)).events
    assert [event.get("step") for event in events] == [None, 1, 2, 3, 4, 5]
    seqs = [event["seq"] for event in events]
    assert seqs[:3] == [1, 2, 3] and seqs == sorted(set(seqs)) and last == seqs[-1] > 1024


async def test_logs_read_together_share_a_round_trip(log: EventLog, pipelines: list[dict[str, Any]]) -> None:
    for job, count in (("r0", 1), ("r1", 3), ("r2", 0)):
        for _ in range(count):
            await log.emit(job, "o", STEP, attempt=1, block=FIRST)  # alone: no pipeline
    reads = await asyncio.gather(log.read("r0"), log.read("r1", after_seq=1), log.read("r2"))
    assert [[event["seq"] for event in read.events] for read in reads] == [[1], [2, 3], []]
    assert [read.top for read in reads] == [1, 3, 0]
    assert len(pipelines) == 1


async def test_pipelined_calls_get_their_own_replies_and_their_own_errors(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    pipelined = GatheredCommands(redis)
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
    leader = asyncio.create_task(log.emit("c0", "o", QUEUED, attempt=1, block=FIRST))
    joined = [asyncio.create_task(log.emit(job, "o", QUEUED, attempt=1, block=FIRST)) for job in ("c1", "c2")]
    await asyncio.sleep(0)  # c0 leads and yields once; c1 and c2 join it
    leader.cancel()
    assert await asyncio.gather(*joined) == [1, 1]
    assert leader.cancelled() and (await log.read("c0")).events == []


async def test_when_redis_is_unreachable_every_call_of_a_pipeline_gets_its_own_error() -> None:
    unreachable = Redis.from_url(f"redis://127.0.0.1:{free_port()}", socket_connect_timeout=1)
    log = EventLog(unreachable, stream_max=10, ttl_s=60)
    errors = await asyncio.gather(
        *(log.emit(f"u{i}", "o", QUEUED, attempt=1) for i in range(3)), return_exceptions=True
    )
    assert all(isinstance(error, RedisConnectionError) for error in errors)
    assert len({id(error) for error in errors}) == 3
    await unreachable.aclose()
