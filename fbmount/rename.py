"""Renames. S3 has none: a file's object is copied and the old key deleted, a staged
file changes the key its upload goes to, a directory is every key under its prefix.

What keeps each safe (each held by a test in tests/test_races_rename.py, test_races_delete.py
or test_durability.py):
- a staged file's journal names the new key durably before the old key's delete can go,
  and the name moves and that delete is queued in one synchronous step, so a kill -9 leaves
  two copies at worst, never none, and a new file taking the old name never loses its
  object to the old key's delete;
- a file only in S3 is copied (with the metadata a pending chmod gave it) before the old
  key is deleted; a metadata-only change carried by the copy is discarded, so no upload
  waiting for it copies the deleted key later;
- a directory's staged files are journaled under their new keys before any old key of the
  tree is deleted.
The filesystem above is reached only through RenameHost.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import time
from typing import Any, Protocol

import trio

from fbmount import format as fmt
from fbmount.config import Config
from fbmount.eager import EagerUploads
from fbmount.errors import FsError
from fbmount.metaindex import MetaIndex
from fbmount.namespace import Kind, Namespace, Node, headers_for
from fbmount.staging import Staged, StagingArea
from fbmount.store import S3Store
from fbmount.tasks import open_nursery
from fbmount.uploader import WriteBack

log = logging.getLogger("fbmount")


class RenameHost(Protocol):
    """What a rename asks of the filesystem above it."""

    def discard(self, node: Node) -> None:
        """Drop `node`'s staged file: its name is gone (replaced by the rename)."""

    async def head_into(self, node: Node) -> bool:
        """Fill `node`'s metadata from a HEAD; False if the object is gone."""

    async def journal_durable(self, staged: Staged) -> None:
        """Write `staged`'s journal record and wait until it is on disk."""

    def readers_follow(self, node: Node | None, copied_etag: str | None = None) -> None:
        """Open handles of `node` follow its object to its new key (and ETag)."""


