"""A store: one aggregate's queries (:class:`stepcast.db.Database` holds one of each).

A store holds nothing but the pool it queries through; the Database owns the
pool (connect, close).
"""

from __future__ import annotations

import asyncpg


class Store:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
