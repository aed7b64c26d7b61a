"""The models workers serve (the schema's ``models`` and ``workers``, migration 0005).

A worker announces itself and its model's card when it starts, renews its row with its
heartbeat and deletes it when it stops; a row not renewed in time, or whose worker session
(0004) has ended, is not live. A model's card outlives its workers, so that its jobs are
taken while its pool is scaled to zero, until nobody has served it for ``keep_s``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from stepcast.db.store import Store
from stepcast.models import ModelCard

# A worker row is live while its time is ahead and its session, if it recorded one, is held.
_LIVE = "w.expires_at > now() AND (w.session IS NULL OR worker_session_alive(w.session))"


@dataclass(frozen=True)
class LiveWorker:
    id: str
    card: ModelCard
    started_at: datetime


@dataclass(frozen=True)
class KnownModel:
    card: ModelCard
    seen_at: datetime  # when a worker last served it (now, while one does)
    workers: list[LiveWorker]


class ModelStore(Store):
    async def announce(self, worker_id: str, session: int | None, card: ModelCard, *, lapse_s: float) -> None:
        """Record the worker (live for ``lapse_s``) and make its card its model's newest."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """
                INSERT INTO workers (id, model, session, card, expires_at)
                VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))
                ON CONFLICT (id) DO UPDATE SET model = EXCLUDED.model, session = EXCLUDED.session,
                    card = EXCLUDED.card, expires_at = EXCLUDED.expires_at
                """,
                worker_id, card.name, session, card.to_json(), lapse_s,
            )  # fmt: skip
            await conn.execute(
                """
                INSERT INTO models (name, card) VALUES ($1, $2)
                ON CONFLICT (name) DO UPDATE SET card = EXCLUDED.card, seen_at = now()
                """,
                card.name,
                card.to_json(),
            )

    async def renew(self, worker_id: str, session: int | None, *, lapse_s: float) -> bool:
        """Keep the worker live ``lapse_s`` more; False when its row is gone (announce again)."""
        renewed = await self.pool.fetchval(
            """
            WITH renewed AS (
                UPDATE workers SET expires_at = now() + make_interval(secs => $3),
                    session = coalesce($2, session)  -- (None: being reopened; the old one is gone)
                WHERE id = $1 RETURNING model
            )
            UPDATE models SET seen_at = now() FROM renewed WHERE models.name = renewed.model
            RETURNING true
            """,
            worker_id, session, lapse_s,
        )  # fmt: skip
        return bool(renewed)

    async def leave(self, worker_id: str) -> None:
        await self.pool.execute("DELETE FROM workers WHERE id = $1", worker_id)

    async def known(self, keep_s: float) -> dict[str, KnownModel]:
        """Every model served within ``keep_s``, or with a live worker, and its live workers."""
        rows = await self.pool.fetch(
            f"""
            SELECT m.name, m.card, m.seen_at, w.id AS worker, w.card AS worker_card, w.started_at
            FROM models m
            LEFT JOIN workers w ON w.model = m.name AND {_LIVE}
            WHERE m.seen_at > now() - make_interval(secs => $1) OR w.id IS NOT NULL
            ORDER BY m.name, w.started_at, w.id
            """,
            keep_s,
        )
        known: dict[str, KnownModel] = {}
        for row in rows:
            model = known.setdefault(
                row["name"], KnownModel(ModelCard.from_json(row["card"]), row["seen_at"], [])
            )
            if row["worker"] is not None:
                card = ModelCard.from_json(row["worker_card"])
                model.workers.append(LiveWorker(row["worker"], card, row["started_at"]))
        return known

    async def forget_lapsed(self, older_than_s: float) -> int:
        """Delete the rows of workers that lapsed more than ``older_than_s`` ago (the retention pass)."""
        deleted = await self.pool.fetchval(
            """
            WITH gone AS (
                DELETE FROM workers WHERE expires_at < now() - make_interval(secs => $1) RETURNING 1
            )
            SELECT count(*) FROM gone
            """,
            older_than_s,
        )
        return int(deleted)
