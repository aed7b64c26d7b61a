"""Both storage backends, for real: the filesystem, and S3 over HTTP (moto's server)."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from aiobotocore.session import get_session

from stepcast.settings import Settings
from stepcast.storage import image_key, open_storage
from stepcast.storage.local import LocalStorage
from tests.conftest import Stack

PNG_BYTES = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


@pytest.fixture
async def s3_settings(s3_endpoint: str, make_settings: Callable[..., Settings]) -> Settings:
    bucket = f"stepcast-{uuid.uuid4().hex[:10]}"
    settings = make_settings(
        storage="s3", s3_endpoint_url=s3_endpoint, s3_bucket=bucket,
        s3_access_key_id="test", s3_secret_access_key="test", s3_presign_s=300,
    )  # fmt: skip
    session = get_session()
    async with session.create_client(
        "s3", endpoint_url=s3_endpoint, region_name="us-east-1",
        aws_access_key_id="test", aws_secret_access_key="test",
    ) as client:  # fmt: skip
        await client.create_bucket(Bucket=bucket)
    return settings


async def round_trip(settings: Settings) -> str:
    key = image_key(str(uuid.uuid4()), 0, attempt=1)
    async with open_storage(settings) as storage:
        await storage.put(key, PNG_BYTES, "image/png")
        assert await storage.get(key) == PNG_BYTES
        # A rerun overwrites; the bytes may come from an encoder, called off the event loop.
        await storage.put(key, lambda: PNG_BYTES[::-1], "image/png")
        assert await storage.get(key) == PNG_BYTES[::-1]
        url = await storage.url(key)
        await storage.delete(key)
        with pytest.raises(KeyError):
            await storage.get(key)
        with pytest.raises(KeyError):
            await storage.get(image_key(str(uuid.uuid4()), 0, attempt=1))
        # A batch's images at once: one that cannot be encoded fails alone.
        batch = [image_key(str(uuid.uuid4()), 0, attempt=1) for _ in range(3)]
        errors = await storage.put_all(
            [
                (batch[0], PNG_BYTES, "image/png"),
                (batch[1], broken, "image/png"),
                (batch[2], lambda: b"2", "image/png"),
            ]
        )
        assert errors[0] is None and isinstance(errors[1], ValueError) and errors[2] is None
        assert [await storage.get(batch[0]), await storage.get(batch[2])] == [PNG_BYTES, b"2"]
        with pytest.raises(KeyError):
            await storage.get(batch[1])
    return url


def broken() -> bytes:
    raise ValueError("not an image")


async def test_local_round_trip(settings: Settings) -> None:
    url = await round_trip(settings)
    assert url.startswith("/v1/images/") and url.endswith("/1/0.png")


async def test_s3_round_trip(s3_settings: Settings) -> None:
    url = await round_trip(s3_settings)
    assert url.startswith(s3_settings.s3_endpoint_url or "-") and "X-Amz-Signature=" in url
    assert "X-Amz-Expires=300" in url


async def test_presigned_url_serves_the_object_with_its_type(s3_settings: Settings) -> None:
    key = image_key(str(uuid.uuid4()), 1, attempt=1)
    async with open_storage(s3_settings) as storage:
        await storage.put(key, PNG_BYTES, "image/png")
        url = await storage.url(key)
    async with httpx.AsyncClient() as client:
        response = await client.get(url)
        assert response.status_code == 200
        assert response.content == PNG_BYTES and response.headers["content-type"] == "image/png"


def test_local_keys_cannot_escape_the_root(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "images")
    for key in ("../secret", "a/../../secret", "/etc/passwd", ""):
        with pytest.raises(KeyError):
            storage.path(key)


async def test_a_job_on_s3_storage_completes_with_a_presigned_image(
    s3_settings: Settings,
    serve: Callable[[Settings], Awaitable[str]],
    run_worker: Callable[..., Awaitable[None]],
) -> None:
    from stepcast.db import Database

    base_url = await serve(s3_settings)
    await run_worker(s3_settings)
    db = await Database.connect(s3_settings.database_url, max_size=1)
    try:
        async with httpx.AsyncClient(base_url=base_url) as client:
            stack = Stack(s3_settings, client, db)
            job = await stack.wait((await stack.submit(steps=2, num_images=2))["id"])
            assert job["status"] == "completed", job
            urls = [image["url"] for image in job["result"]["images"]]
            assert all("X-Amz-Signature=" in url for url in urls)
            for url in urls:
                response = await client.get(url)  # absolute URL: straight to the S3 endpoint
                assert response.status_code == 200 and response.content.startswith(b"\x89PNG")
            # Nothing was written locally.
            assert not s3_settings.storage_dir.exists()
    finally:
        await db.close()
