"""The server's one pub/sub connection to Redis: channels added or dropped in one pass of
the event loop go to Redis in one command, and each listener hears its own channels."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from redis.asyncio import Redis

from server.hub import Hub
from tests.conftest import eventually


class Heard:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def on_event(self, event: dict[str, Any], text: str) -> None:
        self.events.append(event)

    def on_reconnect(self) -> None:
        pass


async def calls(redis: Redis, command: str) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_channels_added_or_dropped_together_go_to_redis_in_one_command(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    hub = Hub.plain(redis)
    await hub.start()
    try:
        await asyncio.wait_for(hub.connected.wait(), 10)
        await redis.config_resetstat()
        channels = [f"stepcast:test:{i}" for i in range(10)]
        listeners = [Heard() for _ in channels]
        await asyncio.gather(*(hub.add(c, heard) for c, heard in zip(channels, listeners, strict=True)))
        assert await calls(redis, "subscribe") == 1  # confirmed, all ten in one SUBSCRIBE
        for index, channel in enumerate(channels):
            await redis.publish(channel, json.dumps({"n": index}))

        async def all_heard() -> bool:
            return all(heard.events for heard in listeners)

        await eventually(all_heard)
        assert [heard.events for heard in listeners] == [[{"n": i}] for i in range(10)]

        for channel, heard in zip(channels[:5], listeners[:5], strict=True):  # five jobs finish at once
            hub.remove(channel, heard)
        again = Heard()  # the first is wanted again before its UNSUBSCRIBE went out: it stays
        await hub.add(channels[0], again)

        async def dropped() -> bool:
            counts = dict(await redis.pubsub_numsub(*channels[:6]))
            return [counts[c.encode()] for c in channels[:6]] == [1, 0, 0, 0, 0, 1]

        await eventually(dropped)
        assert await calls(redis, "unsubscribe") == 1 and await calls(redis, "subscribe") == 1
        await redis.publish(channels[0], json.dumps({"n": "again"}))
        await redis.publish(channels[1], json.dumps({"n": "gone"}))
        await redis.publish(channels[5], json.dumps({"n": "still"}))

        async def heard_the_rest() -> bool:
            return bool(again.events) and len(listeners[5].events) == 2

        await eventually(heard_the_rest)
        assert again.events == [{"n": "again"}] and listeners[0].events == [{"n": 0}]
        assert listeners[1].events == [{"n": 1}] and listeners[5].events == [{"n": 5}, {"n": "still"}]
    finally:
        await hub.stop()
        await redis.aclose(close_connection_pool=True)


async def test_a_channel_wanted_again_waits_for_its_new_subscribe_not_the_old_ones_answer(
    redis_url: str, monkeypatch: Any
) -> None:
    redis = Redis.from_url(redis_url)
    hub = Hub.plain(redis)
    await hub.start()
    held: list[dict[str, Any]] = []  # Redis' answers on the channel, handed over one by one
    dispatch = hub._dispatch

    def hold(message: dict[str, Any]) -> None:
        held.append(message) if message["channel"] == b"stepcast:test:again" else dispatch(message)

    monkeypatch.setattr(hub, "_dispatch", hold)
    try:
        await asyncio.wait_for(hub.connected.wait(), 10)
        first, second = Heard(), Heard()
        adding = asyncio.create_task(hub.add("stepcast:test:again", first))
        await eventually(lambda: asyncio.sleep(0, len(held) == 1))  # SUBSCRIBE answered
        hub.remove("stepcast:test:again", first)
        await eventually(lambda: asyncio.sleep(0, len(held) == 2))  # UNSUBSCRIBE answered
        again = asyncio.create_task(hub.add("stepcast:test:again", second))
        await eventually(lambda: asyncio.sleep(0, len(held) == 3))  # SUBSCRIBE again
        assert [m["type"] for m in held] == ["subscribe", "unsubscribe", "subscribe"]
        dispatch(held[0])  # the first SUBSCRIBE's answer: Redis has since dropped the channel
        await asyncio.sleep(0.05)
        assert not again.done()  # it would read the job's log while nothing is subscribed
        for message in held[1:]:
            dispatch(message)
        await asyncio.wait_for(again, 5)
        adding.cancel()
    finally:
        await hub.stop()
        await redis.aclose(close_connection_pool=True)
