"""Chaos soak: jobs and their watchers through a cluster whose parts fail at random.

Loopback only, bounded in time: one Postgres (durable, as in production), one
Redis (never persisted), ``--servers`` server processes and ``--workers``
workers on the ``simulated`` backend (10 steps a job), with auth off
(``single_user``: every client is the same owner). For ``--seconds`` a
submitter posts ``--jobs-per-s`` jobs over REST with idempotency keys (a lost
answer is posted again, to another server). ``--watchers`` clients, WebSocket
and SSE, each follow a recent job to its end, then another; now and then they
drop their connection and resume on a random server after the last seq they
saw. Every few seconds one fault: a server or a worker SIGKILLed and started
again, Redis FLUSHALLed, Redis restarted empty, Postgres restarted (fast, or
immediate: a crash). Then submits stop, the system drains (``--drain`` s at
most) and Postgres is read for the truth.

Reported, each to be 0: jobs lost (answered but not terminal after the drain,
or never answered); watches that never heard a terminal job's end (neither its
terminal event nor a terminal snapshot); seq reuses (one (job, seq) seen with
two contents, or an event on one connection whose seq is not above the ones
before it since its snapshot or resume point); duplicate outcomes (two terminal
states, or terminal events with two seqs, for one job). And as figures: how
long after ``finished_at`` a watcher connected at that moment heard the end
(p50/p99), the faults injected (each logged with its time), servers or
workers that exited by themselves or would not stop on SIGTERM at the end, and
every violation seen, with its messages.

    python -m bench.chaos --seconds 240 --watchers 200 --jobs-per-s 4
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import subprocess
import sys
import time
import traceback
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from bench import stack
from stepcast.cli.processes import LocalPostgres, LocalRedis
from stepcast.status import TERMINAL

STEPS = 10
FAULTS = ("kill_server", "kill_worker", "flush_redis", "restart_redis", "restart_postgres")
SILENCE_S = 30.0  # a stream quiet this long is given up and resumed elsewhere
EXAMPLES = 20  # messages kept per kind of violation
NOTE_EXAMPLES = 3
STOP_GRACE_S = 20.0  # servers get 10 s (server_shutdown_s) for their requests, workers finish a job


class Refused(Exception):
    """The server answered a subscribe with an error (WebSocket frame or HTTP status)."""


class Ledger:
    """Every event any watcher received, and every break of the event rules seen on the way
    (docs/design.md, "Events")."""

    def __init__(self) -> None:
        self.contents: defaultdict[tuple[str, int], list[str]] = defaultdict(list)
        self.outcomes: defaultdict[str, set[str]] = defaultdict(set)
        self.terminal_seqs: defaultdict[str, set[int]] = defaultdict(set)
        self.gaps: list[dict[str, Any]] = []  # seqs a connection went past, and what it got around them
        self.violations: Counter[str] = Counter()
        self.examples: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
        self.notes: Counter[str] = Counter()  # what the watchers went through, not violations
        self.received = 0

    def violation(self, kind: str, **detail: Any) -> None:
        self.violations[kind] += 1
        if len(self.examples[kind]) < EXAMPLES:
            self.examples[kind].append(detail)
            print(f"VIOLATION {kind}: {json.dumps(detail)}", file=sys.stderr, flush=True)

    def note(self, kind: str, **detail: Any) -> None:
        """Something allowed but worth a look, with its first few messages."""
        self.notes[kind] += 1
        if self.notes[kind] <= NOTE_EXAMPLES:
            self.examples[f"note_{kind}"].append(detail)

    def event(self, message: dict[str, Any], who: str) -> None:
        self.received += 1
        job_id, seq = message["job_id"], int(message["seq"])
        text = json.dumps(message, sort_keys=True)
        known = self.contents[(job_id, seq)]
        if text not in known:
            known.append(text)
            if len(known) > 1:
                first = json.loads(known[0])
                self.violation("seq_two_contents", job_id=job_id, seq=seq, first=first, now=message, by=who)
        if message["type"] in TERMINAL:
            self.outcomes[job_id].add(message["type"])
            self.terminal_seqs[job_id].add(seq)

    def snapshot(self, job: dict[str, Any]) -> None:
        if job["status"] in TERMINAL:
            self.outcomes[job["id"]].add(job["status"])


@dataclass
class Watch:
    """One job one watcher follows to its end, over as many connections as it takes."""

    job_id: str
    resume: int | None = None  # the last seq seen (event or snapshot): after_seq / Last-Event-ID
    seen_max: int = 0
    connections: int = 0
    heard_at: float | None = None  # wall clock, to compare with finished_at
    heard_on_since: float | None = None  # when the connection that heard it was opened


@dataclass
class Connection:
    transport: str
    server: int
    after_seq: int | None  # the resume point sent (None: a first look, answered by a snapshot)
    # Each event's seq must be above it: the resume point, then a snapshot's last_seq, the events since.
    floor: int | None = None
    opened_at: float = field(default_factory=time.time)
    previous: dict[str, Any] | None = None


async def sse_messages(response: httpx.Response) -> AsyncIterator[tuple[dict[str, str], dict[str, Any]]]:
    """Each Server-Sent Event of the response: its fields (id, event) and its JSON data."""
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if line == "":
            if "data" in fields:
                yield fields, json.loads(fields["data"])
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


class Submitter:
    """Posts jobs at a steady rate, each under its own idempotency key until some server answers."""

    def __init__(self, http_urls: list[str], rng: random.Random, retry_s: float, recent: int) -> None:
        self.http_urls = http_urls
        self.rng = rng
        self.retry_s = retry_s
        self.http = httpx.AsyncClient(timeout=10, trust_env=False)
        self.keys: list[str] = []
        self.answered: dict[str, str] = {}  # idempotency key -> job id
        self.refused: dict[str, str] = {}  # key -> a 4xx that retrying cannot fix
        self.recent: deque[str] = deque(maxlen=recent)
        self.inflight: set[asyncio.Task[None]] = set()
        self.resubmits = 0
        self.errors: Counter[str] = Counter()

    async def run(self, jobs_per_s: float, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not stop.is_set():
            key = f"chaos-{len(self.keys)}-{uuid.uuid4().hex[:8]}"
            self.keys.append(key)
            task = asyncio.create_task(self.submit(key))
            self.inflight.add(task)
            task.add_done_callback(self.inflight.discard)
            next_at += 1 / jobs_per_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, next_at - loop.time()))

    async def submit(self, key: str) -> None:
        body = {"prompt": key, "steps": STEPS, "width": 64, "height": 64}
        deadline = time.monotonic() + self.retry_s
        delay_s = 0.1
        while True:
            url = self.rng.choice(self.http_urls)
            try:
                response = await self.http.post(f"{url}/v1/jobs", json=body, headers={"Idempotency-Key": key})
                if response.is_success:
                    self.answered[key] = response.json()["id"]
                    self.recent.append(self.answered[key])
                    return
                self.errors[f"http_{response.status_code}"] += 1
                if response.status_code < 500 and response.status_code != 429:
                    self.refused[key] = response.text
                    return
            except httpx.HTTPError as exc:
                self.errors[type(exc).__name__] += 1
            if time.monotonic() + delay_s > deadline:
                return  # never answered: counted lost
            self.resubmits += 1
            await asyncio.sleep(delay_s * self.rng.uniform(0.5, 1.5))
            delay_s = min(delay_s * 2, 2.0)

    async def close(self) -> None:
        await self.http.aclose()


class Watcher:
    """A client that follows recent jobs one at a time, dropping and resuming its connection at random."""

    def __init__(
        self,
        name: str,
        transport: str,
        running: stack.Running,
        recent: deque[str],
        ledger: Ledger,
        http: httpx.AsyncClient,
        rng: random.Random,
        args: argparse.Namespace,
    ) -> None:
        self.name = name
        self.transport = transport
        self.http_urls = running.http_urls
        self.ws_urls = running.ws_urls
        self.recent = recent
        self.ledger = ledger
        self.http = http
        self.rng = rng
        self.drop_every_s: float = args.drop_every
        self.drop_p: float = args.drop_p
        self.watches: list[Watch] = []
        self.drops = 0
        self.errors: Counter[str] = Counter()

    async def run(self, stop_picking: asyncio.Event) -> None:
        while not stop_picking.is_set():
            if not self.recent:
                await asyncio.sleep(0.2)
                continue
            watch = Watch(self.rng.choice(list(self.recent)))
            self.watches.append(watch)
            await self.follow(watch)

    async def follow(self, watch: Watch) -> None:
        failures = 0
        while watch.heard_at is None:
            server = self.rng.randrange(len(self.http_urls))
            conn = Connection(self.transport, server, after_seq=watch.resume, floor=watch.resume)
            watch.connections += 1
            limit = asyncio.timeout_at(self._drop_at())
            try:
                async with limit:
                    if self.transport == "websocket":
                        await self._websocket(watch, conn)
                    else:
                        await self._sse(watch, conn)
                failures = 0
            except TimeoutError:
                if limit.expired():
                    self.drops += 1
                    continue  # a dropped connection: resume at once, elsewhere
                self.errors["silent"] += 1
                failures += 1
            except Refused as exc:
                self.errors[str(exc)] += 1
                failures += 1
            except (OSError, ConnectionClosed, InvalidHandshake, httpx.HTTPError) as exc:
                self.errors[type(exc).__name__] += 1
                failures += 1
            except Exception as exc:  # a message this client cannot read: say so, and carry on
                traceback.print_exc()
                self.ledger.violation(
                    "unreadable_message", error=repr(exc), job_id=watch.job_id, by=self.name
                )
                failures += 1
            if watch.heard_at is None:
                await asyncio.sleep(min(2.0, 0.05 * 2**failures) * self.rng.uniform(0.5, 1.5))

    def _drop_at(self) -> float | None:
        """When to drop the next connection: after a whole number of periods, each with chance drop_p."""
        if self.drop_p <= 0:
            return None
        periods = 1
        while self.rng.random() >= self.drop_p:
            periods += 1
        return asyncio.get_running_loop().time() + periods * self.drop_every_s

    async def _websocket(self, watch: Watch, conn: Connection) -> None:
        url = self.ws_urls[conn.server]
        options: dict[str, Any] = {"open_timeout": 5, "close_timeout": 1, "compression": None}
        async with connect(url, proxy=None, max_size=2**22, **options) as ws:
            subscribe: dict[str, Any] = {"type": "subscribe", "request_id": self.name, "job_id": watch.job_id}
            if conn.after_seq is not None:
                subscribe["after_seq"] = conn.after_seq
            await ws.send(json.dumps(subscribe))
            conn.opened_at = time.time()
            while True:
                message = json.loads(await asyncio.wait_for(ws.recv(), SILENCE_S))
                if message["type"] == "error":
                    raise Refused(f"ws_{message.get('code')}")
                if self._receive(watch, conn, message):
                    return

    async def _sse(self, watch: Watch, conn: Connection) -> None:
        url = f"{self.http_urls[conn.server]}/v1/jobs/{watch.job_id}/events"
        headers = {} if conn.after_seq is None else {"Last-Event-ID": str(conn.after_seq)}
        async with self.http.stream("GET", url, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                raise Refused(f"http_{response.status_code}")
            conn.opened_at = time.time()
            async for fields, message in sse_messages(response):
                self._check_sse_fields(fields, message, conn)
                if self._receive(watch, conn, message):
                    return
            self.errors["stream_ended"] += 1  # the server went away (or shed us): resume

    def _check_sse_fields(self, fields: dict[str, str], message: dict[str, Any], conn: Connection) -> None:
        kind = message.get("type")
        seq = message["job"]["last_seq"] if kind == "snapshot" else message.get("seq")
        if fields.get("event") != kind or fields.get("id") != (None if seq is None else str(seq)):
            self.ledger.violation(
                "sse_id_or_event_mismatch", fields=fields, message=message, by=self._who(conn)
            )

    def _who(self, conn: Connection) -> str:
        return f"{self.name} {conn.transport} server {conn.server}"

    def _receive(self, watch: Watch, conn: Connection, message: dict[str, Any]) -> bool:
        """Check one message against what came before; True once it says the job is over."""
        kind = message.get("type")
        if message.get("job_id") != watch.job_id:
            self.ledger.notes[f"unexpected_{kind}"] += 1
            return False
        if conn.previous is None and conn.after_seq is not None:
            self.ledger.notes[
                "resumes_answered_by_snapshot" if kind == "snapshot" else "resumes_replayed"
            ] += 1
        if kind == "snapshot":
            job = message["job"]
            last_seq = int(job["last_seq"])
            if last_seq < watch.seen_max:
                self.ledger.note(
                    "snapshot_behind_seen", seen=watch.seen_max, snapshot=message, by=self._who(conn)
                )
            conn.floor, conn.previous = last_seq, message
            watch.resume = max(watch.resume or 0, last_seq)
            self.ledger.snapshot(job)
            if job["status"] in TERMINAL:
                self._heard(watch, conn)
                return True
            return False
        if "seq" not in message:
            self.ledger.notes[f"unexpected_{kind}"] += 1
            return False
        seq = int(message["seq"])
        self.ledger.event(message, self._who(conn))
        if conn.floor is None:
            self.ledger.violation(
                "event_before_snapshot", job_id=watch.job_id, seq=seq, message=message, by=self._who(conn)
            )
        elif seq <= conn.floor:
            self.ledger.violation(
                "seq_not_increasing",
                job_id=watch.job_id,
                seq=seq,
                above=conn.floor,
                previous=conn.previous,
                message=message,
                by=self._who(conn),
            )
        elif seq > conn.floor + 1:
            self.ledger.gaps.append(
                {
                    "job_id": watch.job_id,
                    "seqs": [conn.floor + 1, seq - 1],
                    "after_seq": conn.after_seq,
                    "before": conn.previous,
                    "then": message,
                    "by": self._who(conn),
                }
            )
        if conn.floor is not None and conn.floor < seq <= watch.seen_max:
            self.ledger.note(
                "redelivered_after_snapshot", seen=watch.seen_max, message=message, by=self._who(conn)
            )
        conn.floor, conn.previous = max(seq, conn.floor or 0), message
        watch.seen_max = max(watch.seen_max, seq)
        watch.resume = max(watch.resume or 0, seq)
        if kind in TERMINAL:
            self._heard(watch, conn)
            return True
        return False

    def _heard(self, watch: Watch, conn: Connection) -> None:
        watch.heard_at = time.time()
        watch.heard_on_since = conn.opened_at


class Chaos:
    """One fault every few seconds, in turn at random; each logged with its time."""

    def __init__(
        self,
        running: stack.Running,
        postgres: LocalPostgres,
        redis: LocalRedis,
        rng: random.Random,
        args: argparse.Namespace,
        began: float,
    ) -> None:
        self.running, self.postgres, self.redis = running, postgres, redis
        self.rng = rng
        self.kinds: list[str] = args.faults
        self.gap_s: tuple[float, float] = (args.fault_gap[0], args.fault_gap[1])
        self.began = began
        self.counts: Counter[str] = Counter()
        self.exited: Counter[str] = Counter()  # servers and workers that ended by themselves, by exit code
        self.log: list[tuple[float, str, float]] = []  # at (s into the run), fault, how long it took

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time() + self.rng.uniform(*self.gap_s)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(1.0, max(0.0, next_at - loop.time())))
            if stop.is_set():
                return
            await self.revive()
            if loop.time() < next_at:
                continue
            kind = self.rng.choice(self.kinds)
            if kind == "restart_postgres":
                kind += "_immediate" if self.rng.random() < 1 / 3 else "_fast"
            index = self.rng.randrange(
                len(self.running.servers if kind == "kill_server" else self.running.workers)
            )
            await self.act(kind, index)
            self.counts[kind] += 1
            next_at = loop.time() + self.rng.uniform(*self.gap_s)

    async def revive(self) -> None:
        """Start again a server or worker that exited without being killed here (a finding)."""
        for kind, processes in (("server", self.running.servers), ("worker", self.running.workers)):
            for index, process in enumerate(processes):
                if process.poll() is not None:
                    self.exited[f"{kind}_exited_{process.returncode}"] += 1
                    await self.act(f"{kind}_exited", index)

    async def act(self, kind: str, index: int) -> None:
        at = time.monotonic() - self.began
        await asyncio.to_thread(self.inject, kind, index)
        took = time.monotonic() - self.began - at
        self.log.append((round(at, 1), kind, round(took, 2)))
        print(f"chaos {at:7.1f}s {kind} ({took:.1f}s)", file=sys.stderr, flush=True)

    def inject(self, kind: str, index: int) -> None:
        if kind in {"kill_server", "server_exited"}:
            self.running.restart_server(index)
        elif kind in {"kill_worker", "worker_exited"}:
            self.running.replace_worker(index)
        elif kind == "flush_redis":
            subprocess.run(
                ["redis-cli", "-p", str(self.redis.port), "flushall"], check=True, capture_output=True
            )
        elif kind == "restart_redis":
            stack.restart_redis(self.redis)
        else:
            stack.restart_postgres(self.postgres, immediate=kind.endswith("_immediate"))


async def read_truth(database_url: str) -> dict[str, asyncpg.Record]:
    """Every chaos job's row (retrying while Postgres comes back)."""
    for attempt in range(60):
        try:
            db = await asyncpg.connect(database_url, timeout=5)
            try:
                rows = await db.fetch(
                    "SELECT id::text, status::text, last_seq, finished_at, attempt, error_code,"
                    " idempotency_key FROM jobs WHERE params->>'prompt' LIKE 'chaos-%'"
                )
            finally:
                await db.close()
            return {row["id"]: row for row in rows}
        except (OSError, asyncpg.PostgresError):
            if attempt == 59:
                raise
            await asyncio.sleep(1)
    raise AssertionError("unreachable")


