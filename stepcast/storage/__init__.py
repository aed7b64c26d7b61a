"""Object storage for generated images, behind one interface.

Keys are deterministic (``<job_id>/<index>.png``) so a rerun of a job
overwrites rather than duplicates; the job id in them makes them unguessable.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

from stepcast.settings import Settings

# An object's bytes, or a function that makes them (an image encoder): the
# backend calls it off the event loop, in the same thread hop as a local write.
Data = bytes | Callable[[], bytes]
Put = tuple[str, Data, str]  # key, data, content type


class Storage(Protocol):
    async def put(self, key: str, data: Data, content_type: str) -> None: ...

    async def put_all(self, puts: Sequence[Put]) -> list[BaseException | None]:
        """Several puts at once (a batch's images): each one's error, or None."""
        ...

    async def get(self, key: str) -> bytes:
        """The object's bytes; raises KeyError if it does not exist."""
        ...

    async def delete(self, key: str) -> None: ...

    async def url(self, key: str) -> str:
        """A URL a client can GET the object from (presigned where the backend needs it)."""
        ...


def image_key(job_id: str, index: int, *, attempt: int, extension: str = "png") -> str:
    """Where an attempt stores a job's image: each attempt under its own keys, so a stale
    attempt never overwrites the images of the one that won."""
    return f"{job_id}/{attempt}/{index}.{extension}"


@contextlib.asynccontextmanager
async def open_storage(settings: Settings) -> AsyncIterator[Storage]:
    """The configured backend, owning its connections for the context's lifetime."""
    if settings.storage == "s3":
        from stepcast.storage.s3 import S3Storage

        async with S3Storage.open(settings) as s3:
            yield s3
    else:
        from stepcast.storage.local import LocalStorage

        yield LocalStorage(settings.storage_dir)
