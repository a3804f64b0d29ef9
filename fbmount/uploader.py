"""Write-back: staged files go up once left alone for `upload_delay` seconds.

One upload per file at a time (Staged.lock); a file changed during its upload stays dirty
and goes up again. Small files are one PutObject, larger ones a multipart upload whose
parts are read from the staged file; one limiter shared by all uploads bounds the bodies
in memory ((--parallel + 2) x part size). A failed multipart upload is aborted, never
left behind; the staged file stays on disk and is retried with backoff.

Below fs.py: WriteBack gets the store, staging area, namespace, index and the streams
(eager.py) passed in, and tells the filesystem only what UploadHost says (a node is
stored: its open handles follow). Deletes and copies live here too, so that one rule
holds for every write: a queued delete of its key never lands after it (delete_first).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import cachetools
import trio

from fbmount.config import MIB, Config
from fbmount.eager import EagerUploads
from fbmount.errors import CopyNotSupported, FsError
from fbmount.metaindex import MetaIndex
from fbmount.namespace import Kind, Namespace, Node, headers_for
from fbmount.staging import Staged, StagingArea, State
from fbmount.store import MAX_PARTS, S3Store
from fbmount.tasks import describe, guarded, open_nursery

log = logging.getLogger("fbmount.upload")
SNAPSHOT_TRIES = 5  # copies of a file that keeps changing, before its upload gives up


def part_size_for(size: int, configured: int) -> int:
    """The configured part size, grown (in whole MiB) so that `size` fits in 10,000 parts."""
    needed = math.ceil(size / MAX_PARTS / MIB) * MIB
    return max(configured, needed)


async def multipart_upload(
    store: S3Store,
    key: str,
    size: int,
    part_size: int,
    headers: dict[str, str],
    content_type: str,
    send_part: Callable[[str, int, int, int], Awaitable[str]],
    limiter: trio.CapacityLimiter,
    progress: Callable[[int], None] = lambda n: None,
    unchanged: Callable[[], bool] | None = None,
) -> str:
    """Upload `size` bytes as parallel parts; `send_part(upload_id, number, offset,
    length)` sends each and returns its ETag. `unchanged`: see S3Store.multipart.

    A failure (or cancellation) aborts the upload, so no multipart upload is left open.
    """
    part = part_size_for(size, part_size)

    async def send(upload_id: str, i: int) -> str:
        length = min(part, size - i * part)
        etag = await send_part(upload_id, i + 1, i * part, length)
        progress(length)
        return etag

    return await store.multipart(
        key,
        headers,
        content_type,
        math.ceil(size / part),
        send,
        limiter,
        "multipart upload of",
        unchanged,
    )


async def upload_file(
    store: S3Store,
    key: str,
    path: os.PathLike,
    headers: dict[str, str],
    content_type: str,
    part_size: int,
    limiter: trio.CapacityLimiter,
    progress: Callable[[int], None] = lambda n: None,
    unchanged: Callable[[], bool] | None = None,
) -> tuple[str, int]:
    """Upload a local file to `key`; returns (etag, size). `progress(n)` after each part;
    `unchanged()` False before completing a multipart upload (the file was rewritten
    while its parts were read): aborted with EAGAIN instead of storing a mix.

    `limiter` is shared by every upload of the mount: each token is one body in flight.
    A small file is one PUT of its bytes; a part is read from the file as it is sent, so
    even the 525 MiB parts of a 5 TB file hold one chunk each in memory.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size <= part_size:
            async with limiter:
                body = await trio.to_thread.run_sync(os.pread, fd, size, 0)
                return await store.put(key, body, headers, content_type), size

        async def send_part(upload_id: str, number: int, offset: int, length: int) -> str:
            return await store.upload_part_from_file(key, upload_id, number, fd, offset, length)

        etag = await multipart_upload(
            store,
            key,
            size,
            part_size,
            headers,
            content_type,
            send_part,
            limiter,
            progress,
            unchanged,
        )
        return etag, size
    finally:
        os.close(fd)


