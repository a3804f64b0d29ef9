"""Streaming uploads: a large file written sequentially goes up while it is being written.

Without this, `dd` or `cp` of a big file writes everything to the staging disk and only
then uploads it, so the two phases add up. Here, once a new file has two full parts
written front to back, a multipart upload starts and each further full part is sent in
the background; close/fsync then only sends the tail and completes it.

It is an optimisation that must never cost correctness:
- a write below what was already sent, a truncate, an unlink or a rename abandons the
  stream (the multipart upload is aborted) and the normal whole-file upload takes over.
  A multipart upload is bound to the key it began under, and after a rename that key
  may belong to another file at any moment (`mv a b; echo hi > a`): a stream therefore
  never completes, copies or deletes anything under a name its file no longer has;
- if the file's metadata changed before the upload (chmod, utime after close), the
  finished object is copied onto itself with the final metadata; so streaming is used
  only while the server accepts CopyObject, and never for dot-files (rsync's
  `.name.XXXXXX` temp files, always renamed at the end);
- like every multipart upload, a stream is noted by the store (uploadnotes.py), so a
  crash leaves no multipart upload behind: the next mount aborts what the notes name.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Protocol

import trio

from fbmount.errors import CopyNotSupported, FsError
from fbmount.namespace import headers_for
from fbmount.staging import Staged
from fbmount.store import MAX_PARTS, S3Store
from fbmount.tasks import describe, guarded

log = logging.getLogger("fbmount.eager")


@dataclass(eq=False)
class Stream:
    key: str
    headers: dict[str, str]
    content_type: str
    part_size: int
    upload_id: str | None = None
    created: trio.Event = field(default_factory=trio.Event)
    etags: dict[int, str] = field(default_factory=dict)
    sent_end: int = 0  # bytes [0, sent_end) are handed to part uploads
    running: int = 0
    idle: trio.Event = field(default_factory=trio.Event)
    failed: str | None = None


TIME_KEYS = ("mtime", "ctime", "atime")


def without_times(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k not in TIME_KEYS}


class StreamHost(Protocol):
    """What streaming asks of the filesystem above it (it never sees the whole of it)."""

    @property
    def nursery(self) -> trio.Nursery | None:
        """Where parts are sent in the background; None until the mount serves."""


class EagerUploads:
    """The streams of the files being written; the write-back completes them (finish)."""

    def __init__(
        self,
        store: S3Store,
        part_size: int,
        bodies: trio.CapacityLimiter,
        host: StreamHost,
    ) -> None:
        """`bodies` is the write-back's limiter of part bodies in memory, shared with it."""
        self.store = store
        self.part_size = part_size
        self.bodies = bodies
        self.host = host
        self.aborting = 0  # abandoned streams whose multipart upload is not aborted yet

    # ----- called synchronously from fs.write / setattr / discard ---------------------
    def wrote(self, staged: Staged, name: str, off: int, end: int) -> None:
        stream: Stream | None = staged.eager
        if stream is not None and off < stream.sent_end:
            self.abandon(staged, "rewritten below what was already sent")
            return
        if staged.seq_end < 0:
            return
        if off != staged.seq_end:
            staged.seq_end = -1  # not front to back: send no more parts, finish normally
            return
        staged.seq_end = end
        part = self.part_size
        nursery = self.host.nursery
        if stream is None:
            if (
                end < 2 * part
                or name.startswith(".")
                or self.store.copy_supported is False
                or nursery is None
            ):
                return
            headers, ctype = headers_for(staged.node)
            stream = staged.eager = Stream(staged.key, without_times(headers), ctype, part)
            nursery.start_soon(self._create, staged, stream)
        assert nursery is not None  # a stream is only ever begun once the mount serves
        while staged.seq_end - stream.sent_end >= part:
            number = stream.sent_end // part + 1
            if number >= MAX_PARTS:
                self.abandon(staged, "too many parts for a stream")
                return
            stream.running += 1
            nursery.start_soon(self._send, staged, stream, number, stream.sent_end)
            stream.sent_end += part

    def abandon(self, staged: Staged, why: str) -> None:
        stream = staged.eager
        staged.eager = None
        staged.seq_end = -1
        nursery = self.host.nursery
        if stream is not None and nursery is not None:
            stream.failed = why
            log.debug("stream of %s abandoned: %s", staged.key, why)
            self.aborting += 1
            nursery.start_soon(self._abort_abandoned, staged, stream)

    async def _abort_abandoned(self, staged: Staged, stream: Stream) -> None:
        try:
            await guarded(f"aborting the stream of {staged.key}", self._abort, staged, stream)
        finally:
            self.aborting -= 1

    async def settle(self) -> None:
        """Return once every abandoned stream is aborted: an unmount that cancelled one
        midway (a part still in flight) left its multipart upload open until the next
        mount (`mv` of a file being streamed, then `umount`)."""
        while self.aborting:
            await trio.sleep(0.05)

    # ----- background work ------------------------------------------------------------
    async def _create(self, staged: Staged, stream: Stream) -> None:
        try:
            stream.upload_id = await self.store.create_multipart(
                stream.key, stream.headers, stream.content_type
            )
        except Exception as e:  # noqa: BLE001 - a stream is an optimisation: fall back
            self._failed(stream, "starting the stream", e)
        finally:
            stream.created.set()

    async def _send(self, staged: Staged, stream: Stream, number: int, offset: int) -> None:
        sent = False
        try:
            await stream.created.wait()
            if stream.failed or stream.upload_id is None:
                return
            async with self.bodies:
                fd = os.open(staged.data_path, os.O_RDONLY)
                try:
                    body = await trio.to_thread.run_sync(os.pread, fd, stream.part_size, offset)
                finally:
                    os.close(fd)
                stream.etags[number] = await self.store.upload_part(
                    stream.key, stream.upload_id, number, body
                )
                staged.in_flight_bytes += len(body)
                sent = True
        except Exception as e:  # noqa: BLE001 - the whole-file upload takes over
            self._failed(stream, f"part {number}", e)
        finally:
            if not sent and not stream.failed:
                stream.failed = f"part {number} not sent"  # cancelled (unmount) or skipped
            stream.running -= 1
            if stream.running == 0:
                stream.idle.set()
                stream.idle = trio.Event()

    @staticmethod
    def _failed(stream: Stream, what: str, e: Exception) -> None:
        """Abandon the stream's promise (the normal upload sends the file); a bug is logged."""
        stream.failed = describe(e)
        if isinstance(e, FsError | OSError):
            log.debug("stream of %s: %s failed: %s", stream.key, what, stream.failed)
        else:
            log.exception("stream of %s: %s failed unexpectedly", stream.key, what)

    async def _wait_idle(self, stream: Stream) -> None:
        while stream.running:
            await stream.idle.wait()

    async def _abort(self, staged: Staged, stream: Stream) -> None:
        await stream.created.wait()
        await self._wait_idle(stream)
        if stream.upload_id is not None:
            try:
                await self.store.abort_multipart(stream.key, stream.upload_id)
            except FsError as e:  # its crash note stays: the next mount aborts it
                log.error("could not abort the stream of %s: %s", stream.key, e.message)

    # ----- the upload ---------------------------------------------------------------------
    async def finish(
        self, staged: Staged, key: str, headers: dict[str, str], content_type: str
    ) -> tuple[str, int, dict[str, str]] | None:
        """Complete the stream as the object `key`: (etag, size, headers stored).

        `key` is the key the stream began under (a rename abandons the stream); should it
        differ, the stream is abandoned here. None: upload the file normally. The stream's
        object carries no times: its Last-Modified (the completion) stands for the mtime
        of a file written and closed, unless times were set explicitly (utime), which
        takes a server-side copy.
        """
        stream = staged.eager
        if stream is None:
            return None
        if stream.key != key:  # renames abandon streams; never complete under an old name
            self.abandon(staged, "the file's key changed")
            return None
        staged.eager = None
        await stream.created.wait()
        await self._wait_idle(stream)
        size = os.stat(staged.data_path).st_size
        complete = all(i in stream.etags for i in range(1, stream.sent_end // stream.part_size + 1))
        if stream.failed or stream.upload_id is None or size < stream.sent_end or not complete:
            await self._abort(staged, stream)
            return None
        store = self.store
        try:
            number = len(stream.etags) + 1
            offset = stream.sent_end
            while offset < size:  # the tail, in part-size pieces (the last may be short)
                fd = os.open(staged.data_path, os.O_RDONLY)
                try:
                    body = await trio.to_thread.run_sync(os.pread, fd, stream.part_size, offset)
                finally:
                    os.close(fd)
                stream.etags[number] = await store.upload_part(
                    stream.key, stream.upload_id, number, body
                )
                number += 1
                offset += len(body)
            etags = [stream.etags[i] for i in range(1, number)]
            etag = await store.complete_multipart(stream.key, stream.upload_id, etags)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._abort(staged, stream)
            raise
        if (stream.headers, stream.content_type) == (
            without_times(headers),
            content_type,
        ) and not staged.times_set:
            return etag, size, stream.headers
        # Re-described after the stream began (chmod, utime): one copy onto itself fixes it.
        try:
            etag = await store.copy(key, key, headers, content_type)
        except CopyNotSupported:
            return None  # the whole-file upload replaces it, with the right metadata
        return etag, size, headers
