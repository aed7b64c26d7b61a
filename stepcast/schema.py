"""The schema's versions: the numbered migrations, which of them a database has, applying them.

Migrations are ``stepcast/migrations/NNNN_pre_<what>.sql`` and ``NNNN_post_<what>.sql``, applied
in order, one transaction each, recorded in ``schema_migrations``. Only ``stepcast migrate`` (and
``stepcast run``) applies them; a server or worker start checks that it has every pre step it
knows and no post step it does not. The rules: docs/migrations.md.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from itertools import pairwise
from typing import Any, Literal

import asyncpg

from stepcast.errors import SchemaError
from stepcast.settings import Settings

logger = logging.getLogger(__name__)

MIGRATIONS = resources.files("stepcast") / "migrations"
# Also the key the schema.sql of versions before migrations took: they and `stepcast migrate` take turns.
_LOCK = 0x5EC0_57CA
_NAME = re.compile(r"(\d{4})_(pre|post)_[a-z0-9_]+")
_TABLE = """
    CREATE TABLE schema_migrations (
        name       text PRIMARY KEY,
        applied_at timestamptz NOT NULL DEFAULT now()
    );
    COMMENT ON TABLE schema_migrations IS
        'The migrations (stepcast/migrations/*.sql) applied to this database, by file name.';
"""


@dataclass(frozen=True)
class Migration:
    number: int
    step: Literal["pre", "post"]
    name: str  # the file name without .sql: what schema_migrations records
    sql: str = field(repr=False)

    @property
    def order(self) -> tuple[int, bool]:
        return self.number, self.step == "post"


def load(directory: Traversable = MIGRATIONS) -> list[Migration]:
    """The migrations in ``directory``, in the order they apply (a number's pre step before its post)."""
    found = []
    for entry in directory.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        name = entry.name.removesuffix(".sql")
        if (match := _NAME.fullmatch(name)) is None:
            raise SchemaError(f"migration {entry.name}: not named NNNN_pre_<what>.sql or NNNN_post_<…>.sql")
        step: Literal["pre", "post"] = "pre" if match[2] == "pre" else "post"
        found.append(Migration(int(match[1]), step, name, entry.read_text()))
    found.sort(key=lambda migration: migration.order)
    for before, after in pairwise(found):
        if before.order == after.order:
            raise SchemaError(f"migrations {before.name} and {after.name} have the same number and step")
    return found


async def applied(conn: Any) -> list[str]:
    """The names of the migrations the database has (a connection or a pool); none before any."""
    if await conn.fetchval("SELECT to_regclass('schema_migrations')") is None:
        return []
    return [row["name"] for row in await conn.fetch("SELECT name FROM schema_migrations ORDER BY name")]


def unfit(have: Collection[str], known: Sequence[Migration]) -> tuple[str, bool] | None:
    """Why a database with the migrations ``have`` does not fit the code that knows ``known``
    (and whether running ``stepcast migrate`` fixes it), or None when it fits."""
    missing = [m.name for m in known if m.step == "pre" and m.name not in have]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        return f"the database lacks migration {missing[0]}{more}: run `stepcast migrate`", True
    names = {m.name for m in known}
    newer = sorted(n for n in have if n not in names and (m := _NAME.fullmatch(n)) and m[2] == "post")
    if newer:
        return (
            f"the database has migration {newer[0]}, which this version of stepcast does not know: "
            "a newer version removed what older ones may need; run that version",
            False,
        )
    return None


async def wait_until_current(pool: Any, wait_s: float, known: Sequence[Migration] | None = None) -> None:
    """Return once the database has every migration this code needs, waiting up to ``wait_s``
    for `stepcast migrate` to apply them; :class:`SchemaError` naming what is wrong after that."""
    known = load() if known is None else known
    give_up = time.monotonic() + wait_s
    told = False
    while (trouble := unfit(await applied(pool), known)) is not None:
        why, migrating_helps = trouble
        left_s = give_up - time.monotonic()
        if not migrating_helps or left_s <= 0:
            raise SchemaError(why)
        if not told:
            logger.warning("%s; waiting up to %g s for it", why, wait_s)
            told = True
        await asyncio.sleep(min(1.0, left_s))


async def migrate(
    settings: Settings, *, pre_only: bool = False, known: Sequence[Migration] | None = None
) -> list[Migration]:
    """Apply the migrations the database lacks, in order (only the pre steps with
    ``pre_only``); the ones it applied. Safe to run from many processes at once."""
    known = load() if known is None else known
    conn = await asyncpg.connect(settings.database_url)
    try:
        have = set(await applied(conn))
        done = []
        for migration in known:
            if migration.name in have or (pre_only and migration.step == "post"):
                continue
            if await _apply(conn, migration, settings):
                done.append(migration)
        return done
    finally:
        await conn.close()


async def _apply(conn: asyncpg.Connection, migration: Migration, settings: Settings) -> bool:
    """Apply one migration unless another process just did; a lock it cannot get within
    ``migrate_lock_timeout_s`` rolls it back to try again, for up to ``migrate_timeout_s``."""
    give_up = time.monotonic() + settings.migrate_timeout_s
    delay_s = 0.1
    while True:
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK)  # one migrator at a time
                # Set after the advisory lock: another migrator may hold that for long, harmlessly.
                lock_timeout = f"{max(1, round(settings.migrate_lock_timeout_s * 1000))}ms"
                await conn.execute("SELECT set_config('lock_timeout', $1, true)", lock_timeout)
                if await conn.fetchval("SELECT to_regclass('schema_migrations')") is None:
                    await conn.execute(_TABLE)
                elif await conn.fetchval("SELECT 1 FROM schema_migrations WHERE name = $1", migration.name):
                    return False  # another process applied it meanwhile
                await conn.execute(migration.sql)
                await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", migration.name)
        except asyncpg.exceptions.LockNotAvailableError:
            if time.monotonic() + delay_s > give_up:
                raise SchemaError(
                    f"migration {migration.name}: a table it changes stayed in use (a long transaction?) "
                    f"for {settings.migrate_timeout_s:g} s (STEPCAST_MIGRATE_TIMEOUT_S); nothing was "
                    "changed: run `stepcast migrate` again"
                ) from None
            logger.warning(
                "migration %s: a table it changes is in use; gave way after %g s, trying again in %.1f s",
                migration.name,
                settings.migrate_lock_timeout_s,
                delay_s,
            )
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 5.0)
        except asyncpg.PostgresError as exc:
            if isinstance(exc, asyncpg.PostgresConnectionError):
                raise
            raise SchemaError(f"migration {migration.name} failed, and changed nothing: {exc}") from exc
        else:
            logger.info("applied migration %s", migration.name)
            return True
