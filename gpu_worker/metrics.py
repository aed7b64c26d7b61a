"""Prometheus metrics of a worker, on ``STEPCAST_WORKER_METRICS_PORT`` (0: off).

Each worker is its own scrape target (one per GPU): jobs by outcome, run and
queue-wait histograms, denoising steps (``rate()`` gives steps/s) and seconds
spent inside the pipeline (``rate()`` gives the GPU's busy fraction).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from stepcast.settings import WorkerSettings

# Seconds: from sub-second tiny jobs to minutes-long SDXL batches.
BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Counter("stepcast_worker_jobs", "Jobs finished by this worker", ["outcome"], registry=r)
        self.run_seconds = Histogram(
            "stepcast_job_run_seconds", "Claim to terminal state", buckets=BUCKETS_S, registry=r
        )
        self.queue_seconds = Histogram(
            "stepcast_job_queue_seconds", "Submit to claim", buckets=BUCKETS_S, registry=r
        )
        self.steps = Counter("stepcast_worker_steps", "Denoising steps run", registry=r)
        self.pipeline_seconds = Counter(
            "stepcast_worker_pipeline_seconds", "Seconds spent inside the model pipeline", registry=r
        )
        self.busy = Gauge("stepcast_worker_busy", "1 while the pipeline runs a batch", registry=r)
        self.batch_images = Histogram(
            "stepcast_worker_batch_images",
            "Images per pipeline call (dynamic batching)",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )

        self.resumed_steps = Counter(
            "stepcast_worker_resumed_steps", "Steps not run again: resumed from a checkpoint", registry=r
        )
        self.checkpoint_seconds = Histogram(
            "stepcast_worker_checkpoint_seconds",
            "Encoding and saving a checkpoint (off the pipeline thread)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
            registry=r,
        )
        self.checkpoint_bytes = Histogram(
            "stepcast_worker_checkpoint_bytes",
            "Size of a saved checkpoint",
            buckets=(1e4, 1e5, 2.5e5, 1e6, 4e6, 1.6e7, 6.4e7),
            registry=r,
        )

    def serve(self, settings: WorkerSettings) -> Callable[[], None]:
        """Serve /metrics if a port is set; returns what stops it."""
        if not settings.worker_metrics_port:
            return lambda: None
        server, thread = start_http_server(
            settings.worker_metrics_port, addr=settings.worker_metrics_host, registry=self.registry
        )

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(5)

        return stop
