"""A worker's registration: the card of the model it serves (:class:`stepcast.models.ModelCard`),
announced when it starts, renewed while it lives, withdrawn when it stops.

Servers read the cards to validate jobs and answer ``GET /v1/models``. A registration lives
``lease_s`` past its last renewal (every third of that), or as long as the worker's session
(its Postgres presence) while it records one: a killed worker's is gone within about a second.
"""

from __future__ import annotations

import asyncio
import logging

from gpu_worker.pipeline import Pipeline
from stepcast.background import stop_if_cancelled
from stepcast.db import Database
from stepcast.db.presence import Presence
from stepcast.models import SCHEDULERS, ModelCard
from stepcast.settings import WorkerSettings

logger = logging.getLogger(__name__)

# Flow-matching models (SD3, Flux) run their own scheduler; a job cannot pick another.
_OWN_SCHEDULER_ONLY = frozenset({"sd3", "flux"})
RENEW_S = 5.0  # at most this long between renewals (a new session number gets recorded)


def card_of(settings: WorkerSettings, pipeline: Pipeline) -> ModelCard:
    """What this worker serves: its pipeline's family, native size and previews, within its
    settings' limits (an unset default size is the model's native one)."""
    low, high = settings.min_size_px, settings.max_size_px
    native = min(max(pipeline.native_size_px // 8 * 8, low), high)
    return ModelCard(
        name=settings.model_name,
        revision=pipeline.revision,
        family=pipeline.family,
        device=str(getattr(pipeline, "device", "cpu")),
        dtype=pipeline.dtype,
        schedulers=() if pipeline.family in _OWN_SCHEDULER_ONLY else tuple(SCHEDULERS),
        min_size_px=low,
        max_size_px=high,
        default_size_px=settings.default_size_px or native,
        max_steps=settings.max_steps,
        default_steps=settings.default_steps,
        batch_size=settings.batch_size,
        previews=pipeline.previews,
    )


class Registration:
    def __init__(
        self, db: Database, worker_id: str, card: ModelCard, presence: Presence, *, lease_s: float
    ) -> None:
        self.db = db
        self.worker_id = worker_id
        self.card = card
        self.presence = presence
        self.lease_s = lease_s

    async def announce(self) -> None:
        await self.db.models.announce(self.worker_id, self.presence.session, self.card, lapse_s=self.lease_s)
        logger.info(
            "serving model %s (%s)", self.card.name, self.card.family, extra={"worker": self.worker_id}
        )

    async def keep(self) -> None:
        """For ever: renew the registration (with the session held now), or announce it again
        when it is gone (deleted as lapsed while Postgres was away)."""
        while True:
            await asyncio.sleep(min(self.lease_s / 3, RENEW_S))
            try:
                session = self.presence.session
                if not await self.db.models.renew(self.worker_id, session, lapse_s=self.lease_s):
                    await self.announce()
            except Exception as exc:
                stop_if_cancelled(exc)
                logger.warning("could not renew the worker's registration: %s", exc)

    async def withdraw(self) -> None:
        try:
            await self.db.models.leave(self.worker_id)
        except Exception as exc:  # it lapses on its own
            logger.warning("could not withdraw the worker's registration: %s", exc)
