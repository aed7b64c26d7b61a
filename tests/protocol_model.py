"""A model checker for the event protocol (docs/events.md, "How it is checked").

One job, simulated end to end in one event loop: the real event log
(:class:`stepcast.events.EventLog`, its Lua scripts run by fakeredis), the real
:class:`stepcast.lifecycle.Lifecycle`, :class:`stepcast.recovery.Recovery`,
``JobService.cancel`` and :class:`server.feed.Feed`; Postgres is a one-row model
of the fenced statements of :mod:`stepcast.db`, the pub/sub hub a queue of
messages in flight. Every Redis and Postgres call, and every sleep, is a point
where the explorer decides who goes next, as are the faults: FLUSHALL, a Redis
restart (empty, its pub/sub connections lost), Redis down and up, a Postgres
write whose reply is lost, a lease that runs out, a watcher that drops and
resumes with the last seq it saw.

After the chosen steps, the world heals (Redis up, every parked call and
message let through, every actor that still may, run) and the invariants are
checked; some are checked after every step:

- each watcher's events come with strictly increasing seqs;
- no two different events of the job share a seq;
- every watcher of a job that is terminal in Postgres has received that state
  (the event, or a snapshot whose job is terminal);
- no ``started`` or ``completed`` is dropped as already seen when the watcher
  never saw it (or a snapshot showing it);
- once Redis has heard of attempt n+1, no event of attempt n follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import logging
import random
import types
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import asyncpg
import fakeredis
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

import server.feed
import stepcast.db
import stepcast.lifecycle
import stepcast.queue
from server.feed import Feed, Outbox
from server.job_service import JobService
from server.services import Services
from stepcast.db import Place
from stepcast.events import (
    NO_BLOCK,
    Block,
    Canceled,
    Completed,
    Event,
    EventLog,
    Progress,
    Queued,
    Started,
    Stream,
    Terminal,
)
from stepcast.jobs import Job
from stepcast.lifecycle import Lifecycle, Speaker
from stepcast.models import queue_of
from stepcast.recovery import Recovery
from stepcast.redis_keys import ALL_JOB_CHANNELS, DEFAULT_QUEUE
from stepcast.status import Status
from tests.conftest import fox_params

OWNER = "owner"


class Violation(AssertionError):
    pass


@dataclass(frozen=True)
class Bounds:
    """How big a world to explore."""

    steps: int = 2  # denoising steps per attempt
    watchers: int = 1
    positions: int = 1  # position updates the announcer tries
    faults: int = 1  # Redis flush / restart / down, a lost Postgres reply
    reconnects: int = 1  # watcher drops and resumes
    lease_expiries: int = 1  # 0: no recovery, no second attempt
    cancel: bool = True
    fault_kinds: tuple[str, ...] = ("flush", "restart", "down", "lose_reply", "lose_queue_entry")
    actions: int = 60  # chosen steps before the world heals


# -- Postgres: one row, the fences of stepcast/db/ --------------------------------


# Fixes in what the model stands in for (SQL, arq's queue), which a test may take out again:
# "claim token" (a retried claim finds its own), "cancel fence" (a lease that ran out with a
# cancel asked is not requeued), "queue membership" (recovery asks the queue, not arq's job key).
REVERTED: frozenset[str] = frozenset()


class SimDatabase:
    """Database and the stores the model touches, in one: each store's methods here, under its name."""

    def __init__(self, world: World, job: Job) -> None:
        self.world = world
        self.row = job
        self.lease_expired = False
        self.lose_reply = False
        self.jobs = self.runs = self.seqs = self.recovery = self.counts = self

    async def _read(self, what: str) -> Job:
        await self.world.io(f"pg {what}")
        return self.row

    def _wrote(self, row: Job) -> Job:
        self.row = row
        self.world.check_row(row)
        if self.lose_reply:
            self.lose_reply = False
            raise asyncpg.PostgresConnectionError("the reply was lost")
        return row

    async def get(self, job_id: uuid.UUID, owner: str | None = None) -> Job | None:
        row = await self._read("get_job")
        return row if owner in (None, row.owner) else None

    async def place(self, job: Job) -> Place:
        return Place(1, 0.0)

    async def to_show(self, owner: str, *, recent: int) -> list[Job]:
        return [await self._read("jobs_to_show")]

    async def reserve(self, job_id: uuid.UUID, count: int, *, attempt: int | None = None) -> int | None:
        row = await self._read("reserve_seqs")
        if attempt is not None and (row.attempt != attempt or row.status is not Status.PROCESSING):
            return None
        ceiling = (row.seq_ceiling or row.last_seq + count) + count
        return self._wrote(replace(row, seq_ceiling=ceiling)).seq_ceiling

    async def claim(self, job_ids: list[uuid.UUID], *, worker: str, token: uuid.UUID) -> dict[uuid.UUID, Job]:
        row = await self._read("claim")
        if row.status is Status.PROCESSING and row.claim_token == token and "claim token" not in REVERTED:
            return {row.id: row}
        if row.status is not Status.PENDING or row.cancel_requested:
            return {}
        claimed = replace(
            row, status=Status.PROCESSING, attempt=row.attempt + 1, worker=worker, claim_token=token
        )
        self.lease_expired = False
        return {row.id: self._wrote(claimed)}

    async def finish_pending(
        self,
        job_id: uuid.UUID,
        *,
        status: Status,
        seq: int,
        code: str | None = None,
        message: str | None = None,
    ) -> Job | None:
        row = await self._read("finish_pending")
        if row.status is not Status.PENDING:
            return None
        return self._wrote(replace(row, status=status, last_seq=seq, error_code=code, error_message=message))

    async def request_cancel(self, job_id: uuid.UUID) -> Job | None:
        row = await self._read("request_cancel")
        if row.status is not Status.PROCESSING:
            return None
        return self._wrote(replace(row, cancel_requested=True))

    async def finish_running(self, attempt: int, status: Status, seq: int) -> Job | None:
        """complete / cancel_running: fenced by attempt."""
        row = await self._read(f"finish {status.value}")
        if row.status is not Status.PROCESSING or row.attempt != attempt:
            return None
        return self._wrote(replace(row, status=status, last_seq=seq))

    async def restamp(self, job_id: uuid.UUID, seq: int, later: int) -> bool:
        row = await self._read("restamp")
        if row.last_seq != seq or not row.status.terminal or later <= seq:
            return False
        self._wrote(replace(row, last_seq=later))
        return True

    async def requeue_expired(self, job_id: uuid.UUID, attempt: int, *, resume_step: int = 0) -> Job | None:
        row = await self._read("requeue_expired")
        if row.status is not Status.PROCESSING or row.attempt != attempt or not self.lease_expired:
            return None
        if row.cancel_requested and "cancel fence" not in REVERTED:
            return None
        return self._wrote(replace(row, status=Status.PENDING, worker=None))

    @contextlib.asynccontextmanager
    async def singleton(self, task: str) -> AsyncIterator[bool]:
        yield True

    async def expired_leases(self) -> list[Job]:
        row = await self._read("expired_leases")
        return [row] if row.status is Status.PROCESSING and self.lease_expired else []

    async def expired_in_queue(self) -> list[Job]:
        return []

    async def head(self, seconds: float, *, limit: int) -> list[Job]:
        row = await self._read("pending_head")
        return [row] if row.status is Status.PENDING else []

    async def pending_after(self, seconds: float, after: Any, *, limit: int, besides: Any = ()) -> list[Job]:
        row = await self._read("pending_after")
        return [row] if row.status is Status.PENDING and row.id not in besides else []

    async def tag_untagged(self, seconds: float, *, limit: int = 1000) -> list[Job]:
        return []  # the one job has its fair tag from its insert

    async def finish_expired(
        self,
        job_id: uuid.UUID,
        attempt: int,
        *,
        status: Status,
        seq: int,
        code: str | None = None,
        message: str | None = None,
    ) -> Job | None:
        row = await self._read("finish_expired")
        if row.status is not Status.PROCESSING or row.attempt != attempt or not self.lease_expired:
            return None
        return self._wrote(replace(row, status=status, last_seq=seq, error_code=code, error_message=message))


