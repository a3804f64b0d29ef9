"""The data plane: ranged GETs and part PUTs on blocking sockets in worker threads.

Moving 8 MiB through aiohttp + botocore costs ~7.5 ms of CPU under the GIL (protocol
callbacks, buffer joins, payload hashing) and several copies of the body, which capped
throughput at what one core can do and made a 1 GiB write peak at ~580 MiB RSS. Here each
body moves in a worker thread on a plain http.client connection: GETs `readinto` a
preallocated buffer, PUTs send the one buffer they were given, MD5 is computed off the
GIL; the FUSE loop keeps serving meanwhile. Requests are pre-signed URLs made by botocore
(store.py); this module only moves bytes, checks lengths and maps errors.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import http.client
import os
import random
import re
import socket
import ssl
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from fbmount.errors import S3_CODE_ERRNO, FsError, PreconditionFailed

RETRIES = 4
FILE_CHUNK = 1 << 20  # what a part read from a file holds in memory at a time
_CODE = re.compile(rb"<Code>([^<]+)</Code>")


def _backoff(attempt: int) -> None:
    """Jittered exponential backoff before retry `attempt` (none before the first try)."""
    if attempt:
        time.sleep(min(8.0, 0.2 * 2**attempt) * (0.5 + random.random()))


def _s3_error(status: int, body: bytes, what: str, key: str) -> tuple[bool, FsError]:
    """(retryable, error) for a non-success answer; 412 pins the version (If-Match)."""
    match = _CODE.search(body)
    code = match.group(1).decode() if match else str(status)
    if status == 412 or code == "PreconditionFailed":
        return False, PreconditionFailed(key)
    if status >= 500 or code in ("SlowDown", "RequestTimeout"):
        return True, FsError(errno.EIO, f"{what}: {status} {code}")
    return False, FsError(S3_CODE_ERRNO.get(code, errno.EIO), f"{what}: {code}")


def _target(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}" if parts.query else parts.path


class _FileSlice:
    """A file-like view of bytes [offset, offset + length) of `fd`, for http.client to
    send chunk by chunk (it calls read(blocksize) until b"")."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd, self.offset, self.length = fd, offset, length
        self.pos = 0

    def rewind(self) -> None:
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        left = self.length - self.pos
        if n < 0 or n > left:
            n = left
        data = os.pread(self.fd, n, self.offset + self.pos) if n else b""
        if len(data) < n:  # truncated meanwhile: fail the request, never stall the server
            raise OSError(errno.EIO, "the staged file shrank while being sent")
        self.pos += len(data)
        return data


class DataPlane:
    """A small pool of keep-alive connections to one endpoint, used from worker threads."""

    def __init__(self, endpoint: str, ca_bundle: str | None, timeout: float = 60.0) -> None:
        url = urlsplit(endpoint)
        self.https = url.scheme == "https"
        self.host = url.hostname or ""
        self.port = url.port or (443 if self.https else 80)
        self.timeout = timeout
        self.ssl_context = ssl.create_default_context(cafile=ca_bundle) if self.https else None
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self.closed = False

    def _take(self) -> http.client.HTTPConnection:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        if self.https:
            return http.client.HTTPSConnection(
                self.host, self.port, timeout=self.timeout, context=self.ssl_context
            )
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def _give_back(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self.closed and len(self._idle) < 64:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self.closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def put(self, url: str, body: bytes, what: str, headers: dict[str, str] | None = None) -> str:
        """PUT `body` to pre-signed `url` (an UploadPart, or a PutObject with the `headers`
        its URL signed); returns the ETag. Blocking, retried."""
        md5 = hashlib.md5(body, usedforsecurity=False)
        return self._put(url, body, len(body), md5, what, headers)

    def put_file(self, url: str, fd: int, offset: int, length: int, what: str) -> str:
        """PUT bytes [offset, offset + length) of the file `fd`, read as they are sent: a
        part of any size (a 5 TB file's parts are 525 MiB) costs one chunk of memory."""
        md5 = hashlib.md5(usedforsecurity=False)
        for start in range(offset, offset + length, FILE_CHUNK):
            chunk = os.pread(fd, min(FILE_CHUNK, offset + length - start), start)
            if not chunk:
                raise FsError(errno.EIO, f"{what}: the staged file shrank while being sent")
            md5.update(chunk)
        return self._put(url, _FileSlice(fd, offset, length), length, md5, what)

    def _put(
        self,
        url: str,
        body: bytes | _FileSlice,
        length: int,
        md5: Any,
        what: str,
        extra: dict[str, str] | None = None,
    ) -> str:
        headers = {
            **(extra or {}),
            "Content-Length": str(length),
            "Content-MD5": base64.b64encode(md5.digest()).decode(),
        }
        last_error = ""
        for attempt in range(RETRIES):
            _backoff(attempt)
            conn = self._take()
            if isinstance(body, _FileSlice):
                body.rewind()
                conn.blocksize = FILE_CHUNK
            try:
                conn.request("PUT", _target(url), body=body, headers=headers)
                resp = conn.getresponse()
                answer = resp.read()
                self._give_back(conn)
                if resp.status == 200:
                    etag = (resp.getheader("ETag") or "").strip('"')
                    # A whole object's ETag is not its MD5 under SSE-KMS (botocore never
                    # compared it); the server checked Content-MD5 already.
                    whole_object = extra is not None
                    if etag and "-" not in etag and etag != md5.hexdigest() and not whole_object:
                        last_error = "ETag does not match the MD5 of what was sent"
                        continue
                    return etag
                retryable, error = _s3_error(resp.status, answer, what, what)
                if not retryable:
                    raise error
                last_error = error.message
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                last_error = f"{type(e).__name__}: {e}"
        raise FsError(errno.EIO, f"{what}: {last_error} (after {RETRIES} attempts)")

    def get(self, url: str, start: int, end: int, etag: str | None, key: str) -> bytearray:
        """Bytes [start, end) of the object behind pre-signed `url`; blocking, retried."""
        headers = {"Range": f"bytes={start}-{end - 1}"}
        if etag:
            headers["If-Match"] = f'"{etag}"'
        want = end - start
        last_error = ""
        for attempt in range(RETRIES):
            _backoff(attempt)
            conn = self._take()
            try:
                conn.request("GET", _target(url), headers=headers)
                resp = conn.getresponse()
                if resp.status in (200, 206):
                    buf = bytearray(want)
                    view = memoryview(buf)
                    got = 0
                    while got < want:
                        n = resp.readinto(view[got:])
                        if not n:
                            break
                        got += n
                    if got == want and (resp.length in (0, None)):
                        self._give_back(conn)
                        return buf
                    conn.close()
                    last_error = f"body cut short ({got} of {want} bytes)"
                    continue
                answer = resp.read()
                self._give_back(conn)
                retryable, error = _s3_error(resp.status, answer, f"GET {key}", key)
                if not retryable:
                    raise error
                last_error = error.message
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                if isinstance(e, ssl.SSLCertVerificationError):
                    raise FsError(
                        errno.EIO, f"GET {key}: TLS certificate does not verify"
                    ) from None
                last_error = (
                    f"{type(e).__name__}: {e}" if not isinstance(e, socket.timeout) else "timed out"
                )
        raise FsError(errno.EIO, f"GET {key}: {last_error} (after {RETRIES} attempts)")
