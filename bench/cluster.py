"""Several servers and workers on one machine, with a server and a worker killed mid-run.

Loopback only, bounded in time: one Postgres, one Redis, ``--servers`` server
processes and ``--workers`` worker processes on the ``simulated`` backend.
``--clients`` WebSocket clients are spread over the servers; each submits its
jobs one after another (with an idempotency key) and watches each to the end.
After ``--kill-server-at`` seconds the first server is SIGKILLed: its clients
connect to the next server, send their submit again under the same key (a
submit whose answer was lost) and subscribe to their unfinished jobs with the
last ``seq`` they saw. After ``--kill-worker-at`` seconds a worker is SIGKILLed
(and a new one started): its jobs' leases expire and they run again.

Reported: jobs/s; event latency (publish, stamped by a reference Redis
subscriber here, to client receive) p50/p99; lost jobs (a submitted job not
terminal in Postgres at the end, or a submit that never got a job id: must be
0); lost events (a ``seq`` of a job's final log that its client neither
received nor was given a snapshot covering: must be 0); duplicates.

    python -m bench.cluster --servers 3 --workers 3 --clients 30 --jobs-per-client 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections import Counter, defaultdict
from typing import Any

import asyncpg
import websockets

from bench import stack
from bench.soak import Stamps
from stepcast.redis_keys import ALL_JOB_CHANNELS

STEPS = 10
STEP_S = 0.01
TERMINAL = {"completed", "failed", "canceled"}


class PublishStamps(Stamps):
    """The soak's reference subscriber, also stamping when every event was published."""

    def __init__(self, redis_url: str) -> None:
        super().__init__(redis_url)
        self.published: dict[tuple[str, int], float] = {}

    async def run(self) -> None:
        pubsub = self.redis.pubsub()
        await pubsub.psubscribe(ALL_JOB_CHANNELS)
        async for message in pubsub.listen():
            if message["type"] == "pmessage":
                event = json.loads(message["data"])
                self.published.setdefault((event["job_id"], event["seq"]), time.monotonic())


class Client:
    """One WebSocket user: submits its jobs in turn, follows each, moves server when one dies."""

    def __init__(self, index: int, ws_urls: list[str], jobs: int, stamps: PublishStamps) -> None:
        self.index = index
        self.ws_urls = ws_urls
        self.server = index % len(ws_urls)
        self.keys = [f"cluster-{index}-{n}-{uuid.uuid4().hex[:8]}" for n in range(jobs)]
        self.stamps = stamps
        self.job_ids: dict[str, str] = {}  # idempotency key -> job id
        self.received: dict[str, Counter[int]] = defaultdict(Counter)
        self.snapshot_upto: dict[str, int] = defaultdict(int)
        self.finished: set[str] = set()
        self.latencies_ms: list[float] = []
        self.reconnects = 0

    async def run(self, deadline: float) -> None:
        while len(self.finished) < len(self.keys) and time.monotonic() < deadline:
            try:
                async with websockets.connect(
                    self.ws_urls[self.server], max_size=2**22, open_timeout=5
                ) as ws:
                    await self._session(ws, deadline)
            except (OSError, websockets.ConnectionClosed, TimeoutError):
                self.server = (self.server + 1) % len(self.ws_urls)
                self.reconnects += 1
                await asyncio.sleep(0.1)

    async def _session(self, ws: Any, deadline: float) -> None:
        for job_id in set(self.job_ids.values()) - self.finished:
            seen = max(self.received[job_id], default=0)
            after = max(seen, self.snapshot_upto[job_id])
            await ws.send(json.dumps({"type": "subscribe", "job_id": job_id, "after_seq": after}))
        while len(self.finished) < len(self.keys) and time.monotonic() < deadline:
            key = next(k for k in self.keys if self.job_ids.get(k) not in self.finished)
            if key not in self.job_ids:
                params = {"prompt": key, "steps": STEPS, "width": 64, "height": 64}
                await ws.send(
                    json.dumps(
                        {"type": "submit", "request_id": key, "idempotency_key": key, "params": params}
                    )
                )
            while self.job_ids.get(key) not in self.finished:
                self._receive(json.loads(await asyncio.wait_for(ws.recv(), 30)))

    def _receive(self, message: dict[str, Any]) -> None:
        now = time.monotonic()
        kind = message["type"]
        if kind == "accepted":
            self.job_ids[message["request_id"]] = message["job_id"]
        elif kind == "snapshot":
            job = message["job"]
            self.snapshot_upto[job["id"]] = max(self.snapshot_upto[job["id"]], job["last_seq"])
            if job["status"] in TERMINAL:
                self.finished.add(job["id"])
        elif kind == "error":
            raise RuntimeError(message)
        elif "seq" in message:
            job_id, seq = message["job_id"], message["seq"]
            self.received[job_id][seq] += 1
            published = self.stamps.published.get((job_id, seq))
            if published is not None:
                self.latencies_ms.append((now - published) * 1000)
            if kind in TERMINAL:
                self.finished.add(job_id)


