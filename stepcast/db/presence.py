"""A worker's presence: a Postgres session of its own that holds the worker's session lock.

The lock (:data:`LOCK_CLASS`, the session number) lives exactly as long as the session: a
SIGKILL, an OOM kill or a lost node ends it at once, and the recovery pass takes the worker's
jobs back within about a second (``worker_session_alive`` in the schema). A session that ends
while the worker lives (Postgres restarted, the connection cut) is opened again and the lock
taken again; the recovery pass waits ``confirm_s`` before it believes a session is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg

logger = logging.getLogger(__name__)

LOCK_CLASS = 1589682462  # the advisory lock class of worker sessions (the schema's 0004)


class Presence:
    """Holds the session lock while the worker lives; :attr:`number` goes in its claims."""

    def __init__(self, dsn: str, worker_id: str, *, check_s: float) -> None:
        self.dsn = dsn
        self.worker_id = worker_id
        self.check_s = check_s
        self.number: int | None = None  # the last number held
        self.held = False  # the lock is held now (a worker without it takes no jobs)
        self._conn: asyncpg.Connection | None = None
        self._lost = asyncio.Event()

    async def hold(self) -> None:
        """Open the session and take the lock (a fresh number if another session holds ours)."""
        conn = await asyncpg.connect(
            self.dsn, server_settings={"application_name": f"stepcast-worker {self.worker_id}"[:63]}
        )
        try:
            number = self.number
            while True:
                if number is None:
                    number = int(await conn.fetchval("SELECT nextval('worker_sessions')"))
                if await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", LOCK_CLASS, number):
                    break
                number = None  # the last session that held it lingers: take a new number
        except BaseException:
            conn.terminate()
            raise
        self._lost.clear()
        conn.add_termination_listener(lambda _: self._ended())
        self._conn, self.number, self.held = conn, number, True
        logger.info("worker session held", extra={"worker": self.worker_id, "session": number})

    async def keep(self) -> None:
        """For ever: check the session every ``check_s``; open it again when it ends."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.check_s):
                    await self._lost.wait()
            if await self._alive():
                continue
            self.held = False
            logger.warning("worker session lost; opening it again", extra={"worker": self.worker_id})
            self._drop()
            failures = 0
            while True:
                try:
                    await self.hold()
                    break
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    if failures % 120 == 0:  # once, then every half a minute or so
                        logger.warning("worker session: cannot open it (%s); no jobs taken meanwhile", exc)
                    failures += 1
                    await asyncio.sleep(self.check_s)

    @property
    def session(self) -> int | None:
        """The number to record in a claim or heartbeat: None while the lock is not held (a job
        claimed then has only its lease; one claimed before keeps the number that went)."""
        return self.number if self.held else None

    def _ended(self) -> None:
        self.held = False
        self._lost.set()

    async def _alive(self) -> bool:
        conn = self._conn
        if conn is None or conn.is_closed():
            return False
        try:
            async with asyncio.timeout(max(self.check_s, 1.0)):
                await conn.fetchval("SELECT 1")
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return False
        return True

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    async def close(self) -> None:
        """Let go of the session (its jobs are handed back or finished by now)."""
        self.held = False
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                async with asyncio.timeout(5):
                    await conn.close()
            except Exception:
                conn.terminate()