async def stream_copy(
    store: S3Store,
    src: str,
    dst: str,
    size: int,
    etag: str | None,
    headers: dict[str, str],
    content_type: str,
    part_size: int,
    parallel: int,
) -> str:
    """Copy an object without CopyObject: ranged GETs into PUT/UploadPart, bounded memory."""
    if size <= part_size:
        body = bytes(await store.get_range(src, 0, size, etag)) if size else b""
        return await store.put(dst, body, headers, content_type)

    async def send_part(upload_id: str, number: int, offset: int, length: int) -> str:
        body = bytes(await store.get_range(src, offset, offset + length, etag))
        return await store.upload_part(dst, upload_id, number, body)

    return await multipart_upload(
        store,
        dst,
        size,
        part_size,
        headers,
        content_type,
        send_part,
        trio.CapacityLimiter(parallel),
    )


class UploadHost(Protocol):
    """What write-back tells the filesystem above it (it never sees the whole of it)."""

    def stored(self, node: Node) -> None:
        """`node`'s object in S3 is now what this mount staged: open handles read it."""


class WriteBack:
    """The queue of staged files and the task that uploads them."""

    def __init__(
        self,
        cfg: Config,
        store: S3Store,
        staging: StagingArea,
        ns: Namespace,
        index: MetaIndex,
        eager: EagerUploads,
        host: UploadHost,
    ) -> None:
        """`eager` holds the streams this write-back completes, and the limiter of part
        bodies in memory that both share."""
        self.cfg, self.store, self.staging, self.ns, self.index = cfg, store, staging, ns, index
        self.eager, self.host = eager, host
        self._wake = trio.Event()
        self.limiter = trio.CapacityLimiter(max(4, cfg.parallel * 2))  # files at once
        self.bodies = eager.bodies  # part bodies in memory ((--parallel + 2) x part size)
        self.copy_probe = trio.Lock()  # --copy auto: one CopyObject probes, the rest wait
        self.uploads_done = 0
        self.in_flight: dict[str, Staged] = {}  # uploads running now (for status)
        self.queued: set[str] = set()  # ids handed to a background upload task
        self.dirty_markers: dict[int, float] = {}  # dir inode -> when its metadata changed
        # Unlinked keys, batched into DeleteObjects, and the keys of the batch in flight;
        # each with the number of its unlink, so that a sync can tell the delete it waits
        # for from a later unlink of the same name.
        self.pending_deletes: dict[str, int] = {}
        self.deleting: dict[str, int] = {}
        self._unlinks = 0
        # Keys whose DeleteObjects is done, with the number of that batch: a listing the
        # server answered before the batch may reach us after it (see deleted_since).
        self.delete_batches = 0
        self._deleted_in: cachetools.TTLCache[str, int] = cachetools.TTLCache(100_000, 120)
        self._delete_queued_at = 0.0
        self._delete_lock = trio.Lock()
        self.last_delete_error: str | None = None  # shown by `fbmount status`

    def kick(self) -> None:
        self._wake.set()

    # ----- deletes: rm -rf becomes DeleteObjects batches -------------------------------
    def queue_delete(self, key: str) -> None:
        """unlink returns at once; the key goes in the next batch, 0.3 s after the oldest
        key waiting (or at once in a sync). A later unlink never postpones an earlier one:
        a long `rm` loop would otherwise keep every delete back until it stops."""
        if not self.pending_deletes:
            self._delete_queued_at = time.monotonic()
        self._unlinks += 1
        self.pending_deletes.setdefault(key, self._unlinks)
        if len(self.pending_deletes) >= 1000:
            self.kick()

    async def delete(self, key: str) -> None:
        """Strict mode deletes before returning; write-back mode batches (rm -rf)."""
        if self.cfg.upload_delay <= 0:
            await self.store.delete(key)
        else:
            self.queue_delete(key)

    async def delete_dir(self, marker: str) -> None:
        """rmdir: the directory's marker and the deletes queued under it (rm -rf's files)
        in one DeleteObjects; on failure the directory stays and its files' deletes wait
        for the next batch."""
        self.queue_delete(marker)
        try:
            await self.flush_deletes(marker)
        except BaseException:
            self.pending_deletes.pop(marker, None)
            raise

    def queued_deletes(self) -> list[str]:
        """Keys unlinked whose DeleteObjects is not done yet."""
        return [*self.pending_deletes, *self.deleting]

    def is_deleted(self, key: str) -> bool:
        return key in self.pending_deletes or key in self.deleting

    def deleted_since(self, key: str, batches: int) -> bool:
        """Unlinked and not yet gone, or deleted by a batch done after `batches` (the
        `delete_batches` read when a LIST was sent): its answer may still show the key."""
        return self.is_deleted(key) or self._deleted_in.get(key, 0) > batches

    def _queued_deletes(self) -> set[tuple[str, int]]:
        """Every unlink whose delete is not done: (key, its number)."""
        return set(self.pending_deletes.items()) | set(self.deleting.items())

    async def delete_first(self, key: str) -> None:
        """`key` is about to be written (PUT, copy, multipart completion): send a delete
        still queued for it now, and wait for one in flight, so that no delete lands after
        the write. Never cancelled instead: that unlink may be acknowledged already (a
        `fbmount sync` counted it as done), and the new write may never come (its file
        renamed away or unlinked first), so the old object would stay. FsError if the
        delete fails (the write is then not sent either)."""
        if self.is_deleted(key):
            await self.flush_deletes(key=key)

    async def copy_object(
        self, src_key: str, dst_key: str, node: Node, headers: tuple[dict[str, str], str] | None
    ) -> str:
        """Server-side copy when allowed, else stream GET → PUT (bounded memory).

        A delete still queued for `dst_key` is sent first (delete_first), so that it
        cannot land after the copy."""
        await self.delete_first(dst_key)
        if self.store.copy_supported is not False:
            probing = self.store.copy_supported is None
            try:
                async with self.copy_probe if probing else contextlib.nullcontext():
                    if self.store.copy_supported is not False:  # re-check after the wait
                        # Over 5 GiB the store copies in parts; a directory's callers pass
                        # its node, whose size says nothing (the server's refusal tells).
                        size = node.size if node.kind is Kind.FILE else None
                        meta, ctype = headers if headers is not None else (None, None)
                        return await self.store.copy(src_key, dst_key, meta, ctype, size=size)
            except CopyNotSupported:
                pass
        if headers is None:
            info = await self.store.head(src_key)
            if info is None:
                raise FsError(errno.ENOENT, f"{src_key} vanished during rename")
            headers = (info.metadata or {}, info.content_type or "application/octet-stream")
            size, etag = info.size, info.etag
        else:
            size, etag = node.size, node.etag
        return await stream_copy(
            self.store,
            src_key,
            dst_key,
            size,
            etag,
            headers[0],
            headers[1],
            self.cfg.part_size,
            self.cfg.parallel,
        )

    async def flush_deletes(self, prefix: str | None = None, key: str | None = None) -> None:
        """Send queued deletes (those under `prefix`, or `key` alone, or all) now, after a
        batch in flight; FsError if refused."""
        async with self._delete_lock:
            keys = {
                k: n
                for k, n in self.pending_deletes.items()
                if (prefix is None or k.startswith(prefix)) and (key is None or k == key)
            }
            if not keys:
                return
            for k in keys:
                del self.pending_deletes[k]
            self.deleting.update(keys)
            try:
                await self.store.delete_many(list(keys))
                self.last_delete_error = None
                self.delete_batches += 1
                for k in keys:
                    self._deleted_in[k] = self.delete_batches
            except BaseException:
                # A failure, a bug or unmount: the next flush, as the older unlink.
                for k, n in keys.items():
                    self.pending_deletes[k] = min(n, self.pending_deletes.get(k, n))
                raise
            finally:
                for k in keys:
                    del self.deleting[k]

    async def _background_deletes(self) -> None:
        def retry_later(e: BaseException) -> None:
            self.last_delete_error = describe(e)
            self._delete_queued_at = time.monotonic() + 5

        await guarded(
            f"deleting {len(self.pending_deletes)} key(s)",
            self.flush_deletes,
            on_error=retry_later,
        )

    def marker_changed(self, node: Node) -> None:
        """A directory's metadata changed: PUT its marker once it has settled."""
        self.dirty_markers[node.ino] = time.monotonic()
        self.kick()

    async def flush_markers(self) -> None:
        markers, self.dirty_markers = list(self.dirty_markers), {}
        for ino in markers:
            await self._put_marker(ino)

    async def _put_marker(self, ino: int) -> None:
        node = self.ns.get(ino)
        if node is None or not node.linked:
            return
        headers, ctype = headers_for(node)
        await guarded(
            f"storing the directory metadata of {node.name}",
            self.store.put,
            self.ns.key(node),
            b"",
            headers,
            ctype,
            on_error=lambda e: self.dirty_markers.setdefault(ino, time.monotonic() + 5),
        )

    def due(self, staged: Staged, now: float, force: bool) -> bool:
        """Only a DIRTY file nobody has open for writing: never one LOADING (a partial copy)
        or UPLOADING, nor one a writer is still changing."""
        if staged.state is not State.DIRTY or staged.writers or staged.lock.locked():
            return False
        if force:
            return True
        return now - staged.last_change >= self.cfg.upload_delay and now >= staged.retry_at

    async def run(self) -> None:
        """Forever: start uploads that are due (bounded by the limiter).

        Nothing escapes: each upload, delete batch and marker runs guarded, and a bug in
        the scan itself is logged and the scan tried again a second later."""
        async with open_nursery() as nursery:
            # Not write-back, but the same per-bucket life: data files made ahead for create.
            nursery.start_soon(guarded, "spare staging files", self.staging.keep_spares)
            while True:
                with trio.move_on_after(0.25):
                    await self._wake.wait()
                # Every release kicks; scanning thousands of staged files per kick would make
                # rsync quadratic, so scan at most ten times a second.
                await trio.sleep(0.1)
                self._wake = trio.Event()
                try:
                    self._start_due(nursery)
                except Exception:  # noqa: BLE001 - a bug must not end write-back
                    log.exception("the upload scan failed unexpectedly; trying again")
                    await trio.sleep(1)

    def _start_due(self, nursery: trio.Nursery) -> None:
        """Start what is due now: a delete batch, settled markers, settled staged files."""
        now = time.monotonic()
        if (
            self.pending_deletes
            and not self._delete_lock.locked()
            and (len(self.pending_deletes) >= 1000 or now - self._delete_queued_at >= 0.3)
        ):
            nursery.start_soon(self._background_deletes)
        for ino, changed in list(self.dirty_markers.items()):
            if now - changed >= self.cfg.upload_delay:
                del self.dirty_markers[ino]
                nursery.start_soon(self._put_marker, ino)
        for staged in list(self.staging.entries.values()):
            if self.due(staged, now, force=False) and staged.id not in self.queued:
                self.queued.add(staged.id)
                nursery.start_soon(self._background, staged)

    async def _background(self, staged: Staged) -> None:
        try:
            async with self.limiter:
                await guarded(
                    f"upload of {staged.key}",
                    self.upload,
                    staged,
                    on_error=lambda e: self.failed(staged, e),
                )
        finally:
            self.queued.discard(staged.id)

    def failed(self, staged: Staged, e: BaseException) -> None:
        """An upload failed (an S3 error or a bug): keep the data, show why, retry later."""
        staged.failures += 1
        staged.last_error = describe(e)
        delay = min(60.0, 2.0**staged.failures)
        staged.retry_at = time.monotonic() + delay
        log.error(
            "upload of %s failed (%s); retrying in %.0fs, data kept in %s",
            staged.key,
            staged.last_error,
            delay,
            self.staging.root,
        )

    async def upload(self, staged: Staged) -> None:
        """Upload `staged` now (waiting for an upload in flight); FsError on failure.

        A failure that a change made during the upload may have caused (a truncate under a
        part being sent) is no failure of the newer content, which goes up at once, from a
        copy taken between two changes: a file that a writer keeps changing (the crash soak
        saw `fbmount sync` give up on one) still gets a whole version of it stored."""
        generation = staged.generation
        try:
            return await self._upload_once(staged)
        except FsError:
            if staged.generation == generation or staged.state is not State.DIRTY:
                raise
        log.debug("upload of %s raced a change; sending a copy of the new content", staged.key)
        await self._upload_once(staged, snapshot=True)

    async def _snapshot(self, staged: Staged) -> Path:
        """A copy of the staged file that no change overlapped. Writes and truncates run
        on the trio thread and bump the generation in the same step, so an unchanged
        generation after the copy (made in a worker thread) proves it whole."""
        assert staged.data_path is not None
        copy = staged.data_path.with_name(f"{staged.id}.snapshot.tmp")  # recovery removes
        try:
            for _ in range(SNAPSHOT_TRIES):
                generation = staged.generation
                await trio.to_thread.run_sync(shutil.copyfile, staged.data_path, copy)
                if staged.generation == generation:
                    staged.sending(generation)
                    return copy
        except OSError as e:
            copy.unlink(missing_ok=True)
            raise FsError(e.errno or errno.EIO, f"copying {staged.key} for its upload: {e}") from e
        copy.unlink(missing_ok=True)
        raise FsError(errno.EAGAIN, f"{staged.key} changed during each of its copies")

    async def _upload_once(self, staged: Staged, snapshot: bool = False) -> None:
        async with staged.lock:
            if staged.state is not State.DIRTY:
                return  # CLEAN (a concurrent upload did it) or DISCARDED
            staged.begin_upload()
            key = staged.key
            node = staged.node
            if node is not None:
                headers, ctype = headers_for(node)
            else:
                headers, ctype = staged.record["headers"], staged.record["content_type"]
            cfg = self.cfg
            staged.in_flight_bytes = 0
            self.in_flight[staged.id] = staged

            def progress(n: int) -> None:
                staged.in_flight_bytes += n

            try:
                await self.delete_first(key)  # an unlink of this name before it goes first
                streamed = None
                if staged.has_data and staged.eager is not None:
                    if snapshot:
                        self.eager.abandon(staged, "the file changed during its upload")
                    else:
                        streamed = await self.eager.finish(staged, key, headers, ctype)
                if streamed is not None:
                    etag, size, headers = streamed
                elif staged.has_data:
                    path = await self._snapshot(staged) if snapshot else staged.data_path
                    try:
                        etag, size = await upload_file(
                            self.store,
                            key,
                            path,
                            headers,
                            ctype,
                            cfg.part_size,
                            self.bodies,
                            progress,
                            None
                            if snapshot
                            else lambda: staged.generation == staged.upload_generation,
                        )
                    finally:
                        if snapshot:
                            path.unlink(missing_ok=True)
                else:
                    source = staged.source_key or key
                    info_size = node.size if node is not None else None
                    if info_size is None:
                        info = await self.store.head(source)
                        if info is None:
                            raise FsError(2, f"{source} vanished before its metadata update")
                        info_size = info.size
                    etag = (
                        await self.copy_object(source, key, node, (headers, ctype))
                        if node is not None
                        else await stream_copy(
                            self.store,
                            source,
                            key,
                            info_size,
                            staged.source_etag,
                            headers,
                            ctype,
                            cfg.part_size,
                            cfg.parallel,
                        )
                    )
                    size = info_size
            except BaseException as e:
                staged.upload_failed()
                if isinstance(e, Exception):
                    staged.last_error = describe(e)
                raise
            finally:
                self.in_flight.pop(staged.id, None)
            staged.upload_done()
            staged.failures, staged.last_error = 0, None
            self.uploads_done += 1
            self.index.put(key, etag, headers)
            if node is not None and node.staged is staged:
                node.etag = etag
                node.mark_stored()
                if not staged.has_data:
                    node.size = size
                node.cached_etag = None
                node.index_etag = etag
                listing = self.ns.listings.get(node.parent)
                if listing is not None and node.linked and node.name in listing:
                    # The entry was made at create time (size 0, no ETag): a later re-list
                    # must not take it for the truth about the uploaded object.
                    listing[node.name] = self.ns.entry_of(node)
            log.debug("uploaded %s (%d bytes)", key, size)
        if staged.state is State.CLEAN:
            if node is None:
                self.staging.remove(staged)
            else:
                self.retire(staged)

    def retire(self, staged: Staged) -> None:
        """Called when `staged` may be CLEAN (in S3): forget it unless still open."""
        if staged.state is not State.CLEAN:
            return  # LOADING, DIRTY, UPLOADING: still needed; DISCARDED: its owner removes it
        node = staged.node
        if node is not None:
            self.host.stored(node)
        if node is not None and staged.handles == 0:
            if node.staged is staged:
                node.staged = None
            self.staging.remove(staged)
            self.ns._maybe_drop(node)
        else:
            self.staging.drop_record(staged)  # clean but open: nothing left to recover

    async def flush(self, targets: list[Staged]) -> list[Staged]:
        """Upload `targets` now, whatever their settle window; returns those that failed."""
        failed: list[Staged] = []

        async def one(staged: Staged) -> None:
            def keep(e: BaseException) -> None:
                self.failed(staged, e)
                failed.append(staged)

            async with self.limiter:
                await guarded(f"upload of {staged.key}", self.upload, staged, on_error=keep)

        async with open_nursery() as nursery:
            for staged in targets:
                nursery.start_soon(one, staged)
        return failed

    async def flush_all(
        self, targets: list[Staged] | None = None, deadline: float = math.inf
    ) -> list[tuple[str, str]]:
        """The one flush behind `fbmount sync`, unmount/SIGTERM and crash recovery:
        directory markers, queued deletes, then staged files (`targets`, or all dirty).

        Returns (what, why) for what was written or deleted *before* the call and is
        still not in S3, deletes included, so that no caller reports success over a
        refused delete, and a change made meanwhile by another writer is no failure."""
        if targets is None:
            targets = [s for s in self.staging.entries.values() if s.dirty]
        wanted = [(s, s.generation) for s in targets]
        deletes = self._queued_deletes()
        with trio.move_on_after(deadline):
            await self.flush_markers()
            try:
                await self.flush_deletes()
            except Exception as e:  # noqa: BLE001 - reported below, keys stay queued
                self.last_delete_error = describe(e)
                n = len(self.pending_deletes)
                log.error("sending %d deletion(s) failed: %s", n, describe(e))
            await self.flush(targets)
        left = [
            (s.key, s.last_error or "not uploaded in time")
            for s, generation in wanted
            if not s.discarded and s.stored_generation < generation and s.dirty
        ]
        unsent = deletes & self._queued_deletes()  # an unlink made meanwhile is not counted
        if unsent:
            why = self.last_delete_error or "not sent in time"
            left.append((f"{len(unsent)} deletion(s)", why))
        if self.dirty_markers:
            left.append((f"{len(self.dirty_markers)} directory marker(s)", "not stored"))
        return left
