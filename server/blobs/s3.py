"""Blobs as objects in an S3-compatible store (AWS S3, SeaweedFS, MinIO, ...).

Objects are keyed ``blobs/<sha256>`` in one bucket, addressed path-style
(``<endpoint>/<bucket>/<key>``) so any S3-compatible server works without DNS tricks.

Invariants:

- The only address contacted is ``endpoint_url``; credentials are always explicit, so
  boto3 never falls back to instance-metadata or other credential providers.
- A name is validated (64 lowercase hex) before any request is made.
- An S3 PUT is atomic: readers see the whole object or none. Puts of a stored blob of the
  right size are skipped; concurrent puts of the same blob write equal bytes.
- Every boto3/botocore failure is wrapped here: a missing object or bucket becomes
  :class:`~server.errors.NotFoundError`, anything else :class:`~server.errors.BlobStoreError`.
- The bucket is created on the first write if it does not exist.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from server.blobs import CHUNK_BYTES
from server.blobs.local import check_range, require_sha256
from server.errors import BadRequestError, BlobStoreError, NotFoundError

if TYPE_CHECKING:
    from botocore.response import StreamingBody
    from mypy_boto3_s3 import S3Client

KEY_PREFIX = "blobs/"
MULTIPART_BYTES = 64 * 1024 * 1024
"""Files at least this big are uploaded in parts of this size, several at a time."""

_MISSING_CODES = frozenset({"404", "NoSuchKey", "NoSuchBucket", "NotFound"})
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")

_S3Error = (BotoCoreError, ClientError, Boto3Error)


class S3BlobStore:
    """Blobs in bucket ``bucket`` of the S3-compatible store at ``endpoint_url``."""

    def __init__(
        self,
        endpoint_url: str,
        bucket: str,
        access_key: str,
        secret_key: str,
        region: str = "us-east-1",
        *,
        chunk_bytes: int = CHUNK_BYTES,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_attempts: int = 3,
    ) -> None:
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be positive")
        self.endpoint_url = endpoint_url
        self.bucket = bucket
        self.region = region
        self.chunk_bytes = chunk_bytes
        # A private session: boto3's default session is shared, mutable global state.
        session = boto3.session.Session(
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=region,
        )
        self._client: S3Client = session.client(
            "s3",
            endpoint_url=endpoint_url,
            config=Config(
                s3={"addressing_style": "path"},
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                retries={"max_attempts": max_attempts, "mode": "standard"},
                max_pool_connections=32,
            ),
        )
        self._transfer = TransferConfig(
            multipart_threshold=MULTIPART_BYTES,
            multipart_chunksize=MULTIPART_BYTES,
            max_concurrency=4,
        )
        self._bucket_ready = threading.Event()
        self._bucket_lock = threading.Lock()

    @staticmethod
    def key_for(sha256: str) -> str:
        return KEY_PREFIX + require_sha256(sha256)

    def put_file(self, path: Path, sha256: str, size: int) -> None:
        key = self.key_for(sha256)
        try:
            actual = os.stat(path).st_size
        except FileNotFoundError:
            raise BadRequestError(f"no file to store at {path}") from None
        if actual != size:
            raise BadRequestError(f"{path} holds {actual} bytes, expected {size}")
        self._ensure_bucket()
        if self._stored_size(key) == size:
            return
        try:
            self._client.upload_file(
                str(path),
                self.bucket,
                key,
                ExtraArgs={"ContentType": "application/octet-stream"},
                Config=self._transfer,
            )
        except _S3Error as exc:
            _raise_wrapped(exc, f"storing blob {sha256}")

    def exists(self, sha256: str) -> bool:
        return self._stored_size(self.key_for(sha256)) is not None

    def size(self, sha256: str) -> int:
        size = self._stored_size(self.key_for(sha256))
        if size is None:
            raise NotFoundError(f"blob {sha256} not found")
        return size

    def iter_range(self, sha256: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Chunks of at most ``chunk_bytes``, streamed from one ranged GET.

        A missing blob or a bad range raises at the call; iterate to the end (or close
        the iterator) to hand the connection back.
        """
        key = self.key_for(sha256)
        if start < 0 or (end is not None and end < start):
            raise BadRequestError(f"range [{start}, {end}) is not a byte range")
        if end == start:  # nothing to read: HTTP cannot ask for zero bytes
            check_range(start, end, self.size(sha256))
            return iter(())
        last = "" if end is None else str(end - 1)
        try:
            response = self._client.get_object(
                Bucket=self.bucket, Key=key, Range=f"bytes={start}-{last}"
            )
        except ClientError as exc:
            if _error_code(exc) in {"InvalidRange", "416"}:
                # Past the end; an open range starting exactly at the end is empty.
                check_range(start, end, self.size(sha256))
                return iter(())
            _raise_wrapped(exc, f"reading blob {sha256}", missing=f"blob {sha256} not found")
        except _S3Error as exc:
            _raise_wrapped(exc, f"reading blob {sha256}")
        body = response["Body"]
        try:
            total = _total_size(response.get("ContentRange"), response["ContentLength"], start)
            stop = check_range(start, end, total)
        except BaseException:
            body.close()
            raise
        return _BodyChunks(body, self.chunk_bytes, stop - start, sha256)

    def local_path(self, sha256: str) -> Path | None:
        require_sha256(sha256)
        return None

    def fetch_to(self, sha256: str, dest: Path) -> None:
        key = self.key_for(sha256)
        dest = Path(dest)
        fd, tmp_name = tempfile.mkstemp(
            dir=dest.parent, prefix=f".{sha256[:16]}.", suffix=".incomplete"
        )
        os.close(fd)
        try:
            self._client.download_file(self.bucket, key, tmp_name, Config=self._transfer)
            os.replace(tmp_name, dest)
        except _S3Error as exc:
            Path(tmp_name).unlink(missing_ok=True)
            _raise_wrapped(exc, f"fetching blob {sha256}", missing=f"blob {sha256} not found")
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    def delete(self, sha256: str) -> None:
        """Remove the blob; deleting a missing blob does nothing."""
        key = self.key_for(sha256)
        try:
            self._client.delete_object(Bucket=self.bucket, Key=key)
        except _S3Error as exc:
            if isinstance(exc, ClientError) and _error_code(exc) in _MISSING_CODES:
                return
            _raise_wrapped(exc, f"deleting blob {sha256}")

    def _stored_size(self, key: str) -> int | None:
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=key)
        except _S3Error as exc:
            if isinstance(exc, ClientError) and _error_code(exc) in _MISSING_CODES:
                return None
            _raise_wrapped(exc, f"looking up {key}")
        return head["ContentLength"]

    def _ensure_bucket(self) -> None:
        if self._bucket_ready.is_set():
            return
        with self._bucket_lock:
            if self._bucket_ready.is_set():
                return
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if _error_code(exc) not in _MISSING_CODES:
                    _raise_wrapped(exc, f"looking up bucket {self.bucket}")
                self._create_bucket()
            except _S3Error as exc:
                _raise_wrapped(exc, f"looking up bucket {self.bucket}")
            self._bucket_ready.set()

    def _create_bucket(self) -> None:
        try:
            if self.region == "us-east-1":
                self._client.create_bucket(Bucket=self.bucket)
            else:
                self._client.create_bucket(
                    Bucket=self.bucket,
                    CreateBucketConfiguration={"LocationConstraint": self.region},  # type: ignore[typeddict-item]
                )
        except ClientError as exc:
            if _error_code(exc) in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                return  # made by a concurrent writer
            _raise_wrapped(exc, f"creating bucket {self.bucket}")
        except _S3Error as exc:
            _raise_wrapped(exc, f"creating bucket {self.bucket}")


