"""The store on S3-compatible object storage (AWS S3, MinIO, SeaweedFS, Ceph RGW, R2).

Endpoint and credentials come from the standard AWS variables, read by boto3 itself:
`AWS_ENDPOINT_URL_S3` (or `AWS_ENDPOINT_URL`), `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_REGION` (default us-east-1 here, which every S3-compatible server accepts).

Conditional writes are S3's own: `If-None-Match: *` (create only if absent) and `If-Match`
(replace only if unchanged); both answer 412 Precondition Failed when they lose.
boto3 rather than hand-written HTTP: it signs (SigV4), retries, paginates and reads the AWS
configuration chain, and is the client every S3-compatible server tests against.
"""

from __future__ import annotations

import os
from datetime import datetime

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from model_store.storage import KeyNotFound, ObjectInfo, StorageError

# Short timeouts and few retries: a poll of an unreachable store must fail in seconds (the
# service backs off and keeps serving what it has), not hang for minutes in botocore's defaults.
CONNECT_TIMEOUT_S = float(os.environ.get("UPGRADER_S3_CONNECT_TIMEOUT_S", "3"))
READ_TIMEOUT_S = float(os.environ.get("UPGRADER_S3_READ_TIMEOUT_S", "30"))
_MISSING = {"NoSuchKey", "404", "NotFound"}
_LOST_RACE = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class S3Storage:
    def __init__(self, bucket: str, prefix: str = "", client=None) -> None:
        if not bucket:
            raise ValueError("an S3 store needs a bucket: s3://BUCKET[/PREFIX]")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.client = client or boto3.session.Session().client(
            "s3",
            region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            config=Config(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
                          retries={"max_attempts": 3, "mode": "standard"},
                          s3={"addressing_style": "path"}),  # works with every S3-compatible server, no DNS per bucket
        )

    @classmethod
    def from_url(cls, url: str) -> "S3Storage":
        bucket, _, prefix = url[len("s3://"):].partition("/")
        return cls(bucket, prefix)

    def _key(self, key: str) -> str:
        if not key or key.startswith("/") or any(part in ("", ".", "..") for part in key.split("/")):
            raise ValueError(f"invalid store key {key!r}")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _fail(self, action: str, key: str, exc: Exception) -> StorageError:
        return StorageError(f"{action} {key!r} in {self.url} failed: {exc}")

    def get(self, key: str) -> bytes:
        return self.get_with_etag(key)[0]

    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return response["Body"].read(), response["ETag"]
        except ClientError as exc:
            if _code(exc) in _MISSING:
                raise KeyNotFound(key) from None
            raise self._fail("reading", key, exc) from None
        except BotoCoreError as exc:
            raise self._fail("reading", key, exc) from None

    def _put(self, key: str, data: bytes, **conditions) -> bool:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **conditions)
            return True
        except ClientError as exc:
            if conditions and _code(exc) in _LOST_RACE:
                return False
            if conditions.get("IfMatch") and _code(exc) in _MISSING:
                return False
            raise self._fail("writing", key, exc) from None
        except BotoCoreError as exc:
            raise self._fail("writing", key, exc) from None

    def put(self, key: str, data: bytes) -> None:
        self._put(key, data)

    def create(self, key: str, data: bytes) -> bool:
        return self._put(key, data, IfNoneMatch="*")

    def replace(self, key: str, data: bytes, etag: str | None) -> bool:
        return self.create(key, data) if etag is None else self._put(key, data, IfMatch=etag)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        found = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    modified: datetime = obj["LastModified"]
                    found.append(ObjectInfo(obj["Key"][strip:], obj["Size"], modified.timestamp(), obj.get("ETag", "")))
        except (ClientError, BotoCoreError) as exc:
            raise self._fail("listing", prefix or "/", exc) from None
        return found

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except (ClientError, BotoCoreError) as exc:
            raise self._fail("deleting", key, exc) from None

    def init(self) -> None:
        """Create the bucket unless it exists (idempotent)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _code(exc) not in _MISSING and _code(exc) != "NoSuchBucket":
                raise self._fail("checking bucket", self.bucket, exc) from None
        except BotoCoreError as exc:
            raise self._fail("checking bucket", self.bucket, exc) from None
        try:
            self.client.create_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise self._fail("creating bucket", self.bucket, exc) from None