async def drain(
    submitter: Submitter, watching: list[asyncio.Task[None]], faults: Chaos, database_url: str, until: float
) -> None:
    """Until the drain deadline: answers to the submits still retrying, jobs terminal, watchers done."""
    await faults.revive()
    if submitter.inflight:
        await asyncio.wait(submitter.inflight, timeout=max(0.0, until - time.monotonic()))
    while time.monotonic() < until:
        rows = await read_truth(database_url)
        unfinished = [
            job_id
            for job_id in submitter.answered.values()
            if job_id not in rows or rows[job_id]["status"] not in TERMINAL
        ]
        if not unfinished and not submitter.inflight and all(task.done() for task in watching):
            return
        await faults.revive()
        await asyncio.sleep(0.5)


async def chaos(
    running: stack.Running, postgres: LocalPostgres, redis: LocalRedis, args: argparse.Namespace
) -> dict[str, Any]:
    rng = random.Random(args.seed)  # one generator, used from the event loop only
    ledger = Ledger()
    submitter = Submitter(running.http_urls, rng, args.submit_retry_s, args.pick_from)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    http = httpx.AsyncClient(timeout=httpx.Timeout(5, read=SILENCE_S), limits=limits, trust_env=False)
    sse_count = round(args.watchers * args.sse_share)
    watchers = [
        Watcher(
            f"w{i}",
            "sse" if i < sse_count else "websocket",
            running,
            submitter.recent,
            ledger,
            http,
            rng,
            args,
        )
        for i in range(args.watchers)
    ]
    began = time.monotonic()
    faults = Chaos(running, postgres, redis, rng, args, began)
    stop_submits, stop_faults, stop_picking = asyncio.Event(), asyncio.Event(), asyncio.Event()
    submitting = asyncio.create_task(submitter.run(args.jobs_per_s, stop_submits))
    injecting = asyncio.create_task(faults.run(stop_faults))
    watching = [asyncio.create_task(watcher.run(stop_picking)) for watcher in watchers]
    try:
        await asyncio.wait([injecting, submitting], timeout=args.seconds, return_when=asyncio.FIRST_COMPLETED)
        stop_submits.set()
        stop_faults.set()
        await submitting
        await injecting  # a fault that could not be undone ends the run here
        wall_s = time.monotonic() - began
        stop_picking.set()
        await drain(submitter, watching, faults, running.database_url, time.monotonic() + args.drain)
        drain_s = time.monotonic() - began - wall_s
    finally:
        tasks = [submitting, injecting, *watching, *submitter.inflight]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await submitter.close()
        await http.aclose()
    rows = await read_truth(running.database_url)
    return report(rows, submitter, watchers, ledger, faults, wall_s, drain_s, args)


