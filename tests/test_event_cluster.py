"""The event plane on a Redis Cluster (three primaries with a replica each, on loopback).

The event log's, the socket feeds' and the resume tests of a plain Redis run again here, on
the cluster; then what only a cluster does: each job's keys and channel share a slot, a
server's channels spread over every shard, a slot that moves to another shard, and a primary
killed while watchers watch (its replica takes over; they resume with no gap).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
import websockets
from redis.asyncio import Redis
from redis.crc import key_slot

from server.hub import Hub
from server.shards import ClusterHub, Node, ShardSubscriber, Topology
from stepcast.cli.processes import LocalRedis, LocalRedisCluster
from stepcast.event_plane import EventCluster
from stepcast.events import EventLog
from stepcast.redis_keys import Channels, checkpoint_key, event_keys
from stepcast.settings import DATA_DIR, Settings
from tests import test_events, test_realtime
from tests.conftest import StepcastProcess, eventually
from tests.test_realtime import is_terminal, recv, send, until

SHARDED = Channels(sharded=True)


@pytest.fixture
def event_plane() -> str:
    return "cluster"  # every stack and setting of this module: tests/conftest.py


@pytest.fixture
async def log(event_plane_settings: dict[str, Any]) -> AsyncIterator[EventLog]:
    """The event log of tests/test_events.py, on the cluster."""
    cluster = EventCluster.from_url(event_plane_settings["event_redis_url"])
    yield EventLog(cluster, stream_max=100, ttl_s=60, channels=SHARDED)
    await cluster.aclose()


# The event log: seqs, blocks, fences and a log's end, as on one Redis.
for _name in [n for n in dir(test_events) if n.startswith("test_a") or n.startswith("test_seqs")]:
    if "pipelined" not in _name and "round_trip" not in _name and "unreachable" not in _name:
        globals()[_name] = getattr(test_events, _name)
test_position_updates = (
    test_events.test_position_updates_never_precede_the_submit_or_follow_start_or_a_reserved_seq
)

# The socket and SSE feeds: live, resumed, many watchers, an owner's feed, two servers.
test_submit_streams_every_step_in_order = test_realtime.test_submit_streams_every_step_in_order
test_resume_after_a_drop = test_realtime.test_resume_after_a_drop_misses_nothing_and_repeats_nothing
test_many_watchers_and_many_jobs = test_realtime.test_many_watchers_and_many_jobs_on_one_connection
test_finished_job_answers_with_its_final_snapshot = (
    test_realtime.test_finished_job_answers_with_its_final_snapshot
)
test_cancel_over_the_socket = test_realtime.test_cancel_over_the_socket_stops_within_a_step
test_owner_feed = test_realtime.test_owner_feed_sees_jobs_from_elsewhere_and_finished_ones
test_sse_streams_and_resumes = test_realtime.test_sse_streams_and_resumes_with_last_event_id
second_server = test_realtime.second_server
test_two_servers = test_realtime.test_a_client_on_one_server_sees_a_job_submitted_through_another


def test_a_jobs_keys_and_channel_share_its_slot() -> None:
    job_id = "6f1c2d4e-0000-4000-8000-000000000001"
    slots = {
        key_slot(name.encode()) for name in (*event_keys(job_id), checkpoint_key(job_id), SHARDED.job(job_id))
    }
    assert len(slots) == 1  # one script reaches them all, on one shard
    assert SHARDED.owner("o") != SHARDED.job("o") and SHARDED.publish == "SPUBLISH"


class Heard:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.reconnects = 0

    def on_event(self, event: dict[str, Any], text: str) -> None:
        self.events.append(event)

    def on_reconnect(self) -> None:
        self.reconnects += 1


def a_job_on(topology: Topology, node: Node) -> str:
    """A job id whose slot ``node`` serves."""
    return next(f"job-{n}" for n in range(10_000) if topology.primary_of(SHARDED.job(f"job-{n}")) == node)


async def primaries_of(url: str) -> Topology:
    hub = ClusterHub(url, check_s=60)
    return await hub._read_topology()


async def test_a_servers_channels_spread_over_every_shard_and_hear_both_channels(
    log: EventLog, event_plane_settings: dict[str, Any]
) -> None:
    url = event_plane_settings["event_redis_url"]
    topology = await primaries_of(url)
    jobs: dict[Node, str] = {}
    for n in range(200):  # a job on each shard
        job_id = f"job-{n}"
        node = topology.primary_of(SHARDED.job(job_id))
        assert node is not None
        jobs.setdefault(node, job_id)
    assert len(jobs) == 3
    hub = ClusterHub(url, check_s=60)
    await hub.start()
    try:
        listeners = {job_id: Heard() for job_id in jobs.values()}
        mine = Heard()
        await hub.add(SHARDED.owner("o"), mine)
        for job_id, heard in listeners.items():
            await hub.add(SHARDED.job(job_id), heard)
        assert set(hub._hubs) == set(jobs) | {topology.primary_of(SHARDED.owner("o"))}
        for job_id in listeners:
            await log.emit(job_id, "o", test_events.QUEUED, attempt=1, block=test_events.FIRST)
        await eventually(
            lambda: asyncio.sleep(0, all(h.events for h in listeners.values()) and len(mine.events) == 3)
        )
        assert all([e["job_id"] for e in heard.events] == [job_id] for job_id, heard in listeners.items())
        assert sorted(e["job_id"] for e in mine.events) == sorted(listeners)
    finally:
        await hub.stop()


@pytest.fixture
def own_cluster() -> Iterator[LocalRedisCluster]:
    """A cluster only this test uses: it moves slots and kills nodes."""
    cluster = LocalRedisCluster(DATA_DIR / "test" / f"redis-cluster-{id(object())}")
    cluster.start()
    yield cluster
    cluster.stop()


def node_id(cluster: LocalRedisCluster, node: LocalRedis) -> str:
    return cluster.cli(node, "CLUSTER", "MYID").strip()


async def test_a_channel_follows_its_slot_to_another_shard(own_cluster: LocalRedisCluster) -> None:
    hub = ClusterHub(own_cluster.url(), check_s=60)
    await hub.start()
    events = EventCluster.from_url(own_cluster.url())
    try:
        topology = await primaries_of(own_cluster.url())
        channel = SHARDED.job("moving")
        home = topology.primary_of(channel)
        assert home is not None
        neighbour = SHARDED.job(a_job_on(topology, home))  # on the same shard; its slot stays
        heard, stays = Heard(), Heard()
        await hub.add(channel, heard)
        await hub.add(neighbour, stays)
        slot = key_slot(channel.encode())
        source = next(node for node in own_cluster.nodes if node.port == home.port)
        target = next(node for node in own_cluster.primaries() if node is not source)
        source_id, target_id = node_id(own_cluster, source), node_id(own_cluster, target)
        # Redis' own resharding steps, for a slot with no keys.
        own_cluster.cli(target, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", source_id)
        own_cluster.cli(source, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", target_id)
        for node in (target, source):
            own_cluster.cli(node, "CLUSTER", "SETSLOT", str(slot), "NODE", target_id)
        # The source dropped the channel; the hub read the shards again and subscribed on the target.
        await eventually(lambda: asyncio.sleep(0, heard.reconnects >= 1), timeout_s=10)
        await eventually(lambda: asyncio.sleep(0, Node("127.0.0.1", target.port) in hub._hubs), timeout_s=10)

        async def heard_both() -> bool:
            await events.execute_command("SPUBLISH", channel, '{"seq": 1}')
            await events.execute_command("SPUBLISH", neighbour, '{"seq": 1}')
            await asyncio.sleep(0.05)
            return bool(heard.events and stays.events)

        await eventually(heard_both, timeout_s=10)
        # The source's connection lived on: its other channels lost nothing, so re-sync nothing.
        assert stays.reconnects == 0
    finally:
        await hub.stop()
        await events.aclose()


async def test_a_channel_a_node_refuses_is_dropped_and_its_connection_lives_on(
    log: EventLog, event_plane_settings: dict[str, Any]
) -> None:
    url = event_plane_settings["event_redis_url"]
    topology = await primaries_of(url)
    channel = SHARDED.job("elsewhere")
    wrong = next(node for node in set(topology.primaries) if node not in (None, topology.primary_of(channel)))
    assert wrong is not None
    hub = ClusterHub(url, check_s=60)
    troubles = []
    line = Hub(lambda: ShardSubscriber(hub._connection(wrong)), on_trouble=lambda: troubles.append(1))
    await line.start()
    try:
        job = a_job_on(topology, wrong)
        heard, refused = Heard(), Heard()
        await line.add(SHARDED.job(job), heard)
        adding = asyncio.create_task(line.add(channel, refused))  # MOVED: not this node's slot
        await eventually(lambda: asyncio.sleep(0, channel in line.dropped), timeout_s=5)
        assert troubles and line.connected.is_set() and not adding.done()
        await log.emit(job, "o", test_events.QUEUED, attempt=1, block=test_events.FIRST)
        await eventually(lambda: asyncio.sleep(0, bool(heard.events)), timeout_s=5)
        assert heard.reconnects == 0  # the connection never dropped
        line.remove(channel, refused)  # (its router would have moved it)
        await asyncio.wait_for(adding, 5)
    finally:
        await line.stop()


def follows_the_rules(messages: list[dict[str, Any]]) -> None:
    """The durable-seq rules, as one watcher sees them: events only go forward; each is the
    next seq, unless a snapshot (of Postgres and the stream) stands for what came before it;
    and the end is the job's terminal state."""
    last = 0
    for message in messages:
        if message["type"] == "snapshot":
            assert message["job"]["last_seq"] >= last, messages
            last = message["job"]["last_seq"]
        else:
            assert message["seq"] == last + 1 or (last == 0 and message["seq"] > 0), messages
            last = message["seq"]
    assert is_terminal(messages[-1]), messages[-1]


