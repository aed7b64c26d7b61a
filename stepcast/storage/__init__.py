"""Object storage for generated images, behind one interface (:class:`Storage`).

Keys are ``<job_id>/<attempt>/<index>.png`` (:func:`image_key`): each attempt writes under its
own keys, so a stale attempt never overwrites the winner's images; the job id makes them
unguessable.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from stepcast.settings import SharedSettings
from stepcast.storage.base import Data, Put, Storage, image_key

__all__ = ["Data", "Put", "Storage", "image_key", "open_storage"]


@contextlib.asynccontextmanager
async def open_storage(settings: SharedSettings) -> AsyncIterator[Storage]:
    """The configured backend, owning its connections for the context's lifetime."""
    if settings.storage == "s3":
        from stepcast.storage.s3 import S3Storage

        async with S3Storage.open(settings) as s3:
            yield s3
    else:
        from stepcast.storage.local import LocalStorage

        yield LocalStorage(settings.storage_dir)
