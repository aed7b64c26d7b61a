"""One client's view of the event log: the jobs it watches, what it saw, what is left to send.

WebSocket connections and SSE streams are both feeds. :meth:`Feed.watch` sends the events after
the client's ``after_seq`` or a ``snapshot``, then live events, with no gap and no duplicate. The
outbound buffer is bounded: only ``progress`` is dropped (previews first), and a client that lets
the rest pile up gets :class:`SlowConsumer`. The rules: docs/events.md, "What a watcher gets".
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from server import frames
from stepcast.background import cancel_and_wait, stop_if_cancelled
from stepcast.errors import NotFound
from stepcast.events import TERMINAL_TYPES, Stream
from stepcast.jobs import Job
from stepcast.status import Status

if TYPE_CHECKING:
    from server.services import Services

logger = logging.getLogger(__name__)


MAX_SYNC_BUFFER = 10_000  # live events held back per job while its log is read


class SlowConsumer(Exception):
    """The client reads too slowly even after every droppable event was dropped."""


@dataclass
class Outgoing:
    text: str
    type: str
    job_id: str | None = None
    seq: int | None = None
    terminal: bool = False
    preview: bool = False  # a progress event with a preview picture: the first to drop


@dataclass
class _Watch:
    last_seq: int
    delivered: int = 0  # the highest seq of an event sent: events only go forward
    syncing: bool = True
    done: bool = False
    stale: bool = False  # a re-sync must run again after the current one
    buffer: list[tuple[dict[str, Any], str]] = field(default_factory=list)


class Outbox:
    """Messages waiting for one client, at most ``max_buffer`` of them and ``max_bytes`` of
    text (one message, however large, always fits); when over, the oldest ``progress``
    with a preview goes first, then the oldest other ``progress``.

    An idle outbox holds no more than it must (a server holds thousands): an empty list,
    and a future only while someone waits in :meth:`next`. ``on_push``, if set, is called
    after each message is queued (a WebSocket starts its writer then).
    """

    def __init__(self, max_buffer: int, max_bytes: int, on_drop: Callable[[], object] | None = None) -> None:
        self.max_buffer = max_buffer
        self.max_bytes = max_bytes
        self.on_drop = on_drop
        self.on_push: Callable[[], object] | None = None
        self.dropped = 0
        self.bytes = 0  # of text queued (str length: what JSON text takes, near enough)
        self._queue: list[Outgoing] = []  # a few hundred at most: a list is smaller than a deque
        self._waiter: asyncio.Future[None] | None = None
        self._overflow = False

    def push(self, item: Outgoing) -> None:
        self._queue.append(item)
        self.bytes += len(item.text)
        while (len(self._queue) > self.max_buffer or self.bytes > self.max_bytes) and len(self._queue) > 1:
            if not (self._drop(previews=True) or self._drop(previews=False)):
                self._overflow = True
                break
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        if self.on_push is not None:
            self.on_push()

    def _drop(self, *, previews: bool) -> bool:
        """Drop the oldest ``progress`` (with a preview, if ``previews``); was there one?"""
        for index, queued in enumerate(self._queue):
            if queued.type == "progress" and (queued.preview or not previews):
                del self._queue[index]
                self.bytes -= len(queued.text)
                self.dropped += 1
                if self.on_drop is not None:
                    self.on_drop()
                return True
        return False

    @property
    def ready(self) -> bool:
        """Is a message waiting (or an overflow to report)?"""
        return bool(self._queue) or self._overflow

    def pop(self) -> Outgoing | None:
        """The next message to send, or None when there is none yet.

        Raises :class:`SlowConsumer` once the client fell too far behind."""
        if self._overflow:
            raise SlowConsumer
        if not self._queue:
            return None
        item = self._queue.pop(0)
        self.bytes -= len(item.text)
        return item

    async def next(self, timeout_s: float | None = None) -> Outgoing | None:
        """The next message to send; None after ``timeout_s`` of silence."""
        while not self.ready:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._waiter
            except TimeoutError:
                return None
            finally:
                self._waiter = None
        return self.pop()


class Feed:
    def __init__(self, services: Services, owner: str, *, outbox: Outbox | None = None) -> None:
        self.services = services
        self.hub = services.hub
        self.channels = services.events.channels
        self.owner = owner
        if outbox is None:
            settings = services.settings
            outbox = Outbox(
                settings.feed_buffer_max,
                settings.feed_buffer_max_bytes,
                on_drop=services.metrics.events_dropped.inc,
            )
        self.outbox = outbox
        self.mine = False
        self._watches: dict[str, _Watch] = {}
        self._tasks: set[asyncio.Task[None]] | None = None  # re-syncs running (rare: made when needed)
        self._closed = False

    def push(self, item: Outgoing) -> None:
        self.outbox.push(item)

    def push_message(self, message: dict[str, Any]) -> None:
        self.push(Outgoing(json.dumps(message, separators=(",", ":")), message["type"]))

    async def next(self, timeout_s: float | None = None) -> Outgoing | None:
        return await self.outbox.next(timeout_s)

    async def next_unless(self, *stops: asyncio.Event, timeout_s: float | None = None) -> Outgoing | None:
        """:meth:`next`, but None at once when one of ``stops`` is set (the server is shutting
        down, the stream's key was revoked)."""
        if any(stop.is_set() for stop in stops):
            return None
        if self.outbox.ready:  # the common case under load: no need to race anything
            return await self.next()
        waiting = asyncio.ensure_future(self.next(timeout_s))
        stopping = [asyncio.ensure_future(stop.wait()) for stop in stops]
        try:
            await asyncio.wait({waiting, *stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in stopping:
                await cancel_and_wait(task)
        if not waiting.done():
            await cancel_and_wait(waiting)
            return None
        return waiting.result()

    # -- watching -----------------------------------------------------------

    async def watch(self, job_id: uuid.UUID, after_seq: int | None, *, new: Job | None = None) -> None:
        """Send what the client missed after ``after_seq`` (or a snapshot), then live events.

        ``new``: the row of a job this owner has just submitted, which spares reading it
        again to judge a replay (its log can only have grown since).
        """
        key = str(job_id)
        if new is None:
            await self.services.jobs.get(self.owner, job_id)  # NotFound for strangers' jobs
        watch = _Watch(last_seq=after_seq or 0)
        self._watches[key] = watch
        try:
            await self.hub.add(self.channels.job(key), self)
            await self._sync(key, watch, after_seq, new)
        except BaseException:
            if self._watches.get(key) is watch:
                del self._watches[key]
            self.hub.remove(self.channels.job(key), self)
            raise

    async def unwatch(self, job_id: uuid.UUID) -> None:
        key = str(job_id)
        if self._watches.pop(key, None) is not None:
            self.hub.remove(self.channels.job(key), self)

    async def watch_mine(self, *, recent: int = 20) -> None:
        """Every event of every job of this owner; current state of the live and recent ones first."""
        if self.mine:
            return
        await self.hub.add(self.channels.owner(self.owner), self)
        self.mine = True
        for job in await self.services.db.jobs.to_show(self.owner, recent=recent):
            key = str(job.id)
            if key not in self._watches:
                watch = _Watch(last_seq=0)
                self._watches[key] = watch
                await self._sync(key, watch, None)

    async def close(self) -> None:
        self._closed = True
        for task in self._tasks or ():
            task.cancel()
        for key in list(self._watches):
            self.hub.remove(self.channels.job(key), self)
        if self.mine:
            self.hub.remove(self.channels.owner(self.owner), self)
        self._watches.clear()

    async def _sync(self, key: str, watch: _Watch, after_seq: int | None, new: Job | None = None) -> None:
        watch.syncing = True
        watch.stale = False
        watch.buffer.clear()  # whatever arrived before the read below is in the stream
        stream = await self.services.events.read(key, after_seq=after_seq or 0)
        # After the stream (see the module doc); a new job's row as inserted is enough for a replay.
        job = new if new is not None else await self.services.jobs.get(self.owner, uuid.UUID(key))
        if after_seq is not None and _covers(stream, after_seq, job.last_seq):
            for event in stream.events:
                self._deliver(key, watch, event, json.dumps(event, separators=(",", ":")))
        else:
            if new is not None:  # a snapshot shows the job as it is now
                job = await self.services.jobs.get(self.owner, uuid.UUID(key))
            await self._snapshot(key, watch, job, stream.events[-1] if stream.events else None)
        buffered, watch.buffer = watch.buffer, []
        watch.syncing = False
        for event, text in sorted(buffered, key=lambda pair: int(pair[0]["seq"])):
            self._deliver(key, watch, event, text)
        if job.status.terminal and not watch.done:
            # Postgres has the end, no event of it has come: it was on its way when the
            # stream was read (then the stream has it now), or it was never published.
            for event in (await self.services.events.read(key, after_seq=watch.last_seq)).events:
                self._deliver(key, watch, event, json.dumps(event, separators=(",", ":")))
            if not watch.done:
                await self._snapshot(key, watch, job, None)
        if watch.stale:
            self._resync(key, watch)

    async def _snapshot(self, key: str, watch: _Watch, job: Job, latest: dict[str, Any] | None) -> None:
        wire = await self.services.jobs.render(job)
        # The row was read after the stream, so it shows what every event there says
        # but progress, which Postgres has only as of the last heartbeat.
        if latest is not None and latest["seq"] > wire["last_seq"]:
            wire["last_seq"] = latest["seq"]
            if latest["type"] == "progress" and job.status is Status.PROCESSING:
                wire["progress"] = {"step": latest["step"], "total": latest["total"]}
        watch.last_seq = wire["last_seq"]
        terminal = job.status.terminal
        text = json.dumps(frames.snapshot(key, wire), separators=(",", ":"))
        self.push(Outgoing(text, "snapshot", key, watch.last_seq, terminal=terminal))
        if terminal:
            self._finish(key, watch)

    def _deliver(self, key: str, watch: _Watch, event: dict[str, Any], text: str) -> None:
        seq = int(event["seq"])
        if watch.done or seq <= watch.last_seq or seq <= watch.delivered:
            return
        watch.last_seq = watch.delivered = seq
        terminal = event["type"] in TERMINAL_TYPES
        self.push(Outgoing(text, event["type"], key, seq, terminal=terminal, preview="preview" in event))
        if terminal:
            self._finish(key, watch)

    def _finish(self, key: str, watch: _Watch) -> None:
        """A finished job sends nothing more: stop listening to its channel."""
        if watch.done:
            return
        watch.done = True
        self.hub.remove(self.channels.job(key), self)

    # -- called by the hub ----------------------------------------------------

    def on_event(self, event: dict[str, Any], text: str) -> None:
        key = event["job_id"]
        watch = self._watches.get(key)
        if watch is None:
            if not self.mine:
                return
            watch = self._watches[key] = _Watch(last_seq=0, syncing=False)
        if watch.done:
            return
        if watch.syncing:
            if len(watch.buffer) >= MAX_SYNC_BUFFER:
                watch.buffer.clear()  # replay again from the stream once this sync ends
                watch.stale = True
            watch.buffer.append((event, text))
        elif int(event["seq"]) > watch.last_seq + 1:
            # A gap: pub/sub lost something (or we joined mid-job). Re-sync from the stream.
            self._resync(key, watch)
        else:
            self._deliver(key, watch, event, text)

    def on_reconnect(self) -> None:
        for key, watch in self._watches.items():
            if watch.done:
                continue
            if watch.syncing:
                watch.stale = True  # it read before the reconnect: run again when done
            else:
                self._resync(key, watch)

    def _resync(self, key: str, watch: _Watch) -> None:
        watch.syncing = True
        self._spawn(self._sync_until_done(key, watch))

    async def _sync_until_done(self, key: str, watch: _Watch) -> None:
        """Re-sync, retrying with back-off while Redis or Postgres are unreachable."""
        delay_s = 0.1
        while not self._closed and self._watches.get(key) is watch:
            try:
                await self._sync(key, watch, watch.last_seq or None)
                return
            except NotFound:
                self._watches.pop(key, None)
                return
            except Exception as exc:
                stop_if_cancelled(exc)
                logger.warning("feed re-sync failed; retrying in %.1f s", delay_s, exc_info=True)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 5.0)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        if self._closed:
            coroutine.close()
            return
        task = asyncio.create_task(coroutine)
        if self._tasks is None:
            self._tasks = set()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _covers(stream: Stream, after_seq: int, last_seq: int) -> bool:
    """Does the stream hold every seq after ``after_seq`` up to Postgres' ``last_seq``, and is
    ``after_seq`` a seq the server knows at all (not one from before Redis lost its data)?"""
    if after_seq > max(stream.top, last_seq):
        return False
    expected = after_seq + 1
    for event in stream.events:
        if event["seq"] != expected:
            return False
        expected += 1
    return expected - 1 >= last_seq