def report(
    rows: dict[str, asyncpg.Record],
    submitter: Submitter,
    watchers: list[Watcher],
    ledger: Ledger,
    faults: Chaos,
    wall_s: float,
    drain_s: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    answered = set(submitter.answered.values())
    unanswered = [key for key in submitter.keys if key not in submitter.answered]
    not_terminal = {
        job_id: rows[job_id]["status"] if job_id in rows else "missing"
        for job_id in answered
        if job_id not in rows or rows[job_id]["status"] not in TERMINAL
    }
    ours = [rows[job_id] for job_id in answered if job_id in rows]
    per_key = Counter(row["idempotency_key"] for row in rows.values())
    for key, count in per_key.items():
        if count > 1:
            ledger.violation("idempotency_key_two_jobs", key=key, jobs=count)

    never_heard: list[dict[str, Any]] = []
    latencies_ms: list[float] = []
    for watcher in watchers:
        for watch in watcher.watches:
            row = rows.get(watch.job_id)
            if row is None or row["status"] not in TERMINAL:
                continue
            finished = row["finished_at"].timestamp()
            if watch.heard_at is None:
                never_heard.append(
                    {
                        "watcher": watcher.name,
                        "transport": watcher.transport,
                        "job_id": watch.job_id,
                        "status": row["status"],
                        "last_seq": row["last_seq"],
                        "resume": watch.resume,
                        "connections": watch.connections,
                    }
                )
            elif watch.heard_on_since is not None and watch.heard_on_since <= finished:
                latencies_ms.append((watch.heard_at - finished) * 1000)
    for detail in never_heard:
        ledger.violation("never_heard_terminal", **detail)

    duplicate_outcomes = 0
    for job_id, states in ledger.outcomes.items():
        seqs = ledger.terminal_seqs.get(job_id, set())
        row = rows.get(job_id)
        if len(states) > 1 or len(seqs) > 1:
            duplicate_outcomes += 1
            ledger.violation("duplicate_outcome", job_id=job_id, states=sorted(states), seqs=sorted(seqs))
        if row is not None and row["status"] not in states:
            ledger.violation(
                "outcome_not_postgres", job_id=job_id, seen=sorted(states), postgres=row["status"]
            )
    for (job_id, seq), texts in ledger.contents.items():
        ends = ledger.terminal_seqs.get(job_id)
        if ends and seq > min(ends):
            ledger.violation("event_after_terminal", job_id=job_id, seq=seq, message=json.loads(texts[0]))
    skipped = Counter[str]()
    for gap in ledger.gaps:
        first, last = gap["seqs"]
        kinds = Counter[str]()
        for seq in range(first, last + 1):
            seen = ledger.contents.get((gap["job_id"], seq))
            kinds[json.loads(seen[0])["type"] if seen else "unseen_by_any_client"] += 1
        skipped.update(kinds)
        missed = [
            json.loads(ledger.contents[(gap["job_id"], seq)][0])
            for seq in range(first, last + 1)
            if (gap["job_id"], seq) in ledger.contents
        ]
        if (gap["before"] or {}).get("type") == "snapshot" and not set(kinds) & TERMINAL:
            # Most likely events from before the snapshot, which stands in for them (Redis lost them).
            ledger.note("skipped_after_snapshot", **gap, missed=missed)
        elif set(kinds) - {"progress", "unseen_by_any_client"}:
            ledger.violation("skipped_event", **gap, missed=missed)

    two_contents = sum(1 for texts in ledger.contents.values() if len(texts) > 1)
    errors = sum((watcher.errors for watcher in watchers), Counter[str]())
    return {
        "seed": args.seed,
        "servers": args.servers,
        "workers": args.workers,
        "seconds": args.seconds,
        "wall_s": round(wall_s, 1),
        "drain_s": round(drain_s, 1),
        "jobs_per_s": args.jobs_per_s,
        "watchers": {
            "websocket": args.watchers - round(args.watchers * args.sse_share),
            "sse": round(args.watchers * args.sse_share),
        },
        "jobs_submitted": len(submitter.keys),
        "resubmits": submitter.resubmits,
        "submit_errors": dict(submitter.errors),
        "jobs_lost": len(unanswered) + len(not_terminal),
        "jobs_never_answered": len(unanswered),
        "jobs_refused": submitter.refused,
        "jobs_not_terminal": not_terminal,
        "statuses": dict(Counter(row["status"] for row in ours)),
        "failed_codes": dict(Counter(row["error_code"] for row in ours if row["status"] == "failed")),
        "jobs_rerun": sum(1 for row in ours if row["attempt"] > 1),
        "watches": sum(len(watcher.watches) for watcher in watchers),
        "watcher_drops": sum(watcher.drops for watcher in watchers),
        "watcher_connections": sum(watch.connections for watcher in watchers for watch in watcher.watches),
        "watcher_errors": dict(errors.most_common()),
        "events_received": ledger.received,
        "distinct_events": len(ledger.contents),
        "watches_never_heard_terminal": len(never_heard),
        "watchers_never_heard_terminal": len({detail["watcher"] for detail in never_heard}),
        "seq_reuses": two_contents + ledger.violations["seq_not_increasing"],
        "seq_two_contents": two_contents,
        "seq_not_increasing": ledger.violations["seq_not_increasing"],
        "duplicate_outcomes": duplicate_outcomes,
        "terminal_heard_after_finished_ms": stack.summary(latencies_ms, 1),
        "terminal_heard_live": len(latencies_ms),
        "skipped_seqs_by_type": dict(skipped),
        "notes": dict(ledger.notes),
        "faults": dict(faults.counts),
        "exited_by_themselves": dict(faults.exited),
        "fault_log": faults.log,
        "violations": dict(ledger.violations),
        "examples": dict(ledger.examples),
    }


def stop(running: stack.Running, grace_s: float) -> list[str]:
    """SIGTERM every server and worker; SIGKILL any still there after ``grace_s`` (named: a finding)."""
    named = [(f"server {i}", p) for i, p in enumerate(running.servers)]
    named += [(f"worker {i}", p) for i, p in enumerate(running.workers)]
    for _, process in named:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + grace_s
    stuck = []
    for name, process in named:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            stuck.append(name)
            process.kill()
            process.wait(10)
    return stuck


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=240.0)
    parser.add_argument("--jobs-per-s", type=float, default=4.0)
    parser.add_argument("--watchers", type=int, default=200)
    parser.add_argument("--sse-share", type=float, default=0.5, help="of the watchers, the share on SSE")
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--step-s", type=float, default=0.15, help="simulated time of one step")
    parser.add_argument("--drop-every", type=float, default=1.0, help="a watcher may drop every this often")
    parser.add_argument("--drop-p", type=float, default=0.25, help="with this chance each time")
    parser.add_argument("--pick-from", type=int, default=8, help="watchers pick among this many newest jobs")
    parser.add_argument("--faults", nargs="+", choices=FAULTS, default=list(FAULTS))
    parser.add_argument("--fault-gap", type=float, nargs=2, default=[3.0, 8.0], metavar=("MIN_S", "MAX_S"))
    parser.add_argument("--drain", type=float, default=60.0, help="seconds at most to let the system settle")
    parser.add_argument("--submit-retry-s", type=float, default=60.0, help="a submit is retried this long")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    if args.seed is None:
        args.seed = random.randrange(2**32)
    env = {
        "STEPCAST_BACKEND": "simulated",
        "STEPCAST_SIMULATED_STEP_S": str(args.step_s),
        **stack.FAST_RECOVERY,
        "STEPCAST_MAX_QUEUE_DEPTH": "100000",
        "STEPCAST_MAX_JOBS_PER_OWNER": "100000",
    }
    with (
        stack.services("chaos", durable_postgres=True) as (postgres, redis),
        stack.stepcast(
            "chaos", postgres, redis, workers=args.workers, servers=args.servers, env=env
        ) as running,
    ):
        try:
            stack.warm_up(running.http_url, args.workers, {"steps": STEPS})
            result = asyncio.run(chaos(running, postgres, redis, args))
        finally:
            # Stopped here, not by the stack, so that one that will not stop is reported, then killed.
            stuck = stop(running, STOP_GRACE_S)
        result["did_not_stop_on_sigterm"] = stuck
        stack.write_result("chaos", result)


if __name__ == "__main__":
    main()
