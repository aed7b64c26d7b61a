"""The event plane: the Redis that holds each job's event log, seq counter, checkpoint and
pub/sub channel, and the client that reaches it.

By default it is the queue's own Redis (one client for both). ``event_redis_url`` moves it to
another Redis; with ``event_redis_cluster``, to a Redis Cluster: every key and the channel of
one job share its slot (``{job_id}``), so its scripts run on one shard, and events fan out by
sharded pub/sub. Why and how far it scales: docs/scaling.md, "The event plane on Redis Cluster".
"""

from __future__ import annotations

import asyncio

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException

from stepcast.queue import CONNECTION_OPTIONS
from stepcast.redis_keys import Channels
from stepcast.round_trips import RedisClient
from stepcast.settings import SharedSettings


class EventCluster(RedisCluster):
    """redis-py's cluster client, except that finding no reachable node is a
    ``ConnectionError`` (a ``RedisError``), as it is for a plain client: callers that carry on
    without Redis (the event log's emitters) carry on without the cluster too."""

    async def initialize(self) -> EventCluster:
        try:
            await super().initialize()
        except RedisClusterException as exc:
            raise RedisConnectionError(str(exc)) from exc
        return self


def connect(settings: SharedSettings, queue: Redis) -> RedisClient:
    """The event plane's client: ``queue`` itself unless the settings name another Redis.
    Lazy, like the queue's: a process starts (and reports not ready) while it is down."""
    if settings.event_redis_url is None:
        return queue
    if settings.event_redis_cluster:
        # One retry after a lost connection (0 is not a value redis-py 5 can take): a script sent
        # to a node that died may have run there, and runs again where its slot lives now.
        cluster: EventCluster = EventCluster.from_url(
            settings.event_redis_url, cluster_error_retry_attempts=1, **CONNECTION_OPTIONS
        )
        return cluster
    return Redis(connection_pool=ConnectionPool.from_url(settings.event_redis_url, **CONNECTION_OPTIONS))


def channels(settings: SharedSettings) -> Channels:
    return Channels(sharded=settings.event_redis_cluster)


async def ping(client: RedisClient) -> None:
    """Raise unless the event plane answers. On a cluster, one primary answering is enough: a
    shard failing over leaves a server ready, serving the other shards' jobs."""
    if isinstance(client, Redis):
        await client.ping()
        return
    await client.initialize()
    # Each node's own connection, all at once: the cluster client's PING would wait for a node
    # that does not answer, then close the client's connections to every node.
    pings = {asyncio.ensure_future(node.execute_command("PING")) for node in client.get_primaries()}
    try:
        while pings:
            done, pings = await asyncio.wait(pings, return_when=asyncio.FIRST_COMPLETED)
            if any(not ping.exception() for ping in done):
                return
    finally:
        for ping in pings:  # (a cancelled read drops its connection: no stray reply is left)
            ping.cancel()
    raise RedisConnectionError("no primary of the Redis Cluster answers")


async def close(client: RedisClient, queue: Redis) -> None:
    """Close the event plane's client, unless it is the queue's (closed by its owner)."""
    if client is queue:
        return
    if isinstance(client, Redis):
        await client.aclose(close_connection_pool=True)
    else:
        await client.aclose()
