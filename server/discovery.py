"""What a client may ask for, and of which model: ``GET /v1/models`` and ``GET /v1/limits``.

Neither needs a credential: the page reads them before its first submit. Workers are shown by
what they run on, never by name (a worker's id carries its host's). docs/models.md.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from server.services import Services, services_of
from stepcast.db import KnownModel, Pace, Place
from stepcast.errors import InvalidParams
from stepcast.jobs import timestamp
from stepcast.models import Catalog, ModelLimits, queue_of
from stepcast.params import MAX_GUIDANCE, MAX_SEED, PREVIEW_MAX_PX


def limits_wire(limits: ModelLimits, services: Services) -> dict[str, Any]:
    settings = services.settings
    return {
        "schedulers": list(limits.schedulers),
        "max_prompt_chars": settings.max_prompt_chars,
        "steps": {"min": 1, "max": limits.max_steps, "default": limits.default_steps},
        "size_px": {
            "min": limits.min_size_px,
            "max": limits.max_size_px,
            "default": limits.default_size_px,
            "multiple_of": 8,
        },
        "guidance_scale": {"min": 0, "max": MAX_GUIDANCE, "default": settings.default_guidance_scale},
        "num_images": {"min": 1, "max": limits.max_images},
        "seed": {"min": 0, "max": MAX_SEED},
        "preview_max_px": PREVIEW_MAX_PX,
    }


def _named(request: Request, catalog: Catalog) -> str:
    name = request.query_params.get("model")
    if name is None:
        return catalog.default
    if name not in catalog.limits:
        raise InvalidParams.one("model", f"model must be one of: {', '.join(catalog.names)}")
    return name


async def limits(request: Request) -> Response:
    """What a job for one model (``?model=``; the default) may ask for here."""
    services = services_of(request)
    catalog = await services.models.current()
    name = _named(request, catalog)
    return JSONResponse(
        {"model": name, "models": list(catalog.names), **limits_wire(catalog.limits[name], services)}
    )


async def models(request: Request) -> Response:
    """Every model a job may name: its limits, its live workers, its queue and an ETA."""
    services = services_of(request)
    reading = await services.models.reading()
    catalog = await services.models.current()
    described = await asyncio.gather(
        *(
            _model(services, catalog.limits[name], reading.known.get(name), reading.pending)
            for name in catalog.names
        )
    )
    return JSONResponse({"default": catalog.default, "models": described})


async def _model(
    services: Services, limits: ModelLimits, known: KnownModel | None, pending: dict[str, int]
) -> dict[str, Any]:
    queue = queue_of(services.settings.queue_name, limits.name)
    size, steps = limits.default_size_px, limits.default_steps
    waiting = pending.get(queue, 0)
    workers = known.workers if known is not None else []
    pace = await services.jobs.eta.pace(queue)
    default_job = size * size * steps / 1e6  # megapixel-steps of a job at the defaults
    card = known.card if known is not None else None
    return {
        "name": limits.name,
        "family": card.family if card else None,
        "revision": card.revision if card else None,
        "previews": card.previews if card else None,
        "limits": limits_wire(limits, services),
        "workers": [
            {
                "device": worker.card.device,
                "dtype": worker.card.dtype,
                "batch_size": worker.card.batch_size,
                "revision": worker.card.revision,
                "since": timestamp(worker.started_at),
            }
            for worker in workers
        ],
        "queue": {"pending": waiting},
        # At its default size and steps: seconds a step took lately, and when a job sent now
        # should be done (null: none measured, or no worker runs to do it).
        "per_step_s": None
        if pace.megapixel_step_s is None
        else round(pace.megapixel_step_s * size * size / 1e6, 4),
        "eta_s": _eta_s(pace, waiting, default_job) if workers else None,
        "last_served_at": timestamp(known.seen_at) if known is not None else None,
    }


def _eta_s(pace: Pace, waiting: int, job_work: float) -> float | None:
    """When a job at the defaults sent now should be done, behind ``waiting`` jobs like it."""
    start, own = pace.start_in_s(Place(waiting + 1, waiting * job_work)), pace.seconds(job_work)
    return None if start is None or own is None else round(start + own, 3)


routes = [
    Route("/v1/models", models, methods=["GET"]),
    Route("/v1/limits", limits, methods=["GET"]),
]
