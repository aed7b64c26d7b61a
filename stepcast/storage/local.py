"""Local filesystem storage: the embedded default, served by the server at /v1/images/."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from stepcast.storage.base import Data, Put

URL_PREFIX = "/v1/images/"


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def path(self, key: str) -> Path:
        """The file behind ``key``; refuses keys that would escape the root. Judged from the
        key's text (no filesystem calls: every image written asks): the root holds no links."""
        path = Path(os.path.normpath(os.path.join(self.root, key)))
        if not path.is_relative_to(self.root) or path == self.root:
            raise KeyError(key)
        return path

    async def put(self, key: str, data: Data, content_type: str) -> None:
        await asyncio.to_thread(self._write, key, data)

    async def put_all(self, puts: Sequence[Put]) -> list[BaseException | None]:
        """Encoded and written in one thread hop."""
        return await asyncio.to_thread(self._write_all, puts)

    def _write_all(self, puts: Sequence[Put]) -> list[BaseException | None]:
        errors: list[BaseException | None] = []
        for key, data, _ in puts:
            try:
                self._write(key, data)
            except Exception as exc:
                errors.append(exc)
            else:
                errors.append(None)
        return errors

    def _write(self, key: str, data: Data) -> None:
        path = self.path(key)
        payload = data() if callable(data) else data
        # Write-then-rename: a reader never sees half an image.
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    async def get(self, key: str) -> bytes:
        try:
            return await asyncio.to_thread(self.path(key).read_bytes)
        except (FileNotFoundError, IsADirectoryError):
            raise KeyError(key) from None

    async def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    async def url(self, key: str) -> str:
        return URL_PREFIX + key
