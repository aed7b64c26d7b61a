"""What one server process fans out: events/s to many sockets, at what latency and CPU.

Loopback only: Postgres, Redis and one server process, no worker. ``--sockets``
WebSocket clients each watch one (pending) job; this process then publishes
`progress` events through the event log itself, exactly as a worker does, at
each ``--rates`` events/s for ``--seconds``, spread over the jobs. Reported per
rate: events delivered per second, publish -> receive latency p50/p99 (one
clock: the publisher and the clients live here), and the server's share of a
core. Also the server's memory per idle socket.

The clients share the machine with the server (2 cores here): past a few
thousand events/s they, not the server, are the limit, which the server's
core share shows.

    python -m bench.fanout --sockets 1000 --rates 500 1000 2000 4000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import psutil  # type: ignore[import-untyped]
import uvloop
import websockets
from redis.asyncio import Redis

from bench import stack
from bench.ws_fanout import rss_kib
from stepcast.events import Block, EventLog, Progress

PROGRESS = Progress(step=1, total=20, eta_s=1.0)
# A bench job has no row in Postgres: its counter gets one block big enough for any run.
BLOCK = Block(1, 2**40)


class Arrivals:
    """Publish -> receive latencies of events by (job, seq), on one clock (the publisher and
    the clients live in this process). An event may reach its socket before its publishing
    call returns with its seq: its arrival then waits in ``early``."""

    def __init__(self) -> None:
        self.latencies_ms: list[float] = []
        self._sent: dict[tuple[str, int], float] = {}
        self._early: dict[tuple[str, int], float] = {}
        self._expected = 2**62
        self._all_in = asyncio.Event()

    def reset(self) -> None:
        self.latencies_ms.clear()
        self._sent.clear()
        self._early.clear()
        self._expected = 2**62

    def published(self, key: tuple[str, int], at: float) -> None:
        if (arrived := self._early.pop(key, None)) is not None:
            self._add(arrived - at)
        else:
            self._sent[key] = at

    def received(self, message: dict[str, Any]) -> None:
        key = (message["job_id"], message["seq"])
        at = self._sent.pop(key, None)
        if at is None:
            self._early[key] = time.perf_counter()
        else:
            self._add(time.perf_counter() - at)

    async def wait_for(self, count: int, timeout_s: float = 10) -> None:
        """Until ``count`` events arrived, at most ``timeout_s`` (one still missing then is lost)."""
        self._expected = count
        if len(self.latencies_ms) < count:
            self._all_in.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_in.wait(), timeout_s)

    def _add(self, latency_s: float) -> None:
        self.latencies_ms.append(latency_s * 1000)
        if len(self.latencies_ms) >= self._expected:
            self._all_in.set()


async def watch(
    url: str, job_id: str, on_event: Callable[[dict[str, Any]], None], ready: asyncio.Event
) -> str:
    """Watch until cancelled; if the connection ends first, how it ended."""
    try:
        async with websockets.connect(url, max_size=2**22, open_timeout=60) as ws:
            await ws.send(json.dumps({"type": "subscribe", "job_id": job_id, "after_seq": 0}))
            with contextlib.suppress(websockets.ConnectionClosed):
                async for raw in ws:
                    ready.set()  # the first answer (a snapshot or a replay): the job is watched
                    on_event(json.loads(raw))
    except (OSError, websockets.WebSocketException, TimeoutError) as exc:
        return type(exc).__name__
    finally:
        ready.set()  # ended before any answer: the bench goes on, and reports it
    return f"{ws.close_code} {ws.close_reason}".strip()


async def measure(running: stack.Running, sockets: int, rates: list[int], seconds: float) -> dict[str, Any]:
    # Pending jobs (no worker runs them): their ids and owner.
    jobs = [
        (job["id"], job["owner"]) for job in await stack.submit_jobs(running.http_url, sockets, {}, "fan")
    ]
    server = psutil.Process(running.server_pid)
    rss_before = rss_kib(running.server_pid)
    print(json.dumps({"jobs_waiting": len(jobs), "server_rss_kib": rss_before}), flush=True)
    arrivals = Arrivals()

    def on_event(message: dict[str, Any]) -> None:
        if message.get("type") == "progress":
            arrivals.received(message)

    readies = [asyncio.Event() for _ in jobs]
    subscribing = time.perf_counter()
    clients = [
        asyncio.create_task(watch(running.ws_url, job_id, on_event, ready))
        for (job_id, _), ready in zip(jobs, readies, strict=True)
    ]
    await asyncio.gather(*(ready.wait() for ready in readies))
    subscribe_s = time.perf_counter() - subscribing
    # The clients' objects will live to the end: keep this process's garbage collector off
    # them, or its full passes over 10,000 connections stall the clocks that measure latency.
    gc.collect()
    gc.freeze()
    await asyncio.sleep(2)  # sockets idle
    rss_idle = rss_kib(running.server_pid)
    idle_cpu = sum(server.cpu_times()[:2])
    await asyncio.sleep(5)
    idle_core_share = round((sum(server.cpu_times()[:2]) - idle_cpu) / 5, 3)
    print(json.dumps({"sockets_watching": sockets, "subscribe_s": round(subscribe_s, 1)}), flush=True)
    redis = Redis.from_url(running.redis_url)
    events = EventLog(redis, stream_max=1000, ttl_s=3600)
    rows = []
    for rate in rates:
        arrivals.reset()
        cpu_before = sum(server.cpu_times()[:2])
        began = time.perf_counter()
        count = int(rate * seconds)
        for index in range(count):
            job_id, owner = jobs[index % len(jobs)]
            await asyncio.sleep(max(0.0, began + index / rate - time.perf_counter()))
            emitting = time.perf_counter()
            seq = await events.emit(job_id, owner, PROGRESS, attempt=1, block=BLOCK)
            arrivals.published((job_id, seq), emitting)
        sent_s = time.perf_counter() - began
        await arrivals.wait_for(count)
        wall_s = time.perf_counter() - began
        delivered = len(arrivals.latencies_ms)
        rows.append(
            {
                "rate": rate,
                "sent": count,
                "delivered": delivered,
                "events_per_s": round(delivered / sent_s),
                "latency_ms": stack.summary(arrivals.latencies_ms, 1),
                "server_core_share": round((sum(server.cpu_times()[:2]) - cpu_before) / wall_s, 3),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    # Every socket stays open to the end: one the server (or the client) closed misses events.
    closed = Counter(client.result() for client in clients if client.done() and not client.exception())
    for client in clients:
        client.cancel()
    await asyncio.gather(*clients, return_exceptions=True)
    await redis.aclose()
    return {
        "sockets": sockets,
        "connect_and_subscribe_s": round(subscribe_s, 1),
        "closed_early": dict(closed),
        "server_kib_per_idle_socket": round((rss_idle - rss_before) / sockets, 1),
        "server_idle_core_share": idle_core_share,
        "rates": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sockets", type=int, default=1000)
    parser.add_argument("--rates", type=int, nargs="+", default=[500, 1000, 2000, 4000])
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    env = {
        "STEPCAST_MAX_JOBS_PER_OWNER": str(args.sockets),
        "STEPCAST_MAX_QUEUE_DEPTH": str(args.sockets),
    }
    with (
        stack.services("fanout") as (postgres, redis),
        stack.stepcast("fanout", postgres, redis, workers=0, env=env) as running,
    ):
        result = uvloop.run(measure(running, args.sockets, args.rates, args.seconds))
    stack.write_result("fanout", result)


if __name__ == "__main__":
    main()
