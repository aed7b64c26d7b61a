"""S3-compatible storage (AWS S3, MinIO, R2, …) on aiobotocore, with presigned GET URLs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError

from stepcast.settings import SharedSettings
from stepcast.storage.base import Data, Put


class S3Storage:
    def __init__(self, client: Any, bucket: str, presign_s: int) -> None:
        self.client = client
        self.bucket = bucket
        self.presign_s = presign_s

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, settings: SharedSettings) -> AsyncIterator[S3Storage]:
        session = get_session()
        async with session.create_client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
            aws_access_key_id=settings.s3_access_key_id,
            aws_secret_access_key=settings.s3_secret_access_key,
            config=AioConfig(signature_version="s3v4", retries={"max_attempts": 5, "mode": "standard"}),
        ) as client:
            yield cls(client, settings.s3_bucket, settings.s3_presign_s)

    async def put(self, key: str, data: Data, content_type: str) -> None:
        body = await asyncio.to_thread(data) if callable(data) else data
        await self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType=content_type)

    async def put_all(self, puts: Sequence[Put]) -> list[BaseException | None]:
        """Uploaded concurrently."""
        return list(await asyncio.gather(*(self.put(*put) for put in puts), return_exceptions=True))

    async def get(self, key: str) -> bytes:
        try:
            response = await self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404"}:
                raise KeyError(key) from None
            raise
        async with response["Body"] as body:
            data: bytes = await body.read()
        return data

    async def delete(self, key: str) -> None:
        await self.client.delete_object(Bucket=self.bucket, Key=key)

    async def url(self, key: str) -> str:
        url: str = await self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.presign_s
        )
        return url
