"""Prometheus metrics of a server process, served at ``GET /metrics``.

What this process does (HTTP requests, open sockets, events sent and dropped)
is counted as it happens; what the whole system holds (jobs by status, queue
depth) is read from Postgres at scrape time, so every server answers the same.
Per-job run and queue-wait histograms and denoising steps are the workers'
(``gpu_worker/metrics.py``, on ``STEPCAST_WORKER_METRICS_PORT``).

One registry per app: tests run many apps in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response

from stepcast.jobs import Status


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

    def count_webhook(self, outcome: str) -> None:
        self.webhook_deliveries.labels(outcome).inc()


async def endpoint(request: Request) -> Response:
    services = request.state.services
    metrics: ServerMetrics = services.metrics
    by_status = await services.db.jobs_by_status()
    for status in Status:
        metrics.jobs.labels(status.value).set(by_status.get(status.value, 0))
    for queue, depth in (await services.db.queue_depths()).items():
        metrics.queue_depth.labels(queue).set(depth)
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
