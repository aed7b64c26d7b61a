"""The server's pub/sub subscriptions to the event plane, fanning events out to local feeds.

A :class:`Hub` is one subscriber connection: on a plain Redis, the process's only one; on a
Redis Cluster, one per primary, routed by :class:`server.shards.ClusterHub`. A channel is
subscribed while a local feed wants it; ``add`` returns once Redis has confirmed the
subscription, so a feed that reads the job's stream after it misses nothing. The changes of one
loop pass go to Redis together. After a lost connection the hub subscribes everything again and
asks every feed to re-sync. docs/design.md, "Events".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, cast

from redis.asyncio import Redis

from stepcast.background import cancel_and_wait, stop_if_cancelled
from stepcast.redis_keys import HUB_CHANNEL

logger = logging.getLogger(__name__)

RECONNECT_DELAY_S = (0.1, 0.25, 0.5, 1.0, 2.0)


class Listener(Protocol):
    def on_event(self, event: dict[str, Any], text: str) -> None: ...

    def on_reconnect(self) -> None: ...


class Subscriber(Protocol):
    """One pub/sub connection (redis-py's ``PubSub``, or a sharded one: server.shards), with
    its messages as ``PubSub.listen`` gives them."""

    async def connect(self) -> None: ...

    async def subscribe(self, *channels: str) -> Any: ...

    async def unsubscribe(self, *channels: str) -> Any: ...

    def listen(self) -> AsyncIterator[dict[str, Any]]: ...

    async def aclose(self) -> None: ...


class Subscriptions(Protocol):
    """What feeds subscribe through: a :class:`Hub`, or a cluster's hubs."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def add(self, channel: str, listener: Listener, timeout_s: float = 5.0) -> None: ...

    def remove(self, channel: str, listener: Listener) -> None: ...


class Hub:
    def __init__(
        self,
        subscriber: Callable[[], Subscriber],
        *,
        always: tuple[str, ...] = (),
        on_trouble: Callable[[], object] | None = None,
    ) -> None:
        """``subscriber`` makes the connection, again after each loss; ``always``: channels
        it keeps, so that it is never left with none; ``on_trouble`` hears of each loss, and of
        each channel in :attr:`dropped`."""
        self.subscriber = subscriber
        self.always = always
        self.on_trouble = on_trouble
        self._channels: dict[str, set[Listener]] = {}  # wanted, with who wants them
        self._subscribed: set[str] = set()  # as sent to Redis
        # UNSUBSCRIBEs sent and not yet answered: a SUBSCRIBE answered meanwhile is an old one.
        self._unsubscribing: Counter[str] = Counter()
        self._known: set[str] = set()  # wanted, or subscribed
        self._confirmed: set[str] = set()  # of those, what Redis confirmed since it (re)connected
        # Only while someone waits for Redis to confirm: thousands of idle sockets hold none.
        self._waiting: dict[str, asyncio.Event] = {}
        self._changed: set[str] = set()  # since the last flush
        self._flushing: asyncio.Task[None] | None = None
        self._pubsub: Subscriber | None = None
        self._task: asyncio.Task[None] | None = None
        self._announcing: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # a flush, or a (re)connect
        self.connected = asyncio.Event()
        # Wanted channels Redis dropped, or refused, though the connection lives (on a cluster:
        # their slot moved to another shard). Who routes them subscribes them again, elsewhere
        # or (:meth:`retry`) here.
        self.dropped: set[str] = set()

    @classmethod
    def plain(cls, redis: Redis) -> Hub:
        """The one connection of a server on a plain Redis."""
        pubsub = cast("Callable[[], Subscriber]", redis.pubsub)  # (redis-py leaves PubSub untyped)
        return cls(pubsub, always=(HUB_CHANNEL,))

    @property
    def wanted(self) -> bool:
        """Does a feed want a channel of it?"""
        return bool(self._channels)

    def take(self, channel: str) -> set[Listener]:
        """Stop delivering the channel; who wanted it (to be added to another hub)."""
        listeners = set(self._channels.get(channel, ()))
        for listener in listeners:
            self.remove(channel, listener)
        return listeners

    def has(self, channel: str) -> bool:
        """Does a listener want the channel?"""
        return channel in self._channels

    def listeners(self, channel: str) -> set[Listener]:
        return set(self._channels.get(channel, ()))

    def retry(self, channel: str) -> None:
        """Subscribe a dropped channel again."""
        self.dropped.discard(channel)
        if channel in self._channels and channel not in self._known:
            self._known.add(channel)
            self._change(channel)

    async def start(self) -> None:
        self.start_soon()

    def start_soon(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event-hub")

    async def stop(self) -> None:
        for task in (self._task, self._announcing, self._flushing):
            if task is not None:
                await cancel_and_wait(task)
        if self._pubsub is not None:
            await self._pubsub.aclose()

    async def add(self, channel: str, listener: Listener, timeout_s: float = 5.0) -> None:
        """Deliver the channel's messages to ``listener``, from when Redis confirms it on."""
        self.attach(channel, listener)
        await self.confirmed(channel, timeout_s)

    def attach(self, channel: str, listener: Listener) -> None:
        """:meth:`add`, without waiting for Redis to confirm."""
        group = self._channels.setdefault(channel, set())
        group.add(listener)
        if channel not in self._known:
            self._known.add(channel)
            self._change(channel)

    async def confirmed(self, channel: str, timeout_s: float = 5.0) -> None:
        """Once Redis confirmed the channel (or nobody wants it any more)."""
        if channel in self._confirmed or channel not in self._channels:
            return  # (a flush drops what is no longer wanted)
        confirmed = self._waiting.setdefault(channel, asyncio.Event())
        async with asyncio.timeout(timeout_s):
            await confirmed.wait()

    def remove(self, channel: str, listener: Listener) -> None:
        group = self._channels.get(channel)
        if group is None or listener not in group:
            return
        group.discard(listener)
        if not group:
            del self._channels[channel]
            self.dropped.discard(channel)
            self._change(channel)

    def _change(self, channel: str) -> None:
        self._changed.add(channel)
        if self._flushing is None:
            self._flushing = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        """Bring Redis' subscriptions in line with the wanted channels (those changed since the
        last flush): one SUBSCRIBE and one UNSUBSCRIBE for all of them."""
        try:
            while self._changed:
                async with self._lock:
                    changed, self._changed = self._changed, set()
                    dropped = [c for c in changed if c not in self._channels]
                    for channel in dropped:  # wanted again, it waits for a new confirmation
                        self._known.discard(channel)
                        self._confirmed.discard(channel)
                        if (waiting := self._waiting.pop(channel, None)) is not None:
                            waiting.set()  # none waits for it now but a reconnect's announcement
                    if self._pubsub is None or not self.connected.is_set():
                        continue  # the (re)connect subscribes every wanted channel
                    subscribe = [c for c in changed if c in self._channels and c not in self._subscribed]
                    unsubscribe = [c for c in dropped if c in self._subscribed]
                    self._subscribed.update(subscribe)
                    self._subscribed.difference_update(unsubscribe)
                    with contextlib.suppress(Exception):  # a broken connection re-subscribes on reconnect
                        if subscribe:
                            await self._pubsub.subscribe(*subscribe)
                        if unsubscribe:
                            self._unsubscribing.update(unsubscribe)
                            await self._pubsub.unsubscribe(*unsubscribe)
        finally:
            self._flushing = None

    async def _connect(self) -> Subscriber:
        pubsub = self.subscriber()
        async with self._lock:
            for channel in [c for c in self._waiting if c not in self._channels]:
                self._waiting.pop(channel).set()  # no longer wanted: nothing to wait for
            self._known = set(self._channels)
            self._confirmed.clear()
            self._subscribed = set(self._channels)
            self._changed.clear()
            self._unsubscribing.clear()
            if self.always or self._channels:
                await pubsub.subscribe(*self.always, *self._channels)
            else:
                await pubsub.connect()
        return pubsub

    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                self._pubsub = await self._connect()
                self.connected.set()
                if attempt:
                    if self._announcing is not None:  # (of a connection lost since)
                        self._announcing.cancel()
                    self._announcing = asyncio.create_task(self._announce_reconnect())
                attempt = 0
                async for message in self._pubsub.listen():
                    self._dispatch(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                stop_if_cancelled(exc)
                self.connected.clear()
                if self.on_trouble is not None:
                    self.on_trouble()
                delay = RECONNECT_DELAY_S[min(attempt, len(RECONNECT_DELAY_S) - 1)]
                attempt += 1
                logger.warning("event hub lost Redis (%s); retrying in %.2f s", exc, delay)
                if self._pubsub is not None:
                    with contextlib.suppress(Exception):
                        await self._pubsub.aclose()
                    self._pubsub = None
                await asyncio.sleep(delay)

    async def _announce_reconnect(self) -> None:
        """Once Redis confirmed every subscription again, tell each feed to re-sync."""
        unconfirmed = [self._waiting.setdefault(c, asyncio.Event()) for c in self._known - self._confirmed]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await asyncio.gather(*(event.wait() for event in unconfirmed))
        logger.warning("event hub reconnected to Redis; re-syncing feeds")
        for listener in {member for group in self._channels.values() for member in group}:
            listener.on_reconnect()

    def _dispatch(self, message: dict[str, Any]) -> None:
        channel = message["channel"].decode()
        kind = message["type"]
        if kind == "refused":  # a sharded (UN)SUBSCRIBE refused: not this node's slot (MOVED)
            kind = "unsubscribe" if message["data"] == "SUNSUBSCRIBE" else "dropped"
        if kind == "unsubscribe" and not self._unsubscribing[channel] and channel in self._subscribed:
            kind = "dropped"  # nobody asked: its slot moved to another shard
        if kind == "dropped":
            self._subscribed.discard(channel)
            self._confirmed.discard(channel)
            self._known.discard(channel)
            if channel in self._channels:
                self.dropped.add(channel)
                if self.on_trouble is not None:
                    self.on_trouble()
            return
        if kind == "unsubscribe":
            if self._unsubscribing[channel] > 1:
                self._unsubscribing[channel] -= 1
            else:
                self._unsubscribing.pop(channel, None)
            return
        if kind == "subscribe":
            if self._unsubscribing[channel]:
                # Answers come in order: this SUBSCRIBE came before an UNSUBSCRIBE not yet
                # answered, so Redis has dropped the channel since; a new SUBSCRIBE follows.
                return
            if channel in self._known:
                self._confirmed.add(channel)
            confirmed = self._waiting.pop(channel, None)
            if confirmed is not None:
                confirmed.set()
            return
        if kind != "message":
            return
        group = self._channels.get(channel)
        if not group:
            return
        text = message["data"].decode()
        event = json.loads(text)
        for listener in list(group):
            listener.on_event(event, text)
