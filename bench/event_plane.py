"""The event plane on Redis Cluster: events/s per shard and per server, Redis CPU per event,
publish -> client latency, and how they change as shards are added.

Loopback only. For each of ``--shards`` (0: the plain Redis of the default deployment, for
comparison; n: a Redis Cluster of n primaries, ``--replicas`` each): Postgres, the queue's
Redis, the cluster, and ``--servers`` server processes on it. ``--sockets`` WebSocket clients,
spread evenly over the servers, each watch one pending job. This process then publishes
``progress`` events through the event log, as a worker's step does (the simulated worker: no
pipeline, only its events), at each of ``--rates`` events/s for ``--seconds``, spread over the
jobs, whose owners are ``--owners`` (each event reaches its job's and its owner's channel), from
``--publishers`` concurrent publishers (a fleet's workers: the calls of one loop pass share a
round trip, as a worker's do).

Reported per rate: events delivered/s; per shard, the events of its jobs/s and its Redis' CPU
per event (µs of its process per event of its jobs; it also carries other jobs' owner channels);
per server, events delivered/s and µs of CPU per event; latency p50/p99 (one clock: the
publisher and the clients live in this process); lost events (must be 0).

All of it shares this machine's 2 cores: the figures to carry to a fleet are the per-event
costs, not the totals.

    python -m bench.event_plane --shards 0 1 2 3 4 --servers 3 --sockets 3000 --rates 1000 2000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import time
from collections import Counter
from typing import Any

import psutil  # type: ignore[import-untyped]
import uvloop
from redis.asyncio import Redis
from redis.crc import key_slot

from bench import stack
from bench.fanout import BLOCK, PROGRESS, Arrivals, watch
from server.shards import ClusterHub, Node
from stepcast.cli.processes import LocalRedis, LocalRedisCluster
from stepcast.event_plane import EventCluster
from stepcast.events import EventLog
from stepcast.redis_keys import Channels
from stepcast.round_trips import RedisClient


def cpu_s(process: psutil.Process) -> float:
    user, system = process.cpu_times()[:2]
    return float(user + system)


async def redis_cpu_s(nodes: dict[Node, Redis]) -> dict[Node, float]:
    """Each Redis' CPU so far, as it counts it (to the µs; the kernel's ticks are 10 ms)."""
    used = {}
    for node, client in nodes.items():
        info = await client.info("cpu")
        used[node] = float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
    return used


async def measure(
    running: stack.Running,
    shards: dict[Node, Redis],
    home_of: Any,
    events: EventLog,
    args: argparse.Namespace,
) -> dict[str, Any]:
    sockets = args.sockets
    jobs = [job["id"] for job in await stack.submit_jobs(running.http_url, sockets, {}, "plane")]
    owners = [f"owner-{index % args.owners}" for index in range(len(jobs))]
    homes = [home_of(job_id) for job_id in jobs]
    servers = [psutil.Process(process.pid) for process in running.servers]
    # A socket per job, on server index % servers.
    arrivals = Arrivals()
    delivered = Counter[int]()  # by server

    def on_event_of(server: int) -> Any:
        def on_event(message: dict[str, Any]) -> None:
            if message.get("type") == "progress":
                delivered[server] += 1
                arrivals.received(message)

        return on_event

    readies = [asyncio.Event() for _ in jobs]
    urls = running.ws_urls
    clients = []
    subscribing = time.perf_counter()
    for index, (job_id, ready) in enumerate(zip(jobs, readies, strict=True)):
        server = index % len(urls)
        clients.append(asyncio.create_task(watch(urls[server], job_id, on_event_of(server), ready)))
        if index % 200 == 199:
            await asyncio.sleep(0.05)  # the servers' accept queues stay short
    await asyncio.gather(*(ready.wait() for ready in readies))
    subscribe_s = time.perf_counter() - subscribing
    gc.collect()
    gc.freeze()
    await asyncio.sleep(2)
    # What each Redis spends idle (its cron; a cluster's bus): taken out of the cost per event.
    idle_before, idle_began = await redis_cpu_s(shards), time.perf_counter()
    await asyncio.sleep(5)
    idle_after = await redis_cpu_s(shards)
    idle_share = {
        node: (idle_after[node] - idle_before[node]) / (time.perf_counter() - idle_began) for node in shards
    }
    rows = []
    for rate in args.rates:
        arrivals.reset()
        delivered.clear()
        count = int(rate * args.seconds)
        per_shard = Counter(homes[index % len(jobs)] for index in range(count))
        redis_before = await redis_cpu_s(shards)
        servers_before = [cpu_s(process) for process in servers]
        began = time.perf_counter()

        async def publisher(first: int, count: int, rate: int, began: float) -> None:
            """A simulated worker: events ``first``, ``first + publishers``, … at their times."""
            for index in range(first, count, args.publishers):
                job = index % len(jobs)
                await asyncio.sleep(max(0.0, began + index / rate - time.perf_counter()))
                emitting = time.perf_counter()
                seq = await events.emit(jobs[job], owners[job], PROGRESS, attempt=1, block=BLOCK)
                arrivals.published((jobs[job], seq), emitting)

        await asyncio.gather(*(publisher(first, count, rate, began) for first in range(args.publishers)))
        sent_s = time.perf_counter() - began
        await arrivals.wait_for(count)
        wall_s = time.perf_counter() - began
        redis_after = await redis_cpu_s(shards)
        busy = {node: redis_after[node] - redis_before[node] - idle_share[node] * wall_s for node in shards}
        shard_rows = {
            node.name: {
                "events_per_s": round(per_shard[node] / sent_s),
                "redis_core_share": round((redis_after[node] - redis_before[node]) / wall_s, 3),
                "redis_us_per_event": round(used / max(1, per_shard[node]) * 1e6, 1),
            }
            for node, used in busy.items()
        }
        server_cpu = [
            cpu_s(process) - before for process, before in zip(servers, servers_before, strict=True)
        ]
        server_rows = [
            {
                "events_per_s": round(delivered[index] / sent_s),
                "core_share": round(used / wall_s, 3),
                "us_per_event": round(used / max(1, delivered[index]) * 1e6),
            }
            for index, used in enumerate(server_cpu)
        ]
        rows.append(
            {
                "rate": rate,
                "sent": count,
                "delivered": len(arrivals.latencies_ms),
                "lost": count - len(arrivals.latencies_ms),
                "events_per_s": round(len(arrivals.latencies_ms) / sent_s),
                "latency_ms": stack.summary(arrivals.latencies_ms, 1),
                "shards": shard_rows,
                "servers": server_rows,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    closed = Counter(client.result() for client in clients if client.done() and not client.exception())
    for client in clients:
        client.cancel()
    await asyncio.gather(*clients, return_exceptions=True)
    return {
        "connect_and_subscribe_s": round(subscribe_s, 1),
        "closed_early": dict(closed),
        "redis_idle_core_share": {node.name: round(share, 4) for node, share in idle_share.items()},
        "rates": rows,
    }


def run_one(shards: int, args: argparse.Namespace) -> dict[str, Any]:
    """One deployment: the plain Redis (``shards`` 0) or a cluster of ``shards`` primaries."""
    name = f"event-plane-{shards}"
    env = {"STEPCAST_MAX_JOBS_PER_OWNER": str(args.sockets), "STEPCAST_MAX_QUEUE_DEPTH": str(args.sockets)}
    with contextlib.ExitStack() as resources:
        postgres, queue_redis = resources.enter_context(stack.services(name))
        cluster: LocalRedisCluster | None = None
        if shards:
            cluster = LocalRedisCluster(
                stack.BENCH_DIR / name / "cluster", primaries=shards, replicas=args.replicas
            )
            resources.callback(cluster.stop)
            cluster.start()
            env |= {"STEPCAST_EVENT_REDIS_URL": cluster.url(), "STEPCAST_EVENT_REDIS_CLUSTER": "true"}
        running = resources.enter_context(
            stack.stepcast(name, postgres, queue_redis, workers=0, env=env, servers=args.servers)
        )
        return uvloop.run(publish_and_watch(running, queue_redis, cluster, args))


async def publish_and_watch(
    running: stack.Running,
    queue_redis: LocalRedis,
    cluster: LocalRedisCluster | None,
    args: argparse.Namespace,
) -> dict[str, Any]:
    client: RedisClient
    if cluster is None:
        client = Redis.from_url(queue_redis.url())
        nodes = {Node("127.0.0.1", queue_redis.port): Redis.from_url(queue_redis.url())}

        def home_of(job_id: str) -> Node:
            return next(iter(nodes))

        channels = Channels()
    else:
        client = EventCluster.from_url(cluster.url())
        topology = await ClusterHub(cluster.url(), check_s=60)._read_topology()
        primaries = {node for node in topology.primaries if node is not None}
        nodes = {node: Redis(host=node.host, port=node.port) for node in primaries}
        channels = Channels(sharded=True)

        def home_of(job_id: str) -> Node:
            node = topology.primaries[key_slot(channels.job(job_id).encode())]
            assert node is not None
            return node

    events = EventLog(client, stream_max=1000, ttl_s=3600, channels=channels)
    try:
        return await measure(running, nodes, home_of, events, args)
    finally:
        await client.aclose()
        for node_client in nodes.values():
            await node_client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--replicas", type=int, default=0, help="replicas per primary")
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--sockets", type=int, default=3000)
    parser.add_argument("--owners", type=int, default=64)
    parser.add_argument(
        "--publishers",
        type=int,
        default=8,
        help="simulated workers publishing at once (their calls share round trips)",
    )
    parser.add_argument("--rates", type=int, nargs="+", default=[1000, 2000])
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    results = {}
    for shards in args.shards:
        print(json.dumps({"shards": shards, "servers": args.servers, "sockets": args.sockets}), flush=True)
        results[str(shards)] = run_one(shards, args)
    stack.write_result("event_plane", {"args": vars(args), "by_shards": results})


if __name__ == "__main__":
    main()
