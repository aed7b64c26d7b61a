"""Streams opened with an API key end within seconds of ``stepcast keys revoke``.

Each server process keeps the hashes of the keys its open streams were opened with and, every
``STEPCAST_KEY_CHECK_S``, asks Postgres in one query which are still active; the streams of any
other end (WebSocket close 4401, SSE after an ``error`` event). While Postgres does not answer,
nothing ends. docs/security.md, "API keys".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from stepcast.db import TRANSIENT_ERRORS, Database

logger = logging.getLogger(__name__)

Revoked = Callable[[], object]  # told once a stream's key is revoked


class Revocations:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._streams: dict[str, set[Revoked]] = {}

    def watch(self, key_hash: str | None, revoked: Revoked) -> _Watching:
        """Call ``revoked()`` once the key is revoked (never, for ``None``: a session or a
        single user), while inside."""
        return _Watching(self._streams, key_hash, revoked)

    async def check(self) -> None:
        """Tell the streams of every watched key that is no longer active."""
        if not self._streams:
            return
        active = await self.db.owners.active_keys(list(self._streams))
        for key_hash in set(self._streams) - active:
            logger.info("closing %d stream(s) of a revoked API key", len(self._streams[key_hash]))
            for revoked in list(self._streams[key_hash]):
                revoked()

    async def run(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.check()
            except TRANSIENT_ERRORS as exc:
                logger.warning("could not check open streams' API keys: %r", exc)


class _Watching:
    """:meth:`Revocations.watch`'s context: a few slots (a server holds thousands)."""

    __slots__ = ("key_hash", "revoked", "streams")

    def __init__(self, streams: dict[str, set[Revoked]], key_hash: str | None, revoked: Revoked) -> None:
        self.streams, self.key_hash, self.revoked = streams, key_hash, revoked

    def __enter__(self) -> None:
        if self.key_hash is not None:
            self.streams.setdefault(self.key_hash, set()).add(self.revoked)

    def __exit__(self, *exc_info: object) -> None:
        if self.key_hash is None:
            return
        streams = self.streams[self.key_hash]
        streams.discard(self.revoked)
        if not streams:
            del self.streams[self.key_hash]
