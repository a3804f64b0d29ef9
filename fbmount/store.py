"""Typed S3 calls: the only module that knows botocore.

Every method is awaited from trio and runs on the asyncio thread (bridge.py). Failures
leave as FsError with an errno and a readable message. botocore's "standard" retry mode
gives jittered exponential backoff for 5xx, throttling, resets and timeouts on every
request, and each call also has an overall deadline so that no syscall hangs forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import errno
import logging
import os
import random
import ssl
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import unquote_plus

import aiohttp
import cachetools
import trio
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore import UNSIGNED
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    IncompleteReadError,
    NoCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
    SSLError,
)

from fbmount.bridge import AsyncioThread
from fbmount.credentials import Credentials
from fbmount.dataplane import DataPlane
from fbmount.errors import (
    S3_CODE_ERRNO,
    CopyNotSupported,
    CopyTooLarge,
    FsError,
    PreconditionFailed,
)
from fbmount.tasks import open_nursery
from fbmount.uploadnotes import UploadNotes

log = logging.getLogger("fbmount.s3")

# Codes with which servers say "this operation is switched off here".
COPY_REFUSED_CODES = {"NotImplemented", "501", "MethodNotAllowed", "405", "AccessDenied", "403"}
BODY_RETRIES = 3
MAX_COPY_BYTES = 5 * 1024**3  # S3's limit for one CopyObject; larger: UploadPartCopy
MAX_PARTS = 10_000  # S3's limit of parts in one multipart upload
COPY_PART_BYTES = 512 * 1024**2  # grown so that a 5 TB object fits in MAX_PARTS parts
COPY_PARALLEL = 8
URL_LIFETIME = 900  # seconds a pre-signed data-plane URL is valid


@dataclass(slots=True)
class ObjectInfo:
    """What S3 tells about one object; metadata is None when it came from a LIST."""

    key: str
    size: int
    etag: str
    mtime_ns: int
    metadata: dict[str, str] | None = None
    content_type: str | None = None
    storage_class: str | None = None


@dataclass(slots=True)
class ListPage:
    objects: list[ObjectInfo] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)
    next_token: str | None = None


def _ns(dt: Any) -> int:
    return int(dt.timestamp() * 1e9) if dt is not None else time.time_ns()


def _shared(value: str | None) -> str | None:
    """One string object for a value that repeats on every object of a listing ("STANDARD"),
    not one per object (100,000 listed files: 5 MiB)."""
    return sys.intern(value) if value else value


def _etag(value: str | None) -> str:
    return (value or "").strip('"')


def describe_client_error(e: ClientError) -> tuple[str, str]:
    err = e.response.get("Error", {})
    code = str(err.get("Code") or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
    return code, str(err.get("Message") or code)


def copy_too_large(code: str, message: str) -> bool:
    """S3 answers a CopyObject of more than 5 GiB with InvalidRequest ("The specified copy
    source is larger than the maximum allowable size for a copy source"), which also names
    other mistakes; some servers say EntityTooLarge."""
    text = message.lower()
    return code == "EntityTooLarge" or (
        code == "InvalidRequest" and ("larger" in text or "size" in text)
    )


def to_fs_error(e: BaseException, what: str) -> FsError:
    """Translate a botocore/aiohttp failure into one FsError with a human message."""
    if isinstance(e, FsError):
        return e
    if isinstance(e, ClientError):
        code, message = describe_client_error(e)
        return FsError(S3_CODE_ERRNO.get(code, errno.EIO), f"{what}: {code}: {message}")
    if isinstance(e, SSLError | ssl.SSLError):
        return FsError(errno.EIO, f"{what}: TLS certificate does not verify: {e}")
    if isinstance(e, EndpointConnectionError):
        return FsError(errno.EIO, f"{what}: cannot connect to the endpoint: {e}")
    if isinstance(e, ReadTimeoutError | TimeoutError):
        return FsError(errno.ETIMEDOUT, f"{what}: timed out")
    if isinstance(e, NoCredentialsError):
        return FsError(errno.EACCES, f"{what}: no credentials found")
    if isinstance(e, BotoCoreError | OSError):
        return FsError(errno.EIO, f"{what}: {type(e).__name__}: {e}")
    return FsError(errno.EIO, f"{what}: {type(e).__name__}: {e}")


# Tests only: a file naming S3 operations ("PutObject", "UploadPart", ...), one a word, that
# then fail with a RuntimeError before they are sent. That is a bug, not an S3 error, and
# the suite uses it to prove no bug in an upload or in crash recovery ends the mount.
FAULT_FILE_ENV = "FBMOUNT_TEST_FAULT_FILE"


def inject_test_fault(op: str, fault_file: str | None) -> None:
    if not fault_file:
        return
    try:
        with open(fault_file) as f:
            ops = f.read().split()
    except FileNotFoundError:
        return
    if op in ops:
        raise RuntimeError(f"injected fault in {op} ({FAULT_FILE_ENV})")


def _drop_expect_header(request: Any, **_: Any) -> None:
    # Unsigned header; SeaweedFS stalls the next request after an unanswered 100-continue.
    if "Expect" in request.headers:
        del request.headers["Expect"]


class S3Store:
    """One aiobotocore client for one bucket, shared by every path of the mount."""

    def __init__(
        self,
        bucket: str | None,
        endpoint: str,
        region: str,
        credentials: Credentials | None,
        profile: str | None = None,
        ca_bundle: str | None = None,
        pool_size: int = 64,
        retries: int = 5,
        timeout: float = 120.0,
        copy_mode: str = "auto",
        addressing_style: str = "path",
        max_rps: float = 0.0,
        flexible_checksums: bool = False,
    ) -> None:
        self.bucket = bucket
        self.endpoint = endpoint
        self.timeout = timeout
        self.copy_supported: bool | None = {"yes": True, "no": False}.get(copy_mode)
        self.delete_many_supported: bool | None = None
        self.requests: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.traffic: Counter[str] = Counter()  # bytes "up" and "down"
        self.rate = RateLimiter(max_rps)
        self._fault_file = os.environ.get(FAULT_FILE_ENV)
        self.upload_notes: UploadNotes | None = None  # the staging dir's crash notes
        self._thread = AsyncioThread()
        self._client: Any = None
        self._client_cm: Any = None
        self._http: aiohttp.ClientSession | None = None
        self._ranges: DataPlane | None = None  # thread-side GETs and part PUTs
        self._range_threads = trio.CapacityLimiter(max(8, pool_size // 2))
        self._get_urls: cachetools.TTLCache[str, str] = cachetools.TTLCache(
            4096, URL_LIFETIME / 2, timer=time.monotonic
        )
        self._settings = dict(
            endpoint=endpoint,
            region=region,
            credentials=credentials,
            profile=profile,
            ca_bundle=ca_bundle,
            pool_size=pool_size,
            retries=retries,
            addressing_style=addressing_style,
            flexible_checksums=flexible_checksums,
        )

    @property
    def bytes_up(self) -> int:
        return self.traffic["up"]

    @property
    def bytes_down(self) -> int:
        return self.traffic["down"]

    def for_bucket(self, bucket: str) -> S3Store:
        """The same client, connections, rate limit and counters, for another bucket (an
        account mount's buckets share one S3Store). Never close() the view; close this."""
        view = copy.copy(self)
        view.bucket = bucket
        view.upload_notes = None  # the bucket's own, set when its staging area exists
        view._get_urls = cachetools.TTLCache(4096, URL_LIFETIME / 2, timer=time.monotonic)
        return view

    # ----- life cycle (blocking; called outside trio) -----------------------------------
    def open(self) -> None:
        self._thread.call_blocking(self._open_async, timeout=30)

    async def _open_async(self) -> None:
        s = self._settings
        creds: Credentials | None = s["credentials"]  # type: ignore[assignment]
        session = get_session()
        if s["profile"]:
            session.set_config_variable("profile", s["profile"])
        config = AioConfig(
            region_name=s["region"],
            signature_version="s3v4",
            retries={"max_attempts": s["retries"], "mode": "standard"},
            max_pool_connections=s["pool_size"],
            connect_timeout=10,
            read_timeout=60,
            tcp_keepalive=True,
            # Servers that do not know botocore's flexible checksums reject or mangle them.
            request_checksum_calculation=(
                "when_supported" if s["flexible_checksums"] else "when_required"
            ),
            response_checksum_validation="when_required",
            s3={"addressing_style": s["addressing_style"]},
        )
        kwargs: dict[str, Any] = {"endpoint_url": s["endpoint"], "config": config}
        if creds is not None:
            kwargs.update(
                aws_access_key_id=creds.access_key,
                aws_secret_access_key=creds.secret_key,
                aws_session_token=creds.session_token,
            )
        if s["ca_bundle"]:
            kwargs["verify"] = str(s["ca_bundle"])
        if creds is not None and not creds.access_key:
            kwargs["config"] = config.merge(AioConfig(signature_version=UNSIGNED))
        self._client_cm = session.create_client("s3", **kwargs)
        self._client = await self._client_cm.__aenter__()
        self._client.meta.events.register("before-send.s3", _drop_expect_header)
        if creds is not None and creds.access_key:  # pre-signed URLs need keys
            self._ranges = DataPlane(s["endpoint"], s["ca_bundle"] or None)
            ctx = ssl.create_default_context(cafile=s["ca_bundle"] or None)
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=16, ssl=ctx),
                timeout=aiohttp.ClientTimeout(total=60, sock_connect=10),
                auto_decompress=True,
            )

    def close(self) -> None:
        if self._ranges is not None:
            self._ranges.close()
        if self._http is not None:
            http, self._http = self._http, None
            with contextlib.suppress(Exception):
                self._thread.call_blocking(http.close, 10)
        if self._client_cm is not None:
            try:
                self._thread.call_blocking(lambda: self._client_cm.__aexit__(None, None, None), 10)
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
            self._client_cm = None
        self._thread.stop()

    def presign_get(self, key: str, expires: int) -> str:
        """A pre-signed GET URL (pure computation, no request)."""
        return self._thread.call_blocking(
            lambda: self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires
            ),
            10,
        )

    # ----- plumbing ---------------------------------------------------------------------
    async def _call(self, op: str, what: str, coro_fn: Any, *args: Any) -> Any:
        inject_test_fault(op, self._fault_file)
        self.requests[op] += 1
        log.debug("%s %s", op, what)
        await self.rate.acquire()
        try:
            with trio.fail_after(self.timeout):
                return await self._thread.run(coro_fn, *args)
        except trio.TooSlowError:
            self.errors[op] += 1
            raise FsError(errno.ETIMEDOUT, f"{what}: no answer within {self.timeout:g}s") from None
        except FsError:
            self.errors[op] += 1
            raise
        except (Exception, ssl.SSLError) as e:
            self.errors[op] += 1
            raise to_fs_error(e, what) from None

    # ----- objects ----------------------------------------------------------------------
    async def head(self, key: str, bucket: str | None = None) -> ObjectInfo | None:
        """HEAD an object; None when it does not exist."""

        async def go() -> ObjectInfo | None:
            try:
                r = await self._client.head_object(Bucket=bucket or self.bucket, Key=key)
            except ClientError as e:
                if describe_client_error(e)[0] in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
            return ObjectInfo(
                key,
                r.get("ContentLength", 0),
                _etag(r.get("ETag")),
                _ns(r.get("LastModified")),
                {k.lower(): v for k, v in r.get("Metadata", {}).items()},
                r.get("ContentType"),
                r.get("StorageClass"),
            )

        return await self._call("HeadObject", f"HEAD {key}", go)

    async def get_range(self, key: str, start: int, end: int, etag: str | None = None) -> bytes:
        """Bytes [start, end) of an object, verified for length; If-Match pins the version."""
        if self._ranges is not None:
            return await self._fast_get_range(key, start, end, etag)
        return await self._botocore_get_range(key, start, end, etag)

    async def _fast_get_range(self, key: str, start: int, end: int, etag: str | None) -> bytes:
        """dataplane.py: the body is read in a worker thread with the GIL released."""
        assert self._ranges is not None
        url = self._get_urls.get(key)
        if url is None:
            # Range and If-Match are unsigned headers: one URL serves every GET of the key
            # for its lifetime (signing costs ~0.4 ms of CPU each time).
            url = await self._presign("get_object", {"Key": key})
            self._get_urls[key] = url
        data = await self._data_call(
            "GetObject",
            f"GET {key} [{start}, {end})",
            self._ranges.get,
            url,
            start,
            end,
            etag,
            key,
        )
        self.traffic["down"] += len(data)
        return data  # a bytearray: callers slice it into bytes

    async def _presign(self, method: str, params: dict[str, Any]) -> str:
        return await self._thread.run(
            self._client.generate_presigned_url,
            method,
            Params={"Bucket": self.bucket, **params},
            ExpiresIn=URL_LIFETIME,
        )

    async def _data_call(self, op: str, what: str, fn: Any, *args: Any) -> Any:
        """Run a dataplane.py transfer in a worker thread: counted, rate-limited, deadlined."""
        inject_test_fault(op, self._fault_file)
        self.requests[op] += 1
        log.debug("%s %s", op, what)
        await self.rate.acquire()
        try:
            with trio.fail_after(self.timeout):
                return await trio.to_thread.run_sync(
                    fn, *args, abandon_on_cancel=True, limiter=self._range_threads
                )
        except trio.TooSlowError:
            self.errors[op] += 1
            raise FsError(errno.ETIMEDOUT, f"{what}: no answer within {self.timeout:g}s") from None
        except FsError:
            self.errors[op] += 1
            raise

    async def _botocore_get_range(self, key: str, start: int, end: int, etag: str | None) -> bytes:

        async def go() -> bytes:
            want = end - start
            for attempt in range(BODY_RETRIES):
                params: dict[str, Any] = {
                    "Bucket": self.bucket,
                    "Key": key,
                    "Range": f"bytes={start}-{end - 1}",
                }
                if etag:
                    params["IfMatch"] = f'"{etag}"'
                try:
                    r = await self._client.get_object(**params)
                    async with r["Body"] as body:
                        data = await body.read()
                except ClientError as e:
                    code = describe_client_error(e)[0]
                    if code in ("PreconditionFailed", "412"):
                        raise PreconditionFailed(key) from None
                    raise
                # aiohttp reports a body closed before its Content-Length as
                # ClientPayloadError, which aiobotocore passes through unwrapped.
                except (
                    IncompleteReadError,
                    ResponseStreamingError,
                    ConnectionClosedError,
                    aiohttp.ClientPayloadError,
                ) as e:
                    if attempt == BODY_RETRIES - 1:
                        raise FsError(errno.EIO, f"GET {key}: body cut short: {e}") from None
                    continue
                if len(data) == want or (
                    len(data) < want
                    and r.get("ContentLength") == len(data)
                    and _range_total(r) == start + len(data)
                ):
                    self.traffic["down"] += len(data)
                    return data
                if attempt == BODY_RETRIES - 1:
                    raise FsError(errno.EIO, f"GET {key}: got {len(data)} of {want} bytes")
            raise AssertionError("unreachable")

        return await self._call("GetObject", f"GET {key}", go)

    async def get_object(self, key: str) -> bytes:
        """A whole (small) object: symlink targets and the like."""

        async def go() -> bytes:
            r = await self._client.get_object(Bucket=self.bucket, Key=key)
            async with r["Body"] as body:
                data = await body.read()
            if len(data) != r.get("ContentLength", len(data)):
                raise FsError(errno.EIO, f"GET {key}: body cut short")
            self.traffic["down"] += len(data)
            return data

        return await self._call("GetObject", f"GET {key}", go)

    async def put(self, key: str, body: bytes, metadata: dict[str, str], content_type: str) -> str:
        """PutObject with Content-MD5. On the data plane when it can carry the headers:
        botocore's per-request machinery (events, serialisation, signing, aiohttp) cost
        ~2 ms of CPU per small file, a third of a small-file create."""
        if self._ranges is not None and _plain_headers(metadata, content_type):
            return await self._fast_put(key, body, metadata, content_type)

        async def go() -> str:
            r = await self._client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=body,
                Metadata=metadata,
                ContentType=content_type,
                ContentMD5=_md5_b64(body),
            )
            self.traffic["up"] += len(body)
            return _etag(r.get("ETag"))

        return await self._call("PutObject", f"PUT {key}", go)

    async def _fast_put(
        self, key: str, body: bytes, metadata: dict[str, str], content_type: str
    ) -> str:
        """dataplane.py: a pre-signed PUT (content type and metadata are signed headers),
        sent from a worker thread with Content-MD5; retried and errno-mapped there."""
        assert self._ranges is not None
        url = await self._presign(
            "put_object", {"Key": key, "ContentType": content_type, "Metadata": metadata}
        )
        headers = {"Content-Type": content_type}
        headers.update((f"x-amz-meta-{k}", v) for k, v in metadata.items())
        what = f"PUT {key}"
        etag = await self._data_call("PutObject", what, self._ranges.put, url, body, what, headers)
        self.traffic["up"] += len(body)
        return etag

    async def _fast_upload_part(self, key: str, upload_id: str, number: int, body: bytes) -> str:
        """dataplane.py: one buffer, MD5 and send in a worker thread with the GIL released."""
        assert self._ranges is not None
        what = f"part {number} of {key}"
        url = await self._presign(
            "upload_part", {"Key": key, "UploadId": upload_id, "PartNumber": number}
        )
        etag = await self._data_call("UploadPart", what, self._ranges.put, url, body, what)
        self.traffic["up"] += len(body)
        return etag

    async def upload_part_from_file(
        self, key: str, upload_id: str, number: int, fd: int, offset: int, length: int
    ) -> str:
        """UploadPart of bytes [offset, offset + length) of the file `fd`: on the data
        plane the bytes are read as they are sent (memory: one chunk, whatever the part)."""
        if self._ranges is None:
            body = await trio.to_thread.run_sync(os.pread, fd, length, offset)
            return await self.upload_part(key, upload_id, number, body)
        what = f"part {number} of {key}"
        url = await self._presign(
            "upload_part", {"Key": key, "UploadId": upload_id, "PartNumber": number}
        )
        etag = await self._data_call(
            "UploadPart", what, self._ranges.put_file, url, fd, offset, length, what
        )
        self.traffic["up"] += length
        return etag

    async def create_multipart(self, key: str, metadata: dict[str, str], content_type: str) -> str:
        async def go() -> str:
            r = await self._client.create_multipart_upload(
                Bucket=self.bucket, Key=key, Metadata=metadata, ContentType=content_type
            )
            return r["UploadId"]

        notes = self.upload_notes
        note = notes.begin(key) if notes is not None else None  # before: kill -9 mid-request
        try:
            upload_id = await self._call("CreateMultipartUpload", f"multipart {key}", go)
        except BaseException:
            if note is not None:
                notes.discard(note)
            raise
        if note is not None:
            notes.created(note, key, upload_id)
        return upload_id

    async def uploads_begun(self, key: str, since: float) -> list[str]:
        """UploadIds of the open multipart uploads of exactly `key` begun since `since`."""
        r = await self.bucket_call(
            "list_multipart_uploads", "ListMultipartUploads", Bucket=self.bucket, Prefix=key
        )
        return [
            u["UploadId"]
            for u in r.get("Uploads", [])
            if u.get("Key") == key and u["Initiated"].timestamp() >= since
        ]

    async def upload_part(self, key: str, upload_id: str, number: int, body: bytes) -> str:
        if self._ranges is not None:
            return await self._fast_upload_part(key, upload_id, number, body)

        async def go() -> str:
            r = await self._client.upload_part(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=body,
                ContentMD5=_md5_b64(body),
            )
            self.traffic["up"] += len(body)
            return _etag(r.get("ETag"))

        return await self._call("UploadPart", f"part {number} of {key}", go)

    async def complete_multipart(self, key: str, upload_id: str, etags: list[str]) -> str:
        parts = [{"PartNumber": i + 1, "ETag": f'"{t}"'} for i, t in enumerate(etags)]

        async def go() -> str:
            try:
                r = await self._client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
            except ClientError as e:
                # A retried Complete whose first attempt succeeded: the upload is gone but
                # the object is there. Check it instead of failing.
                if describe_client_error(e)[0] != "NoSuchUpload":
                    raise
                info = await self._client.head_object(Bucket=self.bucket, Key=key)
                expected = _multipart_etag(etags)
                if _etag(info.get("ETag")) != expected:
                    raise
                return expected
            return _etag(r.get("ETag"))

        etag = await self._call("CompleteMultipartUpload", f"complete {key}", go)
        if self.upload_notes is not None:
            self.upload_notes.ended(upload_id)
        return etag

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        async def go() -> None:
            try:
                await self._client.abort_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id
                )
            except ClientError as e:
                if describe_client_error(e)[0] != "NoSuchUpload":
                    raise

        await self._call("AbortMultipartUpload", f"abort {key}", go)
        if self.upload_notes is not None:
            self.upload_notes.ended(upload_id)

    async def delete(self, key: str) -> None:
        async def go() -> None:
            await self._client.delete_object(Bucket=self.bucket, Key=key)

        await self._call("DeleteObject", f"DELETE {key}", go)

    async def delete_many(self, keys: list[str]) -> None:
        """DeleteObjects in batches of 1,000; single deletes where the server lacks it.
        Directory markers go after every key under them, deepest first: a server that
        keeps real directories (SeaweedFS) leaves one that still holds files when its
        marker goes first, and lists it again once they are gone."""
        keys = sorted(keys, key=_children_first)
        for i in range(0, len(keys), 1000):
            batch = keys[i : i + 1000]
            if self.delete_many_supported is not False:
                try:
                    await self._delete_batch(batch)
                    self.delete_many_supported = True
                    continue
                except FsError as e:
                    if e.errno != errno.ENOTSUP or self.delete_many_supported:
                        raise
                    log.info("server refuses DeleteObjects; deleting one by one")
                    self.delete_many_supported = False
            async with open_nursery() as nursery:
                limiter = trio.CapacityLimiter(16)
                for key in batch:
                    if not key.endswith("/"):
                        nursery.start_soon(self._delete_limited, limiter, key)
            for key in batch:  # the markers, in the order above
                if key.endswith("/"):
                    await self.delete(key)

    async def _delete_limited(self, limiter: trio.CapacityLimiter, key: str) -> None:
        async with limiter:
            await self.delete(key)

    async def _delete_batch(self, keys: list[str]) -> None:
        async def go() -> None:
            r = await self._client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True},
            )
            errors = [e for e in r.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if errors:
                first = errors[0]
                raise FsError(
                    S3_CODE_ERRNO.get(first.get("Code", ""), errno.EIO),
                    f"DeleteObjects: {len(errors)} failed, first {first.get('Key')}: "
                    f"{first.get('Code')}",
                )

        await self._call("DeleteObjects", f"DeleteObjects ({len(keys)} keys)", go)

    async def copy(
        self,
        src: str,
        dst: str,
        metadata: dict[str, str] | None = None,
        content_type: str | None = None,
        size: int | None = None,
    ) -> str:
        """Server-side copy; metadata given → REPLACE. Raises CopyNotSupported when refused.

        An object over 5 GiB (by `size`, or by the server's refusal when the size was not
        known) is copied in parts with UploadPartCopy, which has no such limit."""
        if self.copy_supported is False:
            raise CopyNotSupported()
        if size is not None and size > MAX_COPY_BYTES:
            return await self.copy_in_parts(src, dst, size, metadata, content_type)
        try:
            return await self._copy_object(src, dst, metadata, content_type)
        except CopyTooLarge:
            if size is None:
                info = await self.head(src)
                if info is None:
                    raise FsError(errno.ENOENT, f"{src} vanished during a copy") from None
                size = info.size
            return await self.copy_in_parts(src, dst, size, metadata, content_type)

    async def copy_in_parts(
        self,
        src: str,
        dst: str,
        size: int,
        metadata: dict[str, str] | None,
        content_type: str | None,
    ) -> str:
        """Multipart copy (UploadPartCopy), parts in parallel, pinned to the source's ETag.
        Without new metadata the source's is carried over (a multipart copy starts bare)."""
        info = await self.head(src)
        if info is None:
            raise FsError(errno.ENOENT, f"{src} vanished during a copy")
        if metadata is None:
            metadata, content_type = info.metadata or {}, info.content_type
        part = max(COPY_PART_BYTES, -(-size // MAX_PARTS))
        count = max(1, -(-size // part))

        async def copy_part(upload_id: str, i: int) -> str:
            start, end = i * part, min(size, (i + 1) * part) - 1

            async def go() -> str:
                params: dict[str, Any] = {
                    "Bucket": self.bucket,
                    "Key": dst,
                    "UploadId": upload_id,
                    "PartNumber": i + 1,
                    "CopySource": {"Bucket": self.bucket, "Key": src},
                    "CopySourceIfMatch": f'"{info.etag}"',
                }
                if size:
                    params["CopySourceRange"] = f"bytes={start}-{end}"
                try:
                    r = await self._client.upload_part_copy(**params)
                except ClientError as e:
                    code = describe_client_error(e)[0]
                    if code in COPY_REFUSED_CODES and self.copy_supported is not True:
                        raise CopyNotSupported(f"server refuses UploadPartCopy ({code})") from None
                    raise
                return _etag(r.get("CopyPartResult", {}).get("ETag"))

            return await self._call("UploadPartCopy", f"copy part {i + 1} of {dst}", go)

        return await self.multipart(
            dst,
            metadata,
            content_type or "application/octet-stream",
            count,
            copy_part,
            trio.CapacityLimiter(COPY_PARALLEL),
            "multipart copy to",
        )

    async def multipart(
        self,
        key: str,
        metadata: dict[str, str],
        content_type: str,
        count: int,
        send_part: Callable[[str, int], Awaitable[str]],
        limiter: trio.CapacityLimiter,
        what: str = "multipart upload of",
        unchanged: Callable[[], bool] | None = None,
    ) -> str:
        """One multipart upload of `count` parts sent in parallel, each under `limiter`:
        `send_part(upload_id, index)` sends part index + 1 and returns its ETag.

        The one place that creates, completes and aborts: a failure (or cancellation)
        aborts the upload, so none is left open. `unchanged()` False once every part is
        sent (the source was rewritten meanwhile): aborted too, with EAGAIN, so S3 never
        holds parts of two versions."""
        upload_id = await self.create_multipart(key, metadata, content_type)
        etags = [""] * count

        async def send(i: int) -> None:
            async with limiter:
                etags[i] = await send_part(upload_id, i)

        try:
            async with open_nursery() as nursery:
                for i in range(count):
                    nursery.start_soon(send, i)
            if unchanged is not None and not unchanged():
                raise FsError(errno.EAGAIN, f"{key} changed during its upload")
            return await self.complete_multipart(key, upload_id, etags)
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(30):
                try:
                    await self.abort_multipart(key, upload_id)
                except FsError as e:
                    log.error("could not abort the %s %s: %s", what, key, e.message)
            raise

    async def _copy_object(
        self,
        src: str,
        dst: str,
        metadata: dict[str, str] | None,
        content_type: str | None,
    ) -> str:

        async def go() -> str:
            params: dict[str, Any] = {
                "Bucket": self.bucket,
                "Key": dst,
                "CopySource": {"Bucket": self.bucket, "Key": src},
            }
            if metadata is not None:
                params.update(
                    MetadataDirective="REPLACE",
                    Metadata=metadata,
                    ContentType=content_type or "application/octet-stream",
                )
            try:
                r = await self._client.copy_object(**params)
            except ClientError as e:
                code = describe_client_error(e)[0]
                # `is not True`: concurrent first copies all get the refusal, not only
                # the one whose answer came first.
                if code in COPY_REFUSED_CODES and self.copy_supported is not True:
                    raise CopyNotSupported(f"server refuses CopyObject ({code})") from None
                if copy_too_large(*describe_client_error(e)):
                    raise CopyTooLarge(f"COPY {src}: {describe_client_error(e)[1]}") from None
                raise
            return _etag(r.get("CopyObjectResult", {}).get("ETag"))

        try:
            etag = await self._call("CopyObject", f"COPY {src} → {dst}", go)
        except CopyNotSupported:
            log.info("server refuses CopyObject: renames and metadata updates will stream")
            self.copy_supported = False
            raise
        self.copy_supported = True
        return etag

    # ----- listing ----------------------------------------------------------------------
    async def list_page(
        self,
        prefix: str,
        delimiter: str | None = "/",
        token: str | None = None,
        max_keys: int = 1000,
        start_after: str | None = None,
    ) -> ListPage:
        """One ListObjectsV2 page.

        botocore's generic XML parser spends ~60 ms of CPU per 1,000 keys (dateutil per
        timestamp); a pre-signed URL fetched with aiohttp and read with ElementTree costs a
        tenth of that. Errors fall back to the botocore path, which explains them properly.
        """
        if self._http is not None:
            try:
                return await self._call(
                    "ListObjectsV2",
                    f"LIST {prefix or '/'}",
                    self._lean_list,
                    prefix,
                    delimiter,
                    token,
                    max_keys,
                    start_after,
                )
            except _LeanListFailed:
                pass
        return await self._botocore_list_page(prefix, delimiter, token, max_keys, start_after)

    async def _lean_list(
        self,
        prefix: str,
        delimiter: str | None,
        token: str | None,
        max_keys: int,
        start_after: str | None,
    ) -> ListPage:
        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Prefix": prefix,
            "MaxKeys": max_keys,
            "EncodingType": "url",
        }
        if delimiter:
            params["Delimiter"] = delimiter
        if token:
            params["ContinuationToken"] = token
        if start_after:
            params["StartAfter"] = start_after
        for attempt in range(4):
            url = await self._client.generate_presigned_url(
                "list_objects_v2", Params=params, ExpiresIn=900
            )
            try:
                async with self._http.get(url) as r:
                    body = await r.read()
                    status = r.status
            except (TimeoutError, aiohttp.ClientError):
                status, body = 599, b""
            if status == 200:
                return parse_list_xml(body)
            if status < 500 or attempt == 3:
                raise _LeanListFailed()
            await asyncio.sleep(0.2 * 2**attempt * (0.5 + random.random()))
        raise _LeanListFailed()

    async def _botocore_list_page(
        self,
        prefix: str,
        delimiter: str | None,
        token: str | None,
        max_keys: int,
        start_after: str | None,
    ) -> ListPage:
        async def go() -> ListPage:
            params: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": max_keys}
            if delimiter:
                params["Delimiter"] = delimiter
            if token:
                params["ContinuationToken"] = token
            if start_after:
                params["StartAfter"] = start_after
            r = await self._client.list_objects_v2(**params)
            page = ListPage(
                [
                    ObjectInfo(
                        o["Key"],
                        o.get("Size", 0),
                        _etag(o.get("ETag")),
                        _ns(o.get("LastModified")),
                        storage_class=_shared(o.get("StorageClass")),
                    )
                    for o in r.get("Contents", [])
                ],
                [p["Prefix"] for p in r.get("CommonPrefixes", [])],
                r.get("NextContinuationToken") if r.get("IsTruncated") else None,
            )
            return page

        return await self._call("ListObjectsV2", f"LIST {prefix or '/'}", go)

    async def list_all(self, prefix: str, delimiter: str | None = "/") -> ListPage:
        """Every page of a listing, following continuation tokens."""
        total = ListPage()
        token = None
        while True:
            page = await self.list_page(prefix, delimiter, token)
            total.objects += page.objects
            total.prefixes += page.prefixes
            token = page.next_token
            if not token:
                return total

    # ----- buckets ----------------------------------------------------------------------
    async def check_bucket(self, prefix: str = "") -> None:
        """One request that proves endpoint, credentials and bucket (fail fast at start).
        A BUCKET:PREFIX mount asks below its prefix only: a key allowed to list just that
        prefix must be able to mount it."""

        async def go() -> None:
            await self._client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1)

        await self._call("ListObjectsV2", f"bucket {self.bucket}", go)

    async def list_buckets(self) -> list[tuple[str, int]]:
        async def go() -> list[tuple[str, int]]:
            r = await self._client.list_buckets()
            return [(b["Name"], _ns(b.get("CreationDate"))) for b in r.get("Buckets", [])]

        return await self._call("ListBuckets", "ListBuckets", go)

    async def bucket_acl(self, bucket: str | None = None) -> str | None:
        """'public-read' or 'private'; None when the server will not say."""
        bucket = bucket or self.bucket
        try:
            r = await self.bucket_call("get_bucket_acl", f"GetBucketAcl {bucket}", Bucket=bucket)
        except FsError:
            return None
        public = any(
            g.get("Grantee", {}).get("URI", "").endswith("/global/AllUsers")
            and g.get("Permission") in ("READ", "FULL_CONTROL")
            for g in r.get("Grants", [])
        )
        return "public-read" if public else "private"

    async def bucket_call(self, method: str, what: str, **params: Any) -> dict:
        """Bucket-level calls (create/delete/ACL/CORS/versioning) for account mounts."""

        async def go() -> dict:
            return await getattr(self._client, method)(**params)

        op = "".join(word.title() for word in method.split("_"))  # get_bucket_acl: GetBucketAcl
        return await self._call(op, what, go)


class _LeanListFailed(Exception):
    """The lean LIST got an answer it does not handle: retry through botocore."""


_S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


def _iso_ns(text: str | None) -> int:
    if not text:
        return time.time_ns()
    try:
        return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1e9)
    except ValueError:
        return time.time_ns()


def parse_list_xml(body: bytes) -> ListPage:
    """ListObjectsV2 XML (EncodingType=url) → ListPage, without botocore's parser."""
    root = ET.fromstring(body)
    ns = _S3_NS if root.tag.startswith(_S3_NS) else ""
    encoded = (root.findtext(f"{ns}EncodingType") or "").lower() == "url"

    def key_of(text: str | None) -> str:
        return unquote_plus(text or "") if encoded else (text or "")

    page = ListPage()
    for c in root.iterfind(f"{ns}Contents"):
        page.objects.append(
            ObjectInfo(
                key_of(c.findtext(f"{ns}Key")),
                int(c.findtext(f"{ns}Size") or 0),
                _etag(c.findtext(f"{ns}ETag")),
                _iso_ns(c.findtext(f"{ns}LastModified")),
                storage_class=_shared(c.findtext(f"{ns}StorageClass")),
            )
        )
    for p in root.iterfind(f"{ns}CommonPrefixes"):
        page.prefixes.append(key_of(p.findtext(f"{ns}Prefix")))
    if (root.findtext(f"{ns}IsTruncated") or "").lower() == "true":
        page.next_token = root.findtext(f"{ns}NextContinuationToken")
    return page


class RateLimiter:
    """Token bucket: at most `rate` requests a second on average, bursts of up to one second."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.stamp = 0.0

    async def acquire(self) -> None:
        if self.rate <= 0:
            return
        now = trio.current_time()
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= 1
        if self.tokens < 0:
            await trio.sleep(-self.tokens / self.rate)


def _children_first(key: str) -> tuple[bool, int, str]:
    """Files before directory markers, deeper markers before shallower ones."""
    return key.endswith("/"), -key.count("/"), key


def _range_total(r: dict) -> int | None:
    value = r.get("ContentRange", "")
    try:
        return int(value.rsplit("/", 1)[1])
    except (IndexError, ValueError):
        return None


def _plain_headers(metadata: dict[str, str], content_type: str) -> bool:
    """Headers http.client sends as botocore would (ASCII, no line breaks); anything else
    takes botocore's path."""
    for value in (content_type, *metadata, *metadata.values()):
        if not value.isascii() or "\r" in value or "\n" in value:
            return False
    return True


def _md5_b64(body: bytes) -> str:
    import base64
    import hashlib

    return base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()


def _multipart_etag(part_etags: list[str]) -> str:
    import hashlib

    digest = hashlib.md5(b"".join(bytes.fromhex(t) for t in part_etags), usedforsecurity=False)
    return f"{digest.hexdigest()}-{len(part_etags)}"