SLOW = {"backend": "simulated", "simulated_step_s": 0.05}  # 100 steps: a 5 s job


async def test_a_primary_killed_while_watchers_watch_loses_them_nothing(
    own_cluster: LocalRedisCluster,
    make_settings: Callable[..., Settings],
    serve: Callable[[Settings], Awaitable[str]],
    spawn: Callable[[str, Settings], Awaitable[StepcastProcess]],
) -> None:
    plane = {"event_redis_url": own_cluster.url(), "event_redis_cluster": True, **SLOW}
    base = await serve(make_settings(**plane))
    await spawn("gpu_worker.worker", make_settings(**plane))
    ws_url = base.replace("http://", "ws://") + "/v1/ws"
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        job_id = (await client.post("/v1/jobs", json={"prompt": "p", "steps": 100})).json()["id"]
        async with websockets.connect(ws_url) as watcher, websockets.connect(ws_url) as owner:
            await send(owner, {"type": "subscribe", "scope": "mine"})
            await send(watcher, {"type": "subscribe", "job_id": job_id, "after_seq": 0})
            before = await until(watcher, lambda m: m["type"] == "progress" and m["step"] >= 5)
            topology = await primaries_of(own_cluster.url())
            home = topology.primary_of(SHARDED.job(job_id))
            assert home is not None
            next(node for node in own_cluster.nodes if node.port == home.port).kill()
            after = await asyncio.wait_for(until(watcher, is_terminal), 60)
            mine = await asyncio.wait_for(
                until(owner, lambda m: m.get("job_id") == job_id and is_terminal(m)), 30
            )
        job = (await client.get(f"/v1/jobs/{job_id}")).json()
        assert job["status"] == "completed"
        watched = before + after
        follows_the_rules(watched)
        # The new primary's counter was not trusted (another replication history): the seqs
        # after the failover are a fresh block's, above any a watcher may have seen.
        assert watched[-1]["seq"] > 1024
        follows_the_rules([m for m in mine if m.get("job_id") == job_id])
        # A client that dropped before the failover resumes from the seq it saw last.
        async with websockets.connect(ws_url) as late:
            await send(late, {"type": "subscribe", "job_id": job_id, "after_seq": before[-1]["seq"]})
            resumed = await until(late, is_terminal)
        follows_the_rules(before + resumed)
    new = (await primaries_of(own_cluster.url())).primary_of(SHARDED.job(job_id))
    assert new is not None and new != home  # its replica serves the slot now


async def test_an_event_plane_on_another_plain_redis_has_every_event_and_the_queue_none(
    own_redis: LocalRedis,
    make_settings: Callable[..., Settings],
    serve: Callable[[Settings], Awaitable[str]],
    run_worker: Callable[..., Awaitable[None]],
) -> None:
    settings = make_settings(event_redis_url=own_redis.url(), event_redis_cluster=False)
    base = await serve(settings)
    await run_worker(settings)
    async with websockets.connect(base.replace("http://", "ws://") + "/v1/ws") as ws:
        await send(ws, {"type": "submit", "params": {"prompt": "p", "steps": 3}})
        job_id = (await recv(ws))["job_id"]
        events = await until(ws, is_terminal)
    assert [e["type"] for e in events] == ["queued", "started", *["progress"] * 3, "completed"]
    assert [e["seq"] for e in events] == list(range(1, 7))
    queue, plane = Redis.from_url(settings.redis_url), Redis.from_url(own_redis.url())
    try:
        assert await plane.xlen(event_keys(job_id)[1]) == 6
        assert not await queue.exists(*event_keys(job_id), checkpoint_key(job_id))
    finally:
        await queue.aclose()
        await plane.aclose()