class _BodyChunks(Iterator[bytes]):
    """The chunks of one GET response body; closes the body when done, failed or closed."""

    def __init__(self, body: StreamingBody, chunk_bytes: int, length: int, sha256: str) -> None:
        self._body = body
        self._chunks = body.iter_chunks(chunk_bytes)
        self._remaining = length
        self._sha256 = sha256

    def __next__(self) -> bytes:
        if self._remaining <= 0:
            self.close()
            raise StopIteration
        try:
            chunk = next(self._chunks, b"")
        except _S3Error as exc:
            self.close()
            _raise_wrapped(exc, f"reading blob {self._sha256}")
        except BaseException:
            self.close()
            raise
        if not chunk:
            self.close()
            raise BlobStoreError(f"blob {self._sha256} ended {self._remaining} bytes early")
        chunk = chunk[: self._remaining]
        self._remaining -= len(chunk)
        return chunk

    def close(self) -> None:
        self._remaining = 0
        self._body.close()


def _total_size(content_range: str | None, content_length: int, start: int) -> int:
    """The object's size from a ranged GET's ``Content-Range`` (or a plain 200's length)."""
    if content_range is None:  # the server ignored the range and sent it all
        if start != 0:
            raise BlobStoreError("the blob store ignored a byte range")
        return content_length
    match = _CONTENT_RANGE.fullmatch(content_range.strip())
    if match is None:
        raise BlobStoreError(f"the blob store sent an unreadable Content-Range {content_range!r}")
    return int(match.group(3))


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _raise_wrapped(exc: Exception, doing: str, *, missing: str | None = None) -> NoReturn:
    if missing is not None and isinstance(exc, ClientError) and _error_code(exc) in _MISSING_CODES:
        raise NotFoundError(missing) from exc
    raise BlobStoreError(f"blob store failed {doing}: {exc}") from exc
