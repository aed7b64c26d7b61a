"""What belongs to an owner: API keys (stored as hashes) and the webhook signing secret.

An owner is a name, not a row; its keys and its secret are made on demand.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from stepcast.db.store import Store


@dataclass(frozen=True)
class Key:
    """Whom an active API key speaks for, and its priority class (None: the default)."""

    owner: str
    priority_class: str | None


class OwnerStore(Store):
    async def create_api_key(
        self, *, owner: str, name: str, key_hash: str, prefix: str, priority_class: str | None = None
    ) -> uuid.UUID:
        key_id: uuid.UUID = await self.pool.fetchval(
            """
            INSERT INTO api_keys (owner, name, key_hash, prefix, priority_class) VALUES ($1, $2, $3, $4, $5)
            RETURNING id
            """,
            owner, name, key_hash, prefix, priority_class,
        )  # fmt: skip
        return key_id

    async def of_key(self, key_hash: str) -> Key | None:
        row = await self.pool.fetchrow(
            "SELECT owner, priority_class FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL", key_hash
        )
        return Key(row["owner"], row["priority_class"]) if row else None

    async def active_keys(self, key_hashes: list[str]) -> set[str]:
        """Which of these key hashes belong to keys not revoked (one query for them all)."""
        rows = await self.pool.fetch(
            "SELECT key_hash FROM api_keys WHERE key_hash = ANY($1::text[]) AND revoked_at IS NULL",
            key_hashes,
        )
        return {row["key_hash"] for row in rows}

    async def revoke_api_key(self, key_id: uuid.UUID) -> bool:
        revoked = await self.pool.fetchval(
            "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL RETURNING id", key_id
        )
        return revoked is not None

    async def api_keys(self) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            """
            SELECT id, owner, name, prefix, priority_class, created_at, revoked_at FROM api_keys
            ORDER BY created_at
            """
        )
        return [dict(row) for row in rows]

    async def webhook_secret(self, owner: str, new_secret: str) -> str:
        """The owner's signing secret, made (as ``new_secret``) on first use."""
        await self.pool.execute(
            "INSERT INTO owner_secrets (owner, webhook_secret) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            owner, new_secret,
        )  # fmt: skip
        secret: str = await self.pool.fetchval(
            "SELECT webhook_secret FROM owner_secrets WHERE owner = $1", owner
        )
        return secret
