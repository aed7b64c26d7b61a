"""A server's subscriptions to an event plane on Redis Cluster: one connection per primary.

Each channel is sharded (``SSUBSCRIBE``) on the primary that serves its slot, through that
node's :class:`~server.hub.Hub`. redis-py 5 (arq's pin) has no pub/sub on its asyncio cluster
client, so :class:`ShardSubscriber` speaks it on one plain connection, and :class:`ClusterHub`
follows ``CLUSTER SHARDS``: read at start, every ``check_s``, at once after a node's connection
fails (and every half second until each wanted node is back), or after a node refused or dropped
a channel (MOVED, a slot migrated away). A channel whose slot moved is subscribed on its new
primary, and its feeds re-sync from the job's stream there. docs/scaling.md, "The event plane
on Redis Cluster".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from redis.asyncio.connection import Connection, SSLConnection, parse_url
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import ResponseError

from server.hub import Hub, Listener
from stepcast.background import cancel_and_wait
from stepcast.queue import CONNECTION_OPTIONS

logger = logging.getLogger(__name__)

UNHEALTHY_CHECK_S = 0.5  # how often the shards are read while a wanted node is unreachable
COALESCE_S = 0.05  # news of one change (from several hubs) leads to one reading of the shards
SUBSCRIBE_TIMEOUT_S = 5.0

# Redis' sharded pub/sub messages, named as redis-py's PubSub names the plain ones; the
# command each of the first two answers (a sunsubscribe may come unasked: its slot moved).
_KINDS = {b"ssubscribe": "subscribe", b"sunsubscribe": "unsubscribe", b"smessage": "message"}
_ANSWERS = {b"ssubscribe": "SSUBSCRIBE", b"sunsubscribe": "SUNSUBSCRIBE"}


@dataclass(frozen=True)
class Node:
    host: str
    port: int

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Topology:
    """Which primary serves each slot, and every node known (to ask next time)."""

    primaries: list[Node | None]  # by slot
    nodes: frozenset[Node]

    @classmethod
    def parse(cls, shards: list[Any], asked: Node, *, tls: bool = False) -> Topology:
        """From a ``CLUSTER SHARDS`` reply (Redis 7) of node ``asked``: each shard's slot
        ranges and nodes (at their TLS ports, if ``tls`` and they have one)."""
        primaries: list[Node | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        nodes: set[Node] = set()
        for shard in shards:
            fields = _pairs(shard)
            masters = []
            for description in fields[b"nodes"]:
                node_fields = _pairs(description)
                host = node_fields.get(b"endpoint") or node_fields[b"ip"]
                if host == b"?":
                    continue  # an endpoint not known yet
                # Empty: "where you asked" (a node that has met no other does not know its address).
                ports = (b"tls-port", b"port") if tls else (b"port", b"tls-port")
                port = int(next(node_fields[name] for name in ports if node_fields.get(name)))
                node = Node(host.decode() or asked.host, port)
                nodes.add(node)
                if node_fields[b"role"] == b"master":
                    masters.append((node_fields.get(b"health") != b"online", node))
            # After a failover the old primary may be listed too, failed, until it comes back
            # as a replica: the one online serves the slots.
            primary = min(masters, key=lambda pair: pair[0])[1] if masters else None
            slots = fields[b"slots"]
            for start, end in zip(slots[::2], slots[1::2], strict=True):
                primaries[int(start) : int(end) + 1] = [primary] * (int(end) - int(start) + 1)
        return cls(primaries, frozenset(nodes))

    def primary_of(self, channel: str) -> Node | None:
        return self.primaries[key_slot(channel.encode())]


def _pairs(flat: list[Any]) -> dict[bytes, Any]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


class ShardSubscriber:
    """Sharded pub/sub on one plain connection to one node, with its messages as redis-py's
    ``PubSub.listen`` gives plain ones, and one more: ``refused``, a command the node answered
    with an error (MOVED: the channel's slot is not this node's), naming its channel and the
    command. The connection lives on; the hub routes the channel again."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._sent: deque[tuple[str, str]] = deque()  # (command, channel) not yet answered

    async def connect(self) -> None:
        await self._connection.connect()  # type: ignore[no-untyped-call]

    async def subscribe(self, *channels: str) -> None:
        await self._send("SSUBSCRIBE", channels)

    async def unsubscribe(self, *channels: str) -> None:
        await self._send("SUNSUBSCRIBE", channels)

    async def _send(self, command: str, channels: tuple[str, ...]) -> None:
        # One command per channel: the channels of one command must share a slot.
        commands = [(command, channel) for channel in channels]
        self._sent.extend(commands)
        await self._connection.send_packed_command(self._connection.pack_commands(commands))

    async def listen(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            try:
                kind, channel, data = await self._connection.read_response()
            except ResponseError:
                if not self._sent:
                    raise
                command, refused = self._sent.popleft()
                yield {"type": "refused", "channel": refused.encode(), "data": command}
                continue
            answered = _ANSWERS.get(kind)
            if answered is not None and self._sent and self._sent[0] == (answered, channel.decode()):
                self._sent.popleft()
            yield {"type": _KINDS.get(kind, kind.decode()), "channel": channel, "data": data}

    async def aclose(self) -> None:
        await self._connection.disconnect()


class ClusterHub:
    """The :class:`~server.hub.Subscriptions` of a server on a Redis Cluster: a hub per primary
    that serves a wanted channel, each channel on the one serving its slot now."""

    def __init__(self, url: str, *, check_s: float) -> None:
        options: dict[str, Any] = {key: value for key, value in parse_url(url).items() if key != "db"}
        self._seed = Node(options.pop("host", "127.0.0.1"), int(options.pop("port", 6379)))
        self._options = {**CONNECTION_OPTIONS, **options}
        self._tls = options.get("connection_class") is SSLConnection  # rediss://
        self.check_s = check_s
        self._topology: Topology | None = None
        self._hubs: dict[Node, Hub] = {}
        self._homes: dict[str, Node] = {}  # each wanted channel: the primary whose hub has it
        self._trouble = asyncio.Event()
        self._known = asyncio.Event()  # a topology was read
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._follow(), name="event-hub-shards")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
        for hub in self._hubs.values():
            await hub.stop()

    async def add(self, channel: str, listener: Listener, timeout_s: float = 5.0) -> None:
        async with asyncio.timeout(timeout_s):
            await self._known.wait()
            while True:
                node = self._homes.get(channel) or self._home_of(channel)
                self._homes[channel] = node
                await self._hub(node).add(channel, listener, timeout_s)
                if self._homes.get(channel) == node:
                    return
                if (left := self._hubs.get(node)) is not None:  # it moved meanwhile: add it there
                    left.remove(channel, listener)

    def remove(self, channel: str, listener: Listener) -> None:
        node = self._homes.get(channel)
        hub = self._hubs.get(node) if node is not None else None
        if hub is not None:
            hub.remove(channel, listener)
        if hub is None or not hub.has(channel):
            self._homes.pop(channel, None)

    def _home_of(self, channel: str) -> Node:
        assert self._topology is not None
        node = self._topology.primary_of(channel)
        if node is None:
            raise ConnectionError(f"no primary serves the slot of {channel} now")
        return node

    def _hub(self, node: Node) -> Hub:
        hub = self._hubs.get(node)
        if hub is None:
            hub = Hub(lambda: ShardSubscriber(self._connection(node)), on_trouble=self._trouble.set)
            self._hubs[node] = hub
            hub.start_soon()
        return hub

    async def _follow(self) -> None:
        """Read the shards now, then on trouble, every ``check_s``, and often while a wanted
        node is down or a channel is dropped; move what moved."""
        failures = 0
        while True:
            try:
                await self._refresh()
                failures = 0
            except Exception as exc:
                failures += 1  # said once, then once a minute while it lasts
                if failures == 1 or failures % int(60 / UNHEALTHY_CHECK_S) == 0:
                    logger.warning("could not read the Redis Cluster's shards: %s", exc)
            healthy = self._known.is_set() and all(
                hub.connected.is_set() and not hub.dropped for hub in self._hubs.values() if hub.wanted
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.check_s if healthy else UNHEALTHY_CHECK_S):
                    await self._trouble.wait()
            await asyncio.sleep(COALESCE_S)  # the other hubs' news of the same change
            self._trouble.clear()

    async def _refresh(self) -> None:
        """Read the shards; subscribe each channel whose slot moved on its new primary, and each
        a node dropped where its slot lives now; then tell their feeds to re-sync."""
        topology = await self._read_topology()
        self._topology = topology
        self._known.set()
        # No await until every channel is where it belongs: a feed that goes meanwhile finds
        # its channel's home as it is.
        resubscribed: list[tuple[str, Hub]] = []
        for channel, node in list(self._homes.items()):
            home = topology.primary_of(channel)
            if home is None or home == node:
                continue
            left = self._hubs.get(node)
            listeners = left.take(channel) if left is not None else set()
            self._homes[channel] = home
            for listener in listeners:
                self._hub(home).attach(channel, listener)
            resubscribed.append((channel, self._hub(home)))
        for hub in list(self._hubs.values()):
            for channel in list(hub.dropped):
                hub.retry(channel)
                resubscribed.append((channel, hub))
        if resubscribed:
            logger.warning("event channels subscribed again", extra={"channels": len(resubscribed)})
            with contextlib.suppress(TimeoutError):  # (one not confirmed stays wanted: a retry follows)
                async with asyncio.timeout(SUBSCRIBE_TIMEOUT_S):
                    await asyncio.gather(*(hub.confirmed(channel) for channel, hub in resubscribed))
            # What was published meanwhile is in each job's stream (or, after a failover, a
            # snapshot stands for it).
            for listener in {each for channel, hub in resubscribed for each in hub.listeners(channel)}:
                listener.on_reconnect()
        for node, hub in list(self._hubs.items()):
            if not hub.wanted and node not in topology.primaries:
                del self._hubs[node]
                await hub.stop()

    async def _read_topology(self) -> Topology:
        """``CLUSTER SHARDS`` from the first node that answers: those known, then the seed."""
        known = self._topology.nodes if self._topology is not None else frozenset()
        failure: Exception | None = None
        for node in [*sorted(known, key=lambda n: n.name), self._seed]:
            connection = self._connection(node)
            try:
                await connection.connect()  # type: ignore[no-untyped-call]
                await connection.send_command("CLUSTER", "SHARDS")
                return Topology.parse(await connection.read_response(), node, tls=self._tls)
            except Exception as exc:
                failure = exc
            finally:
                await connection.disconnect()
        raise ConnectionError(f"no node of the Redis Cluster answered ({failure})")

    def _connection(self, node: Node) -> Connection:
        """A plain connection to ``node`` (the URL's credentials and TLS), without health
        checks: a subscriber's PING would be read in place of a message."""
        options = {**self._options, "host": node.host, "port": node.port, "health_check_interval": 0}
        connection_class = options.pop("connection_class", Connection)
        connection: Connection = connection_class(**options)
        return connection
