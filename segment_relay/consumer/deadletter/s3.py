"""Dead-letter objects in S3 (``s3://BUCKET/PREFIX``), through aiobotocore like the rest of the
relay's AWS calls: credentials and region from the standard chain (IRSA on EKS)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

from ...errors import StartupError


class S3Objects:
    """Objects under ``s3://bucket/prefix/``."""

    def __init__(self, bucket: str, prefix: str = "", *, region: str | None = None,
                 endpoint_url: str | None = None) -> None:
        if not bucket:
            raise ValueError("an s3:// dead letter needs a bucket: s3://BUCKET/PREFIX")
        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self.region = region or os.environ.get("AWS_REGION") or None  # older botocore reads only AWS_DEFAULT_REGION
        self.endpoint_url = endpoint_url
        self._stack = contextlib.AsyncExitStack()
        self._s3: Any = None

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    async def _client(self) -> Any:
        if self._s3 is None:
            config = AioConfig(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60,
                               user_agent_extra="segment-relay",
                               s3={"addressing_style": "path"} if self.endpoint_url else None)
            self._s3 = await self._stack.enter_async_context(get_session().create_client(
                "s3", region_name=self.region, endpoint_url=self.endpoint_url, config=config))
        return self._s3

    async def check(self, probe_name: str) -> None:
        where = f"dead letter {self.describe()}"
        try:
            s3 = await self._client()
            await s3.put_object(Bucket=self.bucket, Key=self.prefix + probe_name, Body=b"{}",
                                ContentType="application/json")
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in ("NoSuchBucket", "404"):
                raise StartupError(f"{where}: the bucket does not exist: create it (aws s3 mb s3://{self.bucket})") from None
            if code in ("AccessDenied", "403", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise StartupError(f"{where}: access denied ({code}); the relay's role needs s3:PutObject on "
                                   f"arn:aws:s3:::{self.bucket}/{self.prefix}*") from None
            raise StartupError(f"{where}: {code or type(exc).__name__}: {error.get('Message', '')}") from None
        except NoCredentialsError:
            raise StartupError(f"{where}: no AWS credentials found (environment, profile, IRSA web identity or "
                               "instance role)") from None
        except EndpointConnectionError as exc:
            raise StartupError(f"{where}: cannot reach S3 at {exc.kwargs.get('endpoint_url')}; "
                               "check the endpoint and network") from None
        except BotoCoreError as exc:
            raise StartupError(f"{where}: {type(exc).__name__}: {exc}") from None

    async def put(self, name: str, data: bytes) -> None:
        s3 = await self._client()
        await s3.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data, ContentType="application/x-ndjson")

    async def names(self, under: str = "") -> AsyncIterator[str]:
        s3 = await self._client()
        paginator = s3.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + under):
            for item in page.get("Contents", []):
                yield item["Key"][len(self.prefix):]

    async def get(self, name: str) -> bytes:
        s3 = await self._client()
        response = await s3.get_object(Bucket=self.bucket, Key=self.prefix + name)
        async with response["Body"] as body:
            return bytes(await body.read())

    async def close(self) -> None:
        self._s3 = None
        await self._stack.aclose()
