"""The ASGI application: ``create_app(settings)`` wires the routes, the middleware and what a
process holds (pools, storage, the hub, background passes) in its lifespan (:func:`open_services`);
``python -m server.app`` serves it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path

import uvicorn
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from server import discovery, openapi, rest, sse, ws
from server.auth import BrowserSession
from server.catalog import ModelCatalog
from server.collector import Collector
from server.hosts import HostCheck
from server.hub import Hub, Subscriptions
from server.job_service import JobService
from server.limits import Sockets
from server.metrics import ServerMetrics
from server.metrics import endpoint as metrics_endpoint
from server.middleware import RequestContext
from server.positions import EtaEstimator, QueueAnnouncer
from server.problems import EXCEPTION_HANDLERS
from server.protocols import HttpProtocol, WebSocketProtocol
from server.revocations import Revocations
from server.services import Services
from server.shards import ClusterHub
from stepcast import event_plane, logs, queue, schema
from stepcast import settings as settings_module
from stepcast.background import cancel_and_wait
from stepcast.db import Database
from stepcast.events import EventLog
from stepcast.lifecycle import Lifecycle
from stepcast.recovery import Recovery
from stepcast.retention import Retention
from stepcast.round_trips import RedisClient
from stepcast.settings import ServerSettings
from stepcast.storage import open_storage
from stepcast.webhooks import WebhookSender

logger = logging.getLogger(__name__)


def _page_directory() -> Path:
    """The page's files (``server/web/``, package data) as the directory StaticFiles serves.

    Found through importlib.resources, so a checkout and an installed wheel serve the same files.
    """
    page = resources.files("server") / "web"
    if not isinstance(page, Path):  # installed inside a zip: StaticFiles serves only real files
        raise RuntimeError(f"the page ({page}) is not a directory on disk: install stepcast unzipped")
    return page


def open_hub(settings: ServerSettings, redis: RedisClient) -> Subscriptions:
    """The subscriptions of a server process to its event plane (stepcast.event_plane)."""
    if settings.event_redis_cluster:
        assert settings.event_redis_url is not None  # (the settings check it)
        return ClusterHub(settings.event_redis_url, check_s=settings.event_topology_check_s)
    assert isinstance(redis, Redis)
    return Hub.plain(redis)


@contextlib.asynccontextmanager
async def open_services(settings: ServerSettings, metrics: ServerMetrics) -> AsyncIterator[Services]:
    """Everything a server process holds, opened in order and closed in reverse, with the
    background passes it runs (queue positions, key revocations, recovery, retention, webhooks)."""
    async with contextlib.AsyncExitStack() as stack:
        db = await Database.connect(settings.database_url, max_size=settings.database_pool_max)
        stack.push_async_callback(db.close)
        await schema.wait_until_current(db.pool, settings.schema_wait_s)
        redis = queue.connect(settings.redis_url)
        stack.push_async_callback(redis.aclose, close_connection_pool=True)
        storage = await stack.enter_async_context(open_storage(settings))
        event_redis = event_plane.connect(settings, redis)
        stack.push_async_callback(event_plane.close, event_redis, redis)
        events = EventLog(
            event_redis,
            stream_max=settings.event_stream_max,
            ttl_s=settings.event_ttl_s,
            finished_ttl_s=settings.event_finished_ttl_s,
            channels=event_plane.channels(settings),
        )
        hub = open_hub(settings, event_redis)
        await hub.start()
        stack.push_async_callback(hub.stop)
        if settings.session_secret is not None:
            session_secret = settings.session_secret.get_secret_value().encode()
        else:
            session_secret = secrets.token_bytes(32)
            if settings.auth == "keys":
                logger.warning(
                    "STEPCAST_SESSION_SECRET is not set: browser sessions end when this process does "
                    "and do not carry over to other servers"
                )
        models = ModelCatalog(db, settings)
        eta = EtaEstimator(db, models, max_age_s=settings.queue_update_s)
        lifecycle = Lifecycle(db, events)
        services = Services(
            settings=settings,
            db=db,
            redis=redis,
            events=events,
            storage=storage,
            hub=hub,
            metrics=metrics,
            session_secret=session_secret,
            jobs=JobService(settings, db.jobs, db.counts, redis, lifecycle, eta, storage, metrics),
            models=models,
            sockets=Sockets(settings),
            revocations=Revocations(db),
        )
        for background in (
            QueueAnnouncer(db, lifecycle, eta, interval_s=settings.queue_update_s).run(),
            services.revocations.run(settings.key_check_s),
            Recovery.from_settings(settings, db, events, redis).run(),
            Retention.from_settings(settings, db, storage).run(),
            WebhookSender(
                db,
                storage,
                settings,
                on_outcome=lambda outcome: metrics.webhook_deliveries.labels(outcome).inc(),
            ).run(),
        ):
            stack.push_async_callback(cancel_and_wait, asyncio.create_task(background))
        yield services


def create_app(settings: ServerSettings) -> Starlette:
    metrics = ServerMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Services]]:
        async with open_services(settings, metrics) as services:
            logger.info("server ready", extra={"host": settings.host, "port": settings.port})
            yield {"services": services}

    routes = [
        *rest.routes,
        *discovery.routes,
        Route("/v1/jobs/{job_id}/events", sse.job_events, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", openapi.endpoint, methods=["GET"]),
        WebSocketRoute("/v1/ws", ws.Endpoint()),
        Mount("/", StaticFiles(directory=_page_directory(), html=True), name="web"),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[Middleware(RequestContext), Middleware(HostCheck), Middleware(BrowserSession)],
    )
    # Set when the server starts shutting down: long-lived streams end then.
    app.state.draining = asyncio.Event()
    return app


class Server(uvicorn.Server):
    """uvicorn that tells the app when shutdown begins.

    On SIGTERM uvicorn stops accepting, closes WebSockets with 1012 (service
    restart: reconnect, to another server if there is one), and waits for
    requests in flight; SSE streams never finish on their own, so the app ends
    them when ``draining`` is set, and clients resume with Last-Event-ID.

    With a ``collector``, the process's garbage collection keeps to its schedule while the
    server runs (``python -m server.app``; not for a server started inside another program).
    """

    def __init__(
        self, app: Starlette, settings: ServerSettings, *, collector: Collector | None = None
    ) -> None:
        super().__init__(
            uvicorn.Config(
                app,
                host=settings.host,
                port=settings.port,
                log_config=None,
                lifespan="on",
                http=HttpProtocol,
                ws=WebSocketProtocol,
                ws_max_size=settings.ws_max_message_bytes * 4,
                # Events are small JSON and previews already-compressed WebP:
                # deflating every frame costs CPU on both ends for a few bytes.
                ws_per_message_deflate=False,
                timeout_graceful_shutdown=int(settings.server_shutdown_s),
                # X-Forwarded-For and -Proto are believed from these only: the client
                # address (per-address limits) and whether the session cookie is Secure.
                forwarded_allow_ips=list(settings.trusted_proxies),
            )
        )
        self.draining: asyncio.Event = app.state.draining
        self.collector = collector

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        if self.collector is None:
            return await super().serve(sockets)
        collecting = asyncio.create_task(self.collector.run())
        try:
            await super().serve(sockets)
        finally:
            await cancel_and_wait(collecting)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.draining.set()
        await super().shutdown(sockets)


def main() -> None:
    settings = settings_module.load_or_exit(ServerSettings)
    logs.configure(settings.log_level, settings.log_format)
    Server(create_app(settings), settings, collector=Collector(sweep_every_s=settings.gc_sweep_s)).run()


if __name__ == "__main__":
    main()