async def cluster(running: stack.Running, args: argparse.Namespace) -> dict[str, Any]:
    stamps = PublishStamps(running.redis_url)
    listener = asyncio.create_task(stamps.run())
    await asyncio.sleep(0.3)
    clients = [Client(i, running.ws_urls, args.jobs_per_client, stamps) for i in range(args.clients)]
    began = time.monotonic()
    deadline = began + args.deadline
    tasks = [asyncio.create_task(client.run(deadline)) for client in clients]
    kills: list[tuple[str, float]] = []
    for at, what in sorted([(args.kill_server_at, "server"), (args.kill_worker_at, "worker")]):
        await asyncio.sleep(max(0.0, began + at - time.monotonic()))
        if what == "server":
            await asyncio.to_thread(running.kill_server, 0)
        else:
            await asyncio.to_thread(running.replace_worker, 0)
        kills.append((what, round(time.monotonic() - began, 1)))
    await asyncio.gather(*tasks)
    wall_s = time.monotonic() - began
    await asyncio.sleep(0.5)
    listener.cancel()
    await stamps.redis.aclose()

    db = await asyncpg.connect(running.database_url)
    try:
        query = "SELECT id, status, attempt, last_seq FROM jobs WHERE params->>'prompt' LIKE 'cluster-%'"
        rows = {str(row["id"]): row for row in await db.fetch(query)}
    finally:
        await db.close()
    submitted = sum(len(c.keys) for c in clients)
    known = {job_id for c in clients for job_id in c.job_ids.values()}
    lost_jobs = (submitted - len(known)) + sum(
        1 for job_id in known if rows[job_id]["status"] not in TERMINAL
    )
    lost_events = duplicates = snapshot_covered = 0
    for client in clients:
        for job_id in client.job_ids.values():
            final = rows[job_id]["last_seq"]
            got = client.received[job_id]
            upto = client.snapshot_upto[job_id]
            covered = set(got) | set(range(1, upto + 1))
            lost_events += len(set(range(1, final + 1)) - covered)
            snapshot_covered += len(set(range(1, upto + 1)) - set(got))
            duplicates += sum(count - 1 for count in got.values() if count > 1)
    latencies = [ms for client in clients for ms in client.latencies_ms]
    return {
        "servers": len(running.servers),
        "workers": len(running.workers),
        "clients": args.clients,
        "jobs_submitted": submitted,
        "kills": kills,
        "wall_s": round(wall_s, 1),
        "jobs_per_s": round(len(known) / wall_s, 1),
        "completed": sum(1 for job_id in known if rows[job_id]["status"] == "completed"),
        "rerun_after_worker_kill": sum(1 for job_id in known if rows[job_id]["attempt"] > 1),
        "client_reconnects": sum(c.reconnects for c in clients),
        "events_received": sum(sum(c.received[j].values()) for c in clients for j in c.received),
        "event_latency_ms": stack.summary(latencies, 1),
        "lost_jobs": lost_jobs,
        "lost_events": lost_events,
        "events_covered_by_snapshot": snapshot_covered,
        "duplicate_events": duplicates,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--clients", type=int, default=30)
    parser.add_argument("--jobs-per-client", type=int, default=40)
    parser.add_argument("--kill-server-at", type=float, default=4.0)
    parser.add_argument("--kill-worker-at", type=float, default=8.0)
    parser.add_argument("--deadline", type=float, default=240.0)
    args = parser.parse_args()
    env = {
        "STEPCAST_BACKEND": "simulated",
        "STEPCAST_SIMULATED_STEP_S": str(STEP_S),
        **stack.FAST_RECOVERY,
    }
    with (
        stack.services("cluster") as (postgres, redis),
        stack.stepcast(
            "cluster", postgres, redis, workers=args.workers, servers=args.servers, env=env
        ) as running,
    ):
        stack.warm_up(running.http_url, args.workers, {"steps": STEPS})
        result = asyncio.run(cluster(running, args))
    stack.write_result("cluster", result)


if __name__ == "__main__":
    main()
