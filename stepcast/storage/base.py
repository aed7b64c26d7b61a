"""The storage interface every backend implements, and where images go."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

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
