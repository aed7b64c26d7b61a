"""The models this deployment serves, as a server sees them: read from Postgres at most once
per ``catalog_cache_s`` (one read shared by every submit meanwhile), for validating jobs
(:class:`stepcast.models.Catalog`) and for ``GET /v1/models``."""

from __future__ import annotations

import asyncio
import logging
import time

from stepcast.db import Database, KnownModel
from stepcast.models import Catalog
from stepcast.settings import ServerSettings

logger = logging.getLogger(__name__)

DAY_S = 24 * 3600


class ModelCatalog:
    def __init__(self, db: Database, settings: ServerSettings) -> None:
        self.db = db
        self.settings = settings
        self._read_at = -float("inf")
        self._reading: asyncio.Future[dict[str, KnownModel]] | None = None
        self._last: dict[str, KnownModel] = {}

    async def known(self) -> dict[str, KnownModel]:
        """Every model served lately or now, with its live workers. Postgres unreachable: the
        last answer (a submit fails at its insert anyway)."""
        now = time.monotonic()
        if self._reading is None or now - self._read_at >= self.settings.catalog_cache_s:
            self._read_at = now
            self._reading = asyncio.ensure_future(self._read())
        return await asyncio.shield(self._reading)

    async def current(self) -> Catalog:
        """What a job may name now, and each model's limits."""
        known = await self.known()
        return Catalog.of({name: model.card for name, model in known.items()}, self.settings)

    async def live_workers(self, model: str) -> int:
        entry = (await self.known()).get(model)
        return 0 if entry is None else len(entry.workers)

    async def _read(self) -> dict[str, KnownModel]:
        try:
            self._last = await self.db.models.known(self.settings.model_keep_days * DAY_S)
        except Exception as exc:
            logger.warning("could not read the models: %s", exc)
        return self._last
