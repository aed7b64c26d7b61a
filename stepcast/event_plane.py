"""The event plane: the Redis that holds each job's event log, seq counter, checkpoint and
pub/sub channel, and the client that reaches it.

By default it is the queue's own Redis (one client for both). ``event_redis_url`` moves it to
another Redis; with ``event_redis_cluster``, to a Redis Cluster: every key and the channel of
one job share its slot (``{job_id}``), so its scripts run on one shard, and events fan out by
sharded pub/sub. Why and how far it scales: docs/scaling.md, "The event plane on Redis Cluster".
"""

from __future__ import annotations

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

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
        cluster: EventCluster = EventCluster.from_url(settings.event_redis_url, **CONNECTION_OPTIONS)
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
    for node in client.get_primaries():
        try:
            await client.execute_command("PING", target_nodes=node)
            return
        except RedisError:
            continue
    raise RedisConnectionError("no primary of the Redis Cluster answers")


async def close(client: RedisClient, queue: Redis) -> None:
    """Close the event plane's client, unless it is the queue's (closed by its owner)."""
    if client is queue:
        return
    if isinstance(client, Redis):
        await client.aclose(close_connection_pool=True)
    else:
        await client.aclose()
