"""The ASGI application: ``create_app(settings)``; ``python -m server.app`` serves it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from server import rest, sse, ws
from server.problems import EXCEPTION_HANDLERS
from server.services import Services
from stepcast import logs
from stepcast import settings as settings_module
from stepcast.settings import ROOT, Settings

logger = logging.getLogger(__name__)

WEB_DIR = ROOT / "web"


def create_app(settings: Settings) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Services]]:
        async with Services.open(settings) as services:
            logger.info("server ready", extra={"host": settings.host, "port": settings.port})
            yield {"services": services}

    routes = [
        *rest.routes,
        Route("/v1/jobs/{job_id}/events", sse.job_events, methods=["GET"]),
        WebSocketRoute("/v1/ws", ws.endpoint),
        Mount("/", StaticFiles(directory=WEB_DIR, html=True), name="web"),
    ]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers=EXCEPTION_HANDLERS)


def main() -> None:
    settings = settings_module.load_or_exit()
    logs.configure(settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        ws_max_size=settings.ws_max_message_bytes * 4,
    )


if __name__ == "__main__":
    main()