# -- Redis: the real log on fakeredis, each call a scheduling point ------------------


class SimEventLog(EventLog):
    def __init__(self, world: World, redis: fakeredis.FakeAsyncRedis) -> None:
        super().__init__(redis, stream_max=1000, ttl_s=3600)
        self.world = world

    async def emit_all(
        self, job_id: str, owner: str, events: Sequence[Event], *, attempt: int, **kwargs: Any
    ) -> list[int]:
        await self.world.io(f"redis emit {'+'.join(event.type for event in events)}")
        answers = await super().emit_all(job_id, owner, events, attempt=attempt, **kwargs)
        for seq in answers:
            if seq > 0:
                self.world.emitted_by[seq] = attempt
        return answers

    async def reserve(self, job_id: str, *, attempt: int, block: Block = NO_BLOCK) -> int:
        await self.world.io("redis reserve")
        return await super().reserve(job_id, attempt=attempt, block=block)

    async def read(self, job_id: str, *, after_seq: int = 0) -> Stream:
        await self.world.io("redis read")
        return await super().read(job_id, after_seq=after_seq)


class SimHub:
    """The server's pub/sub connection: messages in flight until the explorer delivers them;
    a lost connection loses them and asks every feed to re-sync, as :class:`server.hub.Hub`."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.listeners: dict[str, set[Any]] = {}

    async def add(self, channel: str, listener: Any) -> None:
        await self.world.io("redis subscribe")
        self.listeners.setdefault(channel, set()).add(listener)

    def remove(self, channel: str, listener: Any) -> None:
        self.listeners.get(channel, set()).discard(listener)

    def deliver(self, channel: str, text: str) -> None:
        event = json.loads(text)
        for listener in sorted(self.listeners.get(channel, set()), key=id):
            listener.on_event(event, text)

    def reconnected(self) -> None:
        for listener in sorted({m for group in self.listeners.values() for m in group}, key=id):
            listener.on_reconnect()


class _Metrics:
    class _Counter:
        def inc(self) -> None:
            pass

    events_dropped = _Counter()


# -- watchers ---------------------------------------------------------------------------


@dataclass
class Watcher:
    """One client: what it has received, and the seq it resumes from."""

    name: str
    feed: Feed | None = None
    resume: int | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    snapshot: dict[str, Any] | None = None  # the latest
    terminal: str | None = None  # the terminal status it has heard of
    attempt_heard: int = 0  # the newest attempt its events announced


class CheckedFeed(Feed):
    """The real feed, telling the world when it drops a ``started`` or ``completed`` as seen."""

    watcher: Watcher
    world: World

    def _deliver(self, key: str, watch: Any, event: dict[str, Any], text: str) -> None:
        seq = int(event["seq"])
        dropped = not watch.done and (seq <= watch.last_seq or seq <= watch.delivered)
        if dropped and event["type"] in {"started", "completed"} and self.watcher.feed is self:
            self.world.check_dropped(self.watcher, event)
        super()._deliver(key, watch, event, text)


# -- the world --------------------------------------------------------------------------


Action = tuple[str, Callable[[], Awaitable[None] | None]]


class World:
    def __init__(self, bounds: Bounds, monkeypatch: pytest.MonkeyPatch) -> None:
        self.bounds = bounds
        self.job_id = uuid.uuid4()
        self.key = str(self.job_id)
        self.server = fakeredis.FakeServer()
        self.redis = fakeredis.FakeAsyncRedis(server=self.server)
        self.tap = self.redis.pubsub()
        self.events = SimEventLog(self, self.redis)
        self.hub = SimHub(self)
        self.db = SimDatabase(self, _new_job(self.job_id))
        lifecycle = Lifecycle(self.db, self.events)  # type: ignore[arg-type]
        jobs = JobService(
            None,  # type: ignore[arg-type]
            self.db,  # type: ignore[arg-type]
            self.db,  # type: ignore[arg-type]
            self.redis,  # type: ignore[arg-type]
            lifecycle,
            _Eta(),  # type: ignore[arg-type]
            _Storage(),  # type: ignore[arg-type]
            _Metrics(),  # type: ignore[arg-type]
        )
        self.services = Services(
            settings=None,  # type: ignore[arg-type]
            db=self.db,  # type: ignore[arg-type]
            redis=self.redis,  # type: ignore[arg-type]
            events=self.events,
            storage=_Storage(),  # type: ignore[arg-type]
            hub=self.hub,  # type: ignore[arg-type]
            metrics=_Metrics(),  # type: ignore[arg-type]
            session_secret=b"",
            jobs=jobs,
            models=None,  # type: ignore[arg-type]
            sockets=None,  # type: ignore[arg-type]
            revocations=None,  # type: ignore[arg-type]
        )
        self.recovery = Recovery(
            self.db,  # type: ignore[arg-type]
            self.events,
            None,  # type: ignore[arg-type]
            max_attempts=3,
            interval_s=1,
            enqueue_grace_s=1,
        )
        self.outside = asyncio.all_tasks()  # the test session's own: not the world's to wait for
        self.redis_down = False
        self.parked: list[tuple[int, str, asyncio.Future[None], asyncio.Task[Any]]] = []
        self._parked_count = 0
        self.tasks: dict[str, asyncio.Task[Any]] = {}
        self.in_flight: list[tuple[str, str]] = []
        self.seen: dict[int, str] = {}  # seq -> the event's text, as published
        self.recorded: dict[int, str] = {}  # seq -> a terminal status Postgres recorded with it
        self.emitted_by: dict[int, int] = {}  # seq -> the attempt that emitted it
        self.published: list[dict[str, Any]] = []
        self.watchers = [Watcher(f"w{i}") for i in range(bounds.watchers)]
        self.budget = {
            "faults": bounds.faults,
            "reconnects": bounds.reconnects,
            "lease": bounds.lease_expiries,
        }
        self.started: set[str] = set()
        self.positions_left = bounds.positions
        self.log: list[str] = []
        sleep = self.sleep
        gated = types.SimpleNamespace(**{**vars(asyncio), "sleep": sleep})
        for module in (server.feed, stepcast.lifecycle, stepcast.db):
            monkeypatch.setattr(module, "asyncio", gated)

        # The queue: whether its sorted set holds the job, and whether arq's job key is there
        # (a worker takes only a job its queue holds).
        self.queued = self.job_key = False

        async def enqueue(*args: Any, afresh: bool = False, **kwargs: Any) -> bool:
            if self.job_key and not afresh:
                return False  # arq refuses a job id it knows
            self.queued = self.job_key = True
            return True

        async def held(arq: Any, jobs: list[Job]) -> set[uuid.UUID]:
            there = self.job_key if "queue membership" in REVERTED else self.queued
            return {job.id for job in jobs if there}

        monkeypatch.setattr(stepcast.queue, "enqueue", enqueue)
        monkeypatch.setattr(stepcast.queue, "held", held)
        self.recoveries = 0

    # -- scheduling points --

    async def io(self, what: str) -> None:
        task = asyncio.current_task()
        assert task is not None
        gate = asyncio.get_running_loop().create_future()
        self._parked_count += 1
        self.parked.append((self._parked_count, what, gate, task))
        await gate
        if what.startswith("redis") and self.redis_down:
            raise RedisConnectionError("Redis is down")

    async def sleep(self, delay: float = 0, result: Any = None) -> Any:
        await self.io("sleep")
        return result

    def start(self, name: str, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self.started.add(name)
        self.tasks[name] = asyncio.ensure_future(run())

    async def settle(self) -> None:
        """Run until every task is parked at a scheduling point or done."""
        me = asyncio.current_task()
        for _ in range(10_000):
            await _yield()
            self.parked = [entry for entry in self.parked if not entry[2].done()]  # cancelled meanwhile
            parked = {entry[3] for entry in self.parked}
            running = [
                task
                for task in asyncio.all_tasks()
                if task is not me and not task.done() and task not in parked and task not in self.outside
            ]
            if not running:
                break
        else:
            raise RuntimeError(f"tasks never parked: {running}")
        while (message := await self.tap.get_message(timeout=0)) is not None:
            if message["type"] != "pmessage":
                continue
            channel, text = message["channel"].decode(), message["data"].decode()
            self.check_published(text)
            self.in_flight.append((channel, text))
        for watcher in self.watchers:
            self._drain(watcher)
        for task in self.tasks.values():
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    # -- the actors --

    def actions(self) -> list[Action]:
        """What may happen next, in a fixed order (the first is the running actor's next step)."""
        options: list[Action] = []
        for number, what, _, _ in sorted(self.parked, key=lambda entry: entry[0]):
            options.append((f"go #{number} {what}", functools.partial(self._release, number)))
        if self.in_flight:
            options.append(("deliver", self._deliver_one))
        row = self.db.row
        for name, ready, run in self._actors(row):
            if name not in self.started and ready:
                options.append((f"start {name}", functools.partial(self.start, name, run)))
        if self.budget["lease"] and row.status is Status.PROCESSING and not self.db.lease_expired:
            options.append(("lease runs out", self._expire_lease))
        if self.budget["faults"]:
            for kind in self.bounds.fault_kinds:
                if kind == "down" and self.redis_down:
                    continue
                options.append((f"fault {kind}", functools.partial(self._fault, kind)))
        if self.redis_down:
            options.append(("redis up", self._redis_up))
        if self.budget["reconnects"]:
            for watcher in self.watchers:
                if watcher.feed is not None and f"watch {watcher.name}" in self.started:
                    options.append((f"reconnect {watcher.name}", functools.partial(self._reconnect, watcher)))
        return options

    def _actors(self, row: Job) -> Iterator[tuple[str, bool, Callable[[], Coroutine[Any, Any, None]]]]:
        yield "submit", True, self._submit
        for index, watcher in enumerate(self.watchers):
            ready = index == 0 or "submit" in self.started
            yield f"watch {watcher.name}", ready, functools.partial(self._watch, watcher, index == 0)
        if self.positions_left:
            yield "announce", "submit" in self.started, self._announce
        # A worker takes the job only from its queue.
        yield "worker 1", self.queued, functools.partial(self._worker, "worker 1")
        second = row.status is Status.PENDING and row.attempt >= 1 and self.queued
        yield "worker 2", second, functools.partial(self._worker, "worker 2")
        if self.bounds.cancel:
            yield "cancel", "submit" in self.started, self._cancel
        # The recovery pass, when it has something to do (a lease ran out, a waiting job
        # its queue lost), a few times at most.
        due = self.db.lease_expired or ("submit" in self.started and row.status is Status.PENDING)
        if due and self.recoveries < 3:
            yield f"recovery {self.recoveries + 1}", True, self._recover

    async def _submit(self) -> None:
        # As JobService.submit: Lifecycle.announce_in (its first block, offered once), then the
        # enqueue, in one round trip.
        row = self.db.row
        with contextlib.suppress(RedisConnectionError):
            await self.events.emit(
                self.key, OWNER, Queued(position=2, eta_s=None), attempt=1, block=Block(1, row.seq_ceiling)
            )
            await stepcast.queue.enqueue(None, self.job_id, "q")  # type: ignore[arg-type]

    async def _announce(self) -> None:
        lifecycle = Lifecycle(self.db, self.events)  # type: ignore[arg-type]
        while self.positions_left:
            self.positions_left -= 1
            row = await self.db.jobs.get(self.job_id)
            assert row is not None
            if row.status is Status.PENDING:
                with contextlib.suppress(asyncpg.PostgresConnectionError):
                    await lifecycle.emit(
                        self.job_id,
                        OWNER,
                        Queued(position=1, eta_s=0.5),
                        Speaker.waiting(row),
                        position_update=True,
                    )

    async def _worker(self, name: str) -> None:
        """A worker's calls, as gpu_worker/dispatch.py and execution.py make them."""
        lifecycle = Lifecycle(self.db, self.events, db_retry_s=60)  # type: ignore[arg-type]
        token = uuid.uuid4()
        claimed = await stepcast.db.retrying(
            lambda: self.db.runs.claim([self.job_id], worker=name, token=token), what="claim", deadline_s=60
        )
        job = claimed.get(self.job_id)
        if job is None:
            return
        speaker = Speaker.running(job)
        await lifecycle.emit(self.job_id, OWNER, Started(attempt=job.attempt, worker=name), speaker)
        total = self.bounds.steps
        steps = [Progress(step=step, total=total, eta_s=0.1) for step in range(1, total + 1)]
        # The first step goes alone (after a quiet interval), those close behind it together.
        for bunch in (steps[:1], steps[1:]):
            if bunch:
                await lifecycle.emit_all(self.job_id, OWNER, bunch, speaker)
        current = await self.db.jobs.get(self.job_id)  # its heartbeat: a cancel asked for?
        canceled = current is not None and current.cancel_requested
        status = Status.CANCELED if canceled else Status.COMPLETED
        event: Terminal = Canceled() if canceled else Completed(images=[], timings=None)

        def write(seq: int) -> Awaitable[Job | None]:
            return self.db.finish_running(job.attempt, status, seq)

        await lifecycle.finish(job, status, speaker, write, event)

    async def _cancel(self) -> None:
        with contextlib.suppress(Exception):
            await self.services.jobs.cancel(OWNER, self.job_id)

    async def _recover(self) -> None:
        self.recoveries += 1
        with contextlib.suppress(RedisConnectionError, asyncpg.PostgresConnectionError):
            await self.recovery.tick()

    async def _watch(self, watcher: Watcher, submitter: bool) -> None:
        """Subscribe (again), retrying while the server answers with an error."""
        while True:
            feed = CheckedFeed(self.services, OWNER, outbox=Outbox(10**6, 10**9))  # it checks every event
            feed.watcher, feed.world = watcher, self
            watcher.feed = feed
            try:
                if submitter and watcher.resume is None:
                    await feed.watch(self.job_id, 0, new=self.db.row)  # as a WebSocket submit does
                else:
                    await feed.watch(self.job_id, watcher.resume)
                return
            except (RedisConnectionError, asyncpg.PostgresConnectionError):
                self._drain(watcher)
                await feed.close()
                await self.sleep()

    # -- the faults --

    def _release(self, number: int) -> None:
        for entry in self.parked:
            if entry[0] == number:
                self.parked.remove(entry)
                entry[2].set_result(None)
                return

    def _deliver_one(self) -> None:
        channel, text = self.in_flight.pop(0)
        self.hub.deliver(channel, text)

    def _expire_lease(self) -> None:
        self.budget["lease"] -= 1
        self.db.lease_expired = True

    async def _fault(self, kind: str) -> None:
        self.budget["faults"] -= 1
        if kind == "lose_reply":
            self.db.lose_reply = True
        elif kind == "lose_queue_entry":  # the sorted set lost it; arq's job key is still there
            self.queued = False
        elif kind == "down":
            self.redis_down = True
            self.in_flight.clear()
        else:
            await self.redis.flushall()
            self.queued = self.job_key = False
            if kind == "restart":  # empty, its scripts and its connections gone
                await self.redis.script_flush()
                self.in_flight.clear()
                self.hub.reconnected()

    def _redis_up(self) -> None:
        self.redis_down = False
        self.in_flight.clear()
        self.hub.reconnected()

    def _reconnect(self, watcher: Watcher) -> None:
        self.budget["reconnects"] -= 1
        feed = watcher.feed
        assert feed is not None
        self._drain(watcher)
        watcher.feed = None
        name = f"watch {watcher.name}"
        self.tasks[name].cancel()  # the connection is gone, and whatever it was doing
        self.tasks[f"close {id(feed)}"] = asyncio.ensure_future(feed.close())
        self.tasks[name] = asyncio.ensure_future(self._watch(watcher, False))

    # -- what the clients see, and the invariants --

    def _drain(self, watcher: Watcher) -> None:
        feed = watcher.feed
        if feed is None:
            return
        while feed.outbox.ready:
            item = feed.outbox.pop()
            assert item is not None
            self._receive(watcher, json.loads(item.text))

    def _receive(self, watcher: Watcher, message: dict[str, Any]) -> None:
        if message["type"] == "snapshot":
            job = message["job"]
            watcher.snapshot = job
            watcher.resume = job["last_seq"]
            if job["status"] in {"completed", "failed", "canceled"}:
                watcher.terminal = job["status"]
            return
        seq = message["seq"]
        if watcher.events and seq <= watcher.events[-1]["seq"]:
            raise Violation(f"{watcher.name} got seq {seq} after {watcher.events[-1]['seq']}: {message}")
        text = self.seen.get(seq)
        if text is not None and json.loads(text) != message:
            raise Violation(f"seq {seq} names two events: {text} and {message}")
        watcher.events.append(message)
        watcher.resume = seq
        if message["type"] in {"completed", "failed", "canceled"}:
            watcher.terminal = message["type"]
        if message["type"] in {"started", "requeued"}:
            watcher.attempt_heard = max(watcher.attempt_heard, message["attempt"])

    def check_published(self, text: str) -> None:
        event = json.loads(text)
        seq = event["seq"]
        if seq in self.seen and json.loads(self.seen[seq]) != event:
            raise Violation(f"seq {seq} names two events: {self.seen[seq]} and {text}")
        self._same_event(seq, event["type"], "published")
        self.seen[seq] = text
        by = self.emitted_by.get(seq, 0)
        if self.published:
            newest = max(
                [e["attempt"] for e in self.published if e["type"] in {"started", "requeued"}], default=0
            )
            if self.published[-1]["type"] in {"completed", "failed", "canceled"}:
                raise Violation(f"an event after the terminal one: {text}")
            if event["type"] in {"started", "progress"} and by < newest:
                raise Violation(f"attempt {by} published after attempt {newest} began: {text}")
        self.published.append(event)

    def check_row(self, row: Job) -> None:
        if row.last_seq > row.seq_ceiling:
            raise Violation(f"last_seq {row.last_seq} above the reserved {row.seq_ceiling}")
        if row.status.terminal:  # Postgres records the terminal event's seq: an event too
            self._same_event(row.last_seq, row.status.value, "recorded in Postgres")
            self.recorded[row.last_seq] = row.status.value

    def _same_event(self, seq: int, kind: str, where: str) -> None:
        known = self.recorded.get(seq) or (json.loads(self.seen[seq])["type"] if seq in self.seen else None)
        if known is not None and known != kind:
            raise Violation(f"seq {seq} names two events: {known} and {kind} ({where})")

    def check_dropped(self, watcher: Watcher, event: dict[str, Any]) -> None:
        self._drain(watcher)  # what the feed has sent counts as received
        if any(e["seq"] == event["seq"] for e in watcher.events):
            return
        snapshot = watcher.snapshot or {}
        shown = snapshot.get("status")
        if event["type"] == "completed" and shown == "completed":
            return
        if event["type"] == "started" and snapshot and snapshot["attempt"] >= event["attempt"]:
            return  # the row counts claims: that attempt started (and may be over)
        raise Violation(f"{watcher.name} dropped {event} as seen; it saw {watcher.events} and {snapshot}")

    def check_end(self) -> None:
        row = self.db.row
        if not row.status.terminal:  # healed, with every actor run: nothing may be left waiting
            raise Violation(f"the job never finished: {row.status.value}, attempt {row.attempt}")
        for watcher in self.watchers:
            if watcher.terminal != row.status.value:
                raise Violation(
                    f"{watcher.name} never heard that the job {row.status.value} (seq {row.last_seq}); "
                    f"it got {watcher.events} and the snapshot {watcher.snapshot}"
                )

    # -- one run --

    async def heal(self) -> None:
        """No more faults: Redis up, everything parked or in flight let through, every actor
        that still may, run; until nothing moves."""
        self.budget = {"faults": 0, "reconnects": 0, "lease": 0}
        if self.redis_down:
            self._redis_up()
        for _ in range(5_000):
            await self.settle()
            if self.parked:
                self._release(min(entry[0] for entry in self.parked))
            elif self.in_flight:
                self._deliver_one()
            else:
                actors = self._actors(self.db.row)
                pending = [(name, run) for name, ready, run in actors if ready and name not in self.started]
                if not pending:
                    return
                self.start(*pending[0])
        raise Violation("the world never settled")

    async def close(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        for watcher in self.watchers:
            if watcher.feed is not None:
                await watcher.feed.close()
        for *_, task in self.parked:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        await self.tap.aclose()  # type: ignore[no-untyped-call]
        await self.redis.aclose()


class _Eta:
    """No worker in this world runs: a snapshot of a pending job carries no estimate."""

    async def start_at(self, job: Job, place: Place) -> None:
        return None


class _Storage:
    async def url(self, key: str) -> str:
        return "/v1/images/" + key


def _new_job(job_id: uuid.UUID) -> Job:
    now = datetime.now(UTC)
    fields: dict[str, Any] = {name: None for name in Job.__dataclass_fields__}
    fields.update(
        id=job_id, owner=OWNER, params=fox_params(prompt="p", steps=2), status=Status.PENDING, attempt=0,
        queue=queue_of(DEFAULT_QUEUE, "tiny"), created_at=now, progress_step=0, progress_total=2,
        cancel_requested=False, last_seq=0, model_name="tiny", stepcast_version="0", handoffs=0,
        seq_ceiling=1024, fair_tag=0.0,
    )  # fmt: skip
    return Job(**fields)


@types.coroutine
def _yield() -> Iterator[None]:
    yield None


# -- the explorers ------------------------------------------------------------------------


Chooser = Callable[[list[Action], int], int]


async def run_once(bounds: Bounds, monkeypatch: pytest.MonkeyPatch, choose: Chooser) -> list[str]:
    """One schedule: the chosen actions, then healing; raises :class:`Violation`. Its trace."""
    world = World(bounds, monkeypatch)
    await world.tap.psubscribe(ALL_JOB_CHANNELS)
    trace: list[str] = []
    quiet = logging.root.manager.disable
    logging.disable(logging.WARNING)  # faults on purpose: thousands of warnings, with tracebacks
    try:
        for number in range(bounds.actions):
            await world.settle()
            options = world.actions()
            if not options:
                break
            label, act = options[choose(options, number)]
            trace.append(label)
            done = act()
            if inspect.isawaitable(done):
                await done
        trace.append("heal")
        await world.heal()
        world.check_end()
    except Violation as violation:
        raise Violation(f"{violation}\n  after: {' → '.join(trace)}") from None
    finally:
        logging.disable(quiet)
        await world.close()
    return trace


async def explore_randomly(bounds: Bounds, monkeypatch: pytest.MonkeyPatch, seeds: range) -> int:
    for seed in seeds:
        choose = functools.partial(_random_choice, random.Random(seed))
        try:
            await run_once(bounds, monkeypatch, choose)
        except Violation as violation:
            raise Violation(f"seed {seed}: {violation}") from None
    return len(seeds)


def _random_choice(rng: random.Random, options: list[Action], number: int) -> int:
    return rng.randrange(len(options))


async def explore_exhaustively(
    bounds: Bounds, monkeypatch: pytest.MonkeyPatch, *, deviations: int, max_runs: int
) -> int:
    """Every schedule that departs at most ``deviations`` times from the default one (the
    oldest parked call first, then deliveries, then actors in order, no faults): delay
    bounding, replaying choice prefixes depth first. The number of schedules run."""
    prefix: list[int] = []
    runs = 0
    while True:
        schedule = _Schedule(prefix, deviations)
        await run_once(bounds, monkeypatch, schedule.choose)
        runs += 1
        if runs >= max_runs:
            raise AssertionError(f"more than {max_runs} schedules: bound the world tighter")
        for depth in range(len(schedule.taken) - 1, -1, -1):
            if schedule.taken[depth] + 1 < schedule.widths[depth]:
                prefix = [*schedule.taken[:depth], schedule.taken[depth] + 1]
                break
        else:
            return runs


@dataclass
class _Schedule:
    """One run of the depth-first search: the choices given, then the default (0)."""

    prefix: list[int]
    deviations: int
    taken: list[int] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)

    def choose(self, options: list[Action], number: int) -> int:
        spent = sum(1 for index in self.taken if index > 0)
        width = len(options) if spent < self.deviations else 1
        index = self.prefix[number] if number < len(self.prefix) else 0
        self.widths.append(width)
        self.taken.append(index)
        return index
