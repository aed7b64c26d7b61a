"""The event protocol, model-checked (tests/protocol_model.py): every schedule within small
bounds, random ones beyond them; and the checker finds each bug it exists for when that
bug's fix is taken out again (docs/events.md, "How it is checked")."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis.exceptions import RedisError

import stepcast.events
from server.feed import Feed, _covers
from stepcast.events import Block
from stepcast.lifecycle import SEQ_BLOCK, Lifecycle, Speaker
from tests import protocol_model
from tests.protocol_model import Bounds, Violation, explore_exhaustively, explore_randomly

BIGGER = Bounds(steps=3, watchers=2, positions=2, faults=3, reconnects=2, actions=80)


async def test_every_schedule_one_step_off_the_default_keeps_the_invariants(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runs = await explore_exhaustively(Bounds(), monkeypatch, deviations=1, max_runs=5000)
    assert runs > 100


async def test_random_schedules_of_a_bigger_world_keep_the_invariants(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert await explore_randomly(BIGGER, monkeypatch, range(150)) == 150


# -- each bug, its fix reverted, is found ---------------------------------------------------


def _counter_from_postgres(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before seq blocks: a lost counter started again above Postgres' last_seq."""

    async def block(self: Lifecycle, job_id: uuid.UUID, speaker: Speaker) -> Block:
        row = await self.db.jobs.get(job_id)
        assert row is not None
        return Block(row.last_seq + 1, row.last_seq + SEQ_BLOCK)

    monkeypatch.setattr(Lifecycle, "_block", block)


def _row_before_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: a feed read the job's row, then its stream, and a snapshot took the stream's
    newest seq as its own."""

    async def sync(self: Feed, key: str, watch: Any, after_seq: int | None, new: Any = None) -> None:
        watch.syncing, watch.stale = True, False
        watch.buffer.clear()
        job = await self.services.jobs.get(self.owner, uuid.UUID(key))
        stream = await self.services.events.read(key, after_seq=after_seq or 0)
        if after_seq is not None and _covers(stream, after_seq, job.last_seq):
            for event in stream.events:
                self._deliver(key, watch, event, json.dumps(event))
        else:
            await self._snapshot(key, watch, job, stream.events[-1] if stream.events else None)
        buffered, watch.buffer = watch.buffer, []
        watch.syncing = False
        for event, text in sorted(buffered, key=lambda pair: int(pair[0]["seq"])):
            self._deliver(key, watch, event, text)

    async def snapshot(self: Feed, key: str, watch: Any, job: Any, latest: dict[str, Any] | None) -> None:
        if latest is not None and latest["type"] not in {"progress", "queued"}:
            latest = {**latest, "type": "progress", "step": 0, "total": 1}  # taken for progress
        await original(self, key, watch, job, latest)

    original = Feed._snapshot
    monkeypatch.setattr(Feed, "_sync", sync)
    monkeypatch.setattr(Feed, "_snapshot", snapshot)


def _seq_after_postgres_without_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: without Redis, a terminal event took Postgres' last_seq + 1."""
    reserve = Lifecycle.reserve

    async def guessed(self: Lifecycle, job_id: uuid.UUID, speaker: Speaker) -> int | None:
        try:
            await self.events.reserve(str(job_id), attempt=speaker.attempt)
        except RedisError:
            row = await self.db.jobs.get(job_id)
            return None if row is None else row.last_seq + 1
        return await reserve(self, job_id, speaker)

    monkeypatch.setattr(Lifecycle, "reserve", guessed)


def _no_attempt_fence(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: Redis took any attempt's events."""
    fence = "if attempt < att then return -3 end"
    assert fence in stepcast.events._EMIT
    monkeypatch.setattr(stepcast.events, "_EMIT", stepcast.events._EMIT.replace(fence, ""))


def _lost_reply_not_read_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: a terminal write whose reply was lost was never published by the server."""

    async def written(self: Lifecycle, what: str, write: Callable[[], Awaitable[Any]]) -> Any:
        return await self._retrying(what, write)

    monkeypatch.setattr(Lifecycle, "_written", written)


def _no_restamp(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: a terminal event whose reserved seq the log had passed was never published."""

    async def restamp(self: Lifecycle, *args: Any) -> None:
        return None

    monkeypatch.setattr(Lifecycle, "_restamp", restamp)


def _claim_without_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before (in the SQL the model follows): a retried claim whose first reply was lost
    matched no row, and the job sat in processing."""
    monkeypatch.setattr(protocol_model, "REVERTED", frozenset({"claim token"}))


def _requeue_despite_cancel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before (in the SQL the model follows): recovery requeued a job whose cancel was asked,
    and no claim would take it."""
    monkeypatch.setattr(protocol_model, "REVERTED", frozenset({"cancel fence"}))


def _job_key_for_membership(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: recovery judged a waiting job lost by arq's job key, so a job whose queue entry
    was lost (its key still there) was never enqueued again."""
    monkeypatch.setattr(protocol_model, "REVERTED", frozenset({"queue membership"}))


# Each bug with the faults it needs, found sooner.
REDIS_DOWN = Bounds(steps=1, faults=1, fault_kinds=("down",), reconnects=1, lease_expiries=0)
QUEUE_LOSS = Bounds(
    steps=1, faults=1, fault_kinds=("lose_queue_entry",), reconnects=0, lease_expiries=0, cancel=False
)
STORES = dataclasses.replace(BIGGER, fault_kinds=("flush", "restart", "down", "lose_reply"))


@pytest.mark.parametrize(
    ("revert", "bounds", "found"),
    [
        (_counter_from_postgres, STORES, "names two events"),
        (_row_before_stream, STORES, "as seen|never heard"),
        (_seq_after_postgres_without_redis, REDIS_DOWN, "names two events"),
        (_no_attempt_fence, STORES, "published after attempt"),
        (_lost_reply_not_read_back, STORES, "never heard"),
        (_no_restamp, STORES, "never heard"),
        (_claim_without_token, STORES, "never finished"),
        (_requeue_despite_cancel, STORES, "never finished"),
        (_job_key_for_membership, QUEUE_LOSS, "never finished"),
    ],
)
async def test_the_checker_finds_each_bug_when_its_fix_is_reverted(
    monkeypatch: pytest.MonkeyPatch, revert: Callable[[pytest.MonkeyPatch], None], bounds: Bounds, found: str
) -> None:
    revert(monkeypatch)
    with pytest.raises(Violation, match=found):
        await explore_randomly(bounds, monkeypatch, range(400))
