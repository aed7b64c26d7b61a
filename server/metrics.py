"""Prometheus metrics of a server process, served at ``GET /metrics``.

What this process does (requests, open sockets, events sent and dropped) is counted as it happens;
jobs by status and queue depth come from the counts Postgres keeps (``job_counts``), read at most
once per ``metrics_cache_s``. With ``metrics_token`` set, only ``Authorization: Bearer <token>``
may scrape. One registry per app: tests run many apps in one process.
"""

from __future__ import annotations

import asyncio
import hmac
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response

from stepcast.db import Database
from stepcast.errors import Unauthorized


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "stepcast_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=r
        )
        self.http_seconds = Histogram(
            "stepcast_http_request_duration_seconds", "Time to answer", ["method", "route"], registry=r
        )
        self.jobs_submitted = Counter("stepcast_jobs_submitted", "Jobs accepted by this process", registry=r)
        self.sockets = Gauge("stepcast_websocket_connections", "Open WebSocket connections", registry=r)
        self.sse_streams = Gauge("stepcast_sse_streams", "Open Server-Sent Events streams", registry=r)
        self.events_sent = Counter(
            "stepcast_events_sent", "Job events sent to clients", ["transport"], registry=r
        )
        self.events_dropped = Counter(
            "stepcast_events_dropped",
            "Progress events dropped for clients that read too slowly (a later one supersedes them)",
            registry=r,
        )
        self.slow_clients = Counter(
            "stepcast_slow_clients_disconnected", "Connections closed for not keeping up", registry=r
        )
        self.webhook_deliveries = Counter(
            "stepcast_webhook_deliveries",
            "Webhook delivery attempts by outcome (delivered, retry, failed)",
            ["outcome"],
            registry=r,
        )
        self.jobs = Gauge("stepcast_jobs", "Jobs in Postgres by status", ["status"], registry=r)
        self.queue_depth = Gauge("stepcast_queue_depth", "Pending jobs by queue", ["queue"], registry=r)
        self._read_at: float | None = None  # time.monotonic() of the last read of the job figures
        self._reading = asyncio.Lock()

    def count_webhook(self, outcome: str) -> None:
        self.webhook_deliveries.labels(outcome).inc()

    async def read_jobs(self, db: Database, max_age_s: float) -> None:
        """Set the job gauges from Postgres's kept counts, unless they were read less than
        ``max_age_s`` ago."""
        async with self._reading:
            if self._read_at is not None and time.monotonic() - self._read_at < max_age_s:
                return
            counts = await db.counts.kept()
            for status, n in counts.by_status.items():
                self.jobs.labels(status).set(n)
            for queue, depth in counts.pending_by_queue.items():
                self.queue_depth.labels(queue).set(depth)
            self._read_at = time.monotonic()


async def endpoint(request: Request) -> Response:
    services = request.state.services
    settings = services.settings
    if settings.metrics_token is not None:
        scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
        expected = settings.metrics_token.get_secret_value().encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise Unauthorized("/metrics needs Authorization: Bearer <STEPCAST_METRICS_TOKEN>")
    metrics: ServerMetrics = services.metrics
    await metrics.read_jobs(services.db, settings.metrics_cache_s)
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