class Renamer:
    """Renames a file or a directory tree in S3 and in the namespace (see the module)."""

    def __init__(
        self,
        cfg: Config,
        ns: Namespace,
        staging: StagingArea,
        store: S3Store,
        index: MetaIndex,
        uploader: WriteBack,
        eager: EagerUploads,
        host: RenameHost,
    ) -> None:
        self.cfg, self.ns, self.staging, self.store = cfg, ns, staging, store
        self.index, self.uploader, self.eager, self.host = index, uploader, eager, host

    async def rename_file(
        self, src: Node, new_parent: Node, new_name: str, dst: Node | None
    ) -> None:
        old_key = self.ns.key(src)
        new_key = self.ns.child_key(new_parent, new_name, src.kind)
        old_etag = src.etag
        dst_remote = dst is not None and dst.remote
        if dst is not None and dst.staged is not None:
            async with dst.staged.lock:
                # Read it under the lock: an upload of dst in flight makes the key exist.
                dst_remote = dst.remote
                self.host.discard(dst)
        while True:
            staged = src.staged
            if staged is None:
                # The copy replaces the metadata so that it carries the new ctime; what it
                # keeps (mode, owner, times, xattrs) must be known first.
                if not src.meta_known:
                    await self.host.head_into(src)
                if src.staged is not None:
                    continue  # a change was staged while we asked: look again
                headers = headers_for(src, name=new_name)
                await self._rename_object(src, new_parent, new_name, old_key, new_key, headers)
                break
            async with staged.lock:  # waits for an upload in flight, which may retire it
                if src.staged is not staged:
                    continue  # retired or replaced while we waited: look again
                if staged.has_data:
                    await self._rename_staged(
                        src, new_parent, new_name, old_key, new_key, dst_remote
                    )
                else:  # metadata-only change pending: carry it along (the lock keeps its
                    # upload and a write turning it into a data copy out meanwhile)
                    headers = headers_for(src, name=new_name)
                    await self._rename_object(src, new_parent, new_name, old_key, new_key, headers)
                    # Done: the copy stored it. Discarded, not only removed: an upload that
                    # took it before (a sync's) waits for this lock, and must not then
                    # copy the old key, deleted now, onto itself.
                    self.staging.discard(staged)
                    self.staging.remove(staged)
                    src.staged = None
                break
        if dst is not None and dst.kind is Kind.DIR:
            await self.store.delete(self.ns.key(dst))
        self.host.readers_follow(src, old_etag)
        self.uploader.kick()

    async def _rename_staged(
        self,
        src: Node,
        new_parent: Node,
        new_name: str,
        old_key: str,
        new_key: str,
        dst_remote: bool,
    ) -> None:
        """Rename a file staged with local data (its lock held): no copy, the upload goes
        to the new key; an old object in S3 is deleted.

        The journal names the new key durably before the old key's delete can be sent: a
        kill -9 in between leaves two copies (recovery uploads the new name), never none.
        """
        staged = src.staged
        if staged.eager is not None:  # bound to the old key, which may be reused
            self.eager.abandon(staged, "renamed")
        headers, ctype = headers_for(src, name=new_name)
        previous, staged.key = staged.key, new_key
        staged.touch(data=False)
        record = self.staging.journal_record(staged, headers, ctype)
        try:
            await self.staging.commit(staged, record)
        except BaseException:
            staged.key = previous
            raise
        # No await from here on: the name moves and the old key's delete is queued in one
        # step, so a new file taking the old name finds it queued, and its own first write
        # sends it before (uploader.delete_first): it never deletes the new file's object.
        # A delete already queued for the new key (an unlink of that name) stays queued
        # likewise: a `fbmount sync` may have counted on it.
        was_remote = src.remote
        src.remote = dst_remote
        self.ns.move(src, new_parent, new_name)
        # Neither key's index entry describes what S3 will hold: the old object goes, and
        # the new key gets this file's upload (which records its own headers).
        self.index.delete(old_key)
        self.index.delete(new_key)
        if was_remote:
            self.uploader.queue_delete(old_key)
            if self.cfg.upload_delay <= 0:  # strict mode: gone before rename returns
                try:
                    await self.uploader.flush_deletes(old_key)
                except FsError as e:  # the rename stands; the delete stays queued
                    log.warning("%s renamed, old key not deleted yet: %s", old_key, e.message)

    async def _rename_object(
        self,
        src: Node,
        new_parent: Node,
        new_name: str,
        old_key: str,
        new_key: str,
        headers: tuple[dict[str, str], str] | None,
    ) -> None:
        """Rename a file whose bytes are only in S3: copy, then delete the old key (a crash
        in between leaves two copies), then move the name."""
        # A streamed copy has a new ETag (multipart); reads pin it with If-Match.
        new_etag = await self.uploader.copy_object(old_key, new_key, src, headers)
        # The index entry of new_key is what the copy stored, not the old key's: a chmod
        # still staged went up with the copy, and the copy has the same bytes, so most
        # servers give it the old key's ETag, which the old entry's headers would then
        # claim after a remount (crash soak: a chmod undone after rename over a file).
        self.index.delete(old_key)
        if headers is not None and new_etag:
            self.index.put(new_key, new_etag, headers[0])
        else:
            self.index.delete(new_key)
        await self.store.delete(old_key)
        self.ns.move(src, new_parent, new_name)
        src.mark_stored()
        src.etag = new_etag or src.etag
        if headers is not None:
            src.content_type = headers[1]

    async def rename_dir(
        self, src: Node, new_parent: Node, new_name: str, dst: Node | None
    ) -> None:
        old_prefix = self.ns.key(src)
        new_prefix = self.ns.child_key(new_parent, new_name, Kind.DIR)
        if new_prefix.startswith(old_prefix):
            raise FsError(errno.EINVAL, "cannot move a directory into itself")
        await self.uploader.flush_deletes(old_prefix)
        await self.uploader.delete_first(new_prefix.rstrip("/"))  # as in mkdir: `x/` beside `x`
        async with contextlib.AsyncExitStack() as stack:
            # Every staged file below holds its lock until the tree has moved. The files
            # staged may change while we wait for a lock: an upload that ends retires its
            # file (the soak saw `n.staged` gone by its turn: EIO), a write stages a new
            # one. So lock what is staged now, and look again until nothing is missing.
            held: dict[int, Staged] = {}
            while missing := [
                n.staged
                for n in self.ns.descendants(src)
                if n.staged is not None and id(n.staged) not in held
            ]:
                for staged in missing:
                    held[id(staged)] = staged
                    await stack.enter_async_context(staged.lock)
            staged_nodes = [n for n in self.ns.descendants(src) if n.staged is not None]
            local_only = {
                self.ns.key(n) for n in staged_nodes if n.staged.has_data and not n.staged.discarded
            }
            page = await self.store.list_all(old_prefix, delimiter=None)
            keys = [o.key for o in page.objects]
            # Directory keys go last, deepest first: servers with real folders (SeaweedFS)
            # otherwise keep the emptied old tree visible; on S3 these deletes are no-ops.
            dirs = {old_prefix} | {
                k[: i + 1] for k in keys for i in range(len(old_prefix), len(k)) if k[i] == "/"
            }
            keys = [k for k in keys if k not in dirs] + sorted(dirs, key=lambda d: -d.count("/"))
            new_etags: dict[str, str] = {}  # streamed copies get new ETags; reads pin them
            limiter = trio.CapacityLimiter(self.cfg.parallel)

            async def move_one(obj: Any) -> None:
                async with limiter:
                    target = new_prefix + obj.key[len(old_prefix) :]
                    if obj.key.endswith("/"):
                        marker = self.ns.get(src.ino) if obj.key == old_prefix else None
                        hdr = headers_for(marker) if marker else ({}, fmt.DIR_CONTENT_TYPE)
                        await self.store.put(target, b"", hdr[0], hdr[1])
                    elif obj.key not in local_only:
                        new_etags[target] = await self.uploader.copy_object(
                            obj.key, target, src, None
                        )

            async with open_nursery() as nursery:
                for obj in page.objects:
                    nursery.start_soon(move_one, obj)
            # (dst's marker is the new prefix itself: it was just rewritten, never delete it)
            if not any(o.key == old_prefix for o in page.objects):
                headers, ctype = headers_for(src)
                await self.store.put(new_prefix, b"", headers, ctype)  # keep empty dirs alive
            # The journal names the new keys durably before any old key is deleted: a
            # file staged with local data is not copied, so a kill -9 in between would
            # otherwise leave it nowhere (or its chmod undone); now it leaves two copies.
            await self._journal_moved(staged_nodes, old_prefix, new_prefix)
            await self.store.delete_many(keys)
            self.ns.move(src, new_parent, new_name)
        src.stored_at = time.monotonic()  # a listing of new_parent sent before: keep it
        for n in self.ns.descendants(src):
            self.ns.listings.pop(n.ino, None)
            n.stored_at = src.stored_at
            old_etag = n.etag
            if n.staged is None and new_etags.get(self.ns.key(n)):
                n.etag = new_etags[self.ns.key(n)]
            if n.opens:
                self.host.readers_follow(n, old_etag)
        self.index.rename_prefix(old_prefix, new_prefix)
        self.uploader.kick()

    async def _journal_moved(self, nodes: list[Node], old_prefix: str, new_prefix: str) -> None:
        """Point the staged files below a directory being renamed (locks held) at their new
        keys and journal each durably; their names move afterwards. If a record cannot be
        written, every key goes back and the rename fails (a record already written names
        the new key: a crash then leaves that file under both names, never none)."""
        moved: list[tuple[Node, str, str | None, str | None, bool]] = []
        try:
            for n in nodes:
                staged = n.staged
                key = self.ns.key(n)
                moved.append((n, staged.key, staged.source_key, staged.source_etag, n.remote))
                if staged.eager is not None:  # bound to the old key, which may be reused
                    self.eager.abandon(staged, "renamed with its directory")
                staged.key = new_prefix + key[len(old_prefix) :]
                if not staged.has_data:  # metadata-only: its body was copied already
                    staged.source_key, staged.source_etag = staged.key, None
                elif not staged.discarded:
                    n.remote = False  # not copied: the upload stores it under the new key
                    staged.touch(data=False)
                await self.host.journal_durable(staged)
        except BaseException:
            for n, key, source_key, source_etag, remote in moved:
                staged = n.staged
                staged.key, staged.source_key, staged.source_etag = key, source_key, source_etag
                n.remote = remote
            raise
