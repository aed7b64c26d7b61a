"""The one package that queries Postgres (the schema and its migrations: :mod:`stepcast.schema`).

Every write a worker makes is fenced by ``attempt`` (docs/design.md, "Invariants"):
a worker that lost its job (lease expired, job re-claimed) matches no row and
learns so from the ``None`` it gets back.

:class:`Database` owns the pool; its stores, one aggregate each, hold the SQL:
``jobs``, ``runs``, ``seqs``, ``recovery``, ``retention``, ``owners``,
``deliveries``, ``counts``, ``models``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from stepcast.db.counts import CountStore, KeptCounts, Pace, Place
from stepcast.db.deliveries import DeliveryStore
from stepcast.db.jobs import Insertion, JobStore, NewJob, Page
from stepcast.db.models import KnownModel, LiveWorker, ModelStore
from stepcast.db.owners import OwnerStore
from stepcast.db.recovery import RecoveryStore
from stepcast.db.retention import RetentionStore
from stepcast.db.runs import Completion, RunStore
from stepcast.db.seqs import SeqStore

__all__ = [
    "CLOSE_TIMEOUT_S",
    "TRANSIENT_ERRORS",
    "Completion",
    "Database",
    "Insertion",
    "KeptCounts",
    "KnownModel",
    "LiveWorker",
    "NewJob",
    "Pace",
    "Page",
    "Place",
    "retrying",
]

logger = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 10.0  # how long a close waits for connections in use

# pg_try_advisory_lock keys of the periodic tasks that run in one process at a time.
_SINGLETON_LOCKS = {
    "recovery": 0x5EC0_2EC0,
    "retention": 0x5EC0_2E7E,
    "queue_announcer": 0x5EC0_9051,
    "sessions": 0x5EC0_5E55,
}


T = TypeVar("T")

# Postgres is unreachable, restarting or failing over: worth trying again.
TRANSIENT_ERRORS = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
)


async def retrying(operation: Callable[[], Awaitable[T]], *, what: str, deadline_s: float) -> T:
    """Run ``operation``, trying again with back-off on transient errors for up to ``deadline_s``."""
    give_up = time.monotonic() + deadline_s
    delay = 0.1
    while True:
        try:
            return await operation()
        except TRANSIENT_ERRORS as exc:
            if time.monotonic() + delay > give_up:
                raise
            logger.warning("%s: Postgres unavailable (%s); retrying in %.1f s", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


class _Connection(asyncpg.Connection):  # type: ignore[misc]
    """Handed back to the pool as it is, without asyncpg's reset query.

    The default reset (unlock every advisory lock, close cursors, UNLISTEN,
    RESET ALL) is a round trip on every release, that is, on every query
    through the pool: it doubled the latency and the Postgres work of each.
    Nothing here leaves session state behind: no LISTEN, no session SET, no
    cursor outside a transaction; an open transaction is still rolled back;
    the one session-level advisory lock (:meth:`Database.singleton`) is
    unlocked by its holder, or its connection closed.
    """

    def get_reset_query(self) -> str:
        return ""


async def _lock_or_close(conn: asyncpg.Connection, query: str, key: int) -> Any:
    """Take or release a session-level advisory lock. The pool does not reset
    connections (:class:`_Connection`), so if this fails half-way the connection
    is closed: a closed session holds no lock."""
    try:
        return await conn.fetchval(query, key)
    except BaseException:
        # Already gone (a Postgres restart) is closed enough; what stopped us goes on up
        # (a cancellation above all: a shutdown must not hang on it).
        with contextlib.suppress(Exception):
            conn.terminate()
        raise


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


class Database:
    """The pool, and the stores that query through it."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.jobs = JobStore(pool)
        self.runs = RunStore(pool)
        self.seqs = SeqStore(pool)
        self.recovery = RecoveryStore(pool)
        self.retention = RetentionStore(pool)
        self.owners = OwnerStore(pool)
        self.deliveries = DeliveryStore(pool)
        self.counts = CountStore(pool)
        self.models = ModelStore(pool)

    @classmethod
    async def connect(cls, dsn: str, *, max_size: int = 10) -> Database:
        pool = await asyncpg.create_pool(
            dsn, min_size=1, max_size=max_size, init=_init_connection, connection_class=_Connection
        )
        return cls(pool)

    async def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Close every connection once it is released; after ``timeout_s``, close those still in
        use as well (a query that never returns must not hold a shutdown for ever)."""
        try:
            async with asyncio.timeout(timeout_s):
                await self.pool.close()  # (a time-out terminates the pool)
        except TimeoutError:
            logger.warning("Postgres connections still in use after %g s: closed anyway", timeout_s)

    async def ping(self) -> None:
        await self.pool.fetchval("SELECT 1")

    @contextlib.asynccontextmanager
    async def leading(self, task: str) -> AsyncIterator[asyncpg.Connection]:
        """:meth:`singleton` for a task that keeps the lock across its passes: waits until this
        process holds it (the others wait in line, so one takes over the moment the holder
        dies), then yields the connection that holds it (ask on it: if it fails, the lock is
        gone too)."""
        key = _SINGLETON_LOCKS[task]
        async with self.pool.acquire() as conn:
            await _lock_or_close(conn, "SELECT pg_advisory_lock($1)", key)
            try:
                yield conn
            finally:
                await _lock_or_close(conn, "SELECT pg_advisory_unlock($1)", key)

    @contextlib.asynccontextmanager
    async def singleton(self, task: str) -> AsyncIterator[bool]:
        """Hold ``task``'s lock for the block if no other process does; yields whether it is held."""
        key = _SINGLETON_LOCKS[task]
        async with self.pool.acquire() as conn:
            held = bool(await _lock_or_close(conn, "SELECT pg_try_advisory_lock($1)", key))
            try:
                yield held
            finally:
                if held:
                    await _lock_or_close(conn, "SELECT pg_advisory_unlock($1)", key)
