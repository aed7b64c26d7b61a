"""The models this deployment serves, as a server sees them: read from Postgres at most once
per ``catalog_cache_s`` (one read shared by every submit meanwhile), for validating jobs
(:class:`stepcast.models.Catalog`) and for ``GET /v1/models`` (with the queues' depths: a
request that needs no credential costs Postgres nothing more)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from stepcast.db import Database, KnownModel
from stepcast.models import Catalog
from stepcast.settings import ServerSettings

logger = logging.getLogger(__name__)

DAY_S = 24 * 3600


@dataclass(frozen=True)
class Reading:
    known: dict[str, KnownModel] = field(default_factory=dict)
    pending: dict[str, int] = field(default_factory=dict)  # pending jobs by queue


class ModelCatalog:
    def __init__(self, db: Database, settings: ServerSettings) -> None:
        self.db = db
        self.settings = settings
        self._read_at = -float("inf")
        self._reading: asyncio.Future[Reading] | None = None
        self._last = Reading()

    async def reading(self) -> Reading:
        """The models served lately or now, their live workers, the queues' depths. Postgres
        unreachable: the last answer (a submit fails at its insert anyway)."""
        now = time.monotonic()
        if self._reading is None or now - self._read_at >= self.settings.catalog_cache_s:
            self._read_at = now
            self._reading = asyncio.ensure_future(self._read())
        return await asyncio.shield(self._reading)

    async def known(self) -> dict[str, KnownModel]:
        return (await self.reading()).known

    async def current(self) -> Catalog:
        """What a job may name now, and each model's limits."""
        known = await self.known()
        return Catalog.of({name: model.card for name, model in known.items()}, self.settings)

    async def live_workers(self, model: str) -> int:
        entry = (await self.known()).get(model)
        return 0 if entry is None else len(entry.workers)

    async def _read(self) -> Reading:
        try:
            known = await self.db.models.known(self.settings.model_keep_days * DAY_S)
            self._last = Reading(known, (await self.db.counts.kept()).pending_by_queue)
        except Exception as exc:
            logger.warning("could not read the models: %s", exc)
        return self._last
