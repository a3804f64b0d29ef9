"""pyfuse3 Operations: translate each kernel request into namespace, staging and S3 work.

Data flow: reads of untouched objects go to reader.RemoteReader; anything written (or
whose metadata changes) becomes a staging.Staged file on local disk that uploader.WriteBack
sends to S3 once it has been left alone for `upload_delay` seconds (or at close/fsync in
strict mode). Renames, chmod, chown and utimens of a staged file are applied locally, so
rsync's temp-file + rename + chmod + utime costs one PUT.
"""

from __future__ import annotations

import bisect
import errno
import itertools
import json
import logging
import os
import shutil
import stat
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

import cachetools
import pyfuse3
import trio

from fbmount import format as fmt
from fbmount.config import DEFAULT_UMASK, PRIVATE_UMASK, PUBLIC_UMASK, Config
from fbmount.eager import EagerUploads
from fbmount.errors import FsError
from fbmount.metaindex import MetaIndex, current_headers
from fbmount.namespace import ROOT_INO, Entry, Kind, Namespace, Node, headers_for, miss_trusted_for
from fbmount.reader import CHUNK, MemoryBudget, RemoteReader
from fbmount.rename import Renamer
from fbmount.staging import Staged, StagingArea, State
from fbmount.store import S3Store
from fbmount.tasks import guarded, open_nursery
from fbmount.uploader import WriteBack
from fbmount.uploadnotes import UploadNotes

log = logging.getLogger("fbmount.fs")

XATTR_PREFIX = "user.fbmount."
BUCKET_XATTRS = ("acl", "cors", "versioning")  # read-only, on the bucket's root directory
# Answers that are part of normal life (cp -a probing xattrs, mkdir -p, rm of a missing
# file): logged only with --debug; anything else (EIO, timeouts) is a warning.
EXPECTED_ERRNOS = {
    errno.ENOENT,
    errno.EEXIST,
    errno.ENOTEMPTY,
    errno.ENOTSUP,
    errno.EPERM,
    errno.EROFS,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.EINVAL,
    errno.ENAMETOOLONG,
    errno.ELOOP,
}
HEAD_ON_LIST_LIMIT = 256  # readdir HEADs unknown entries only in directories this small
# An object this big is no symlink (a target is under PATH_MAX): the listing types it, and
# its HEAD waits until its attributes are asked for (`rm -rf` never asks).
TYPED_BY_SIZE = 4096
PENDING_HEAD_BATCH = 64  # a stat of one such entry HEADs this many of its siblings at once
# A second lookup in a directory that needs a HEAD within this many seconds of the last is
# a scan (`stat` of every name, rsync, tar): its unknown siblings are HEADed ahead of it.
SCAN_WINDOW = 1.0
# `ls` (opendir) re-lists a small directory whose cached listing is older than this, so a file
# another mount uploaded shows within a second of its upload, not after --dir-ttl.
RELIST_ON_OPENDIR_AFTER = 1.0
LIST_PAGE = 1000  # a bigger directory costs several LIST pages: it waits for --dir-ttl
LOOKUP_PAGES = 10  # a lookup lists a directory of up to 10,000 entries: as dear as 5 probes


@dataclass(eq=False)
class PendingHead:
    """One meta_pending entry's HEAD in a batch: what every stat waiting for it gets."""

    done: trio.Event = field(default_factory=trio.Event)
    error: FsError | None = None


@dataclass(eq=False)
class FileHandle:
    node: Node
    writable: bool
    append: bool
    reader: RemoteReader | None = None
    staged: Staged | None = None  # the staged copy this handle is counted in (handles)
    # (ETag, size) of the object version this handle reads, pinned at open: the cache may
    # learn a newer ETag meanwhile (ls -l, another open), and following it would mix
    # bytes of two versions; with the pin, a change behind the mount fails If-Match (EIO).
    # None: follow the node at the next remote read (opened on a staged file, or the
    # mount itself replaced the object since).
    version: tuple[str, int] | None = None


def fuse_errors(fn: Any) -> Any:
    """Turn FsError/OSError into FUSEError so that the kernel gets an errno, not EIO+trace."""

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except FsError as e:
            level = logging.DEBUG if e.errno in EXPECTED_ERRNOS else logging.WARNING
            log.log(level, "%s: %s", fn.__name__, e.message)
            raise pyfuse3.FUSEError(e.errno) from None
        except OSError as e:
            log.warning("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except (trio.Cancelled, KeyboardInterrupt):
            raise
        except Exception:
            # A bug must cost one syscall an EIO, never the whole mount.
            log.exception("%s failed unexpectedly", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def umask_from_acl(acl: str | None) -> int:
    """The bucket ACL as the mode of objects that carry none: a public-read bucket shows
    world-readable (umask 022), a private one does not (027); unknown: 022."""
    return {"public-read": PUBLIC_UMASK, "private": PRIVATE_UMASK}.get(acl or "", DEFAULT_UMASK)


def statfs_data() -> pyfuse3.StatvfsData:
    s = pyfuse3.StatvfsData()
    s.f_bsize = s.f_frsize = 1 << 20
    s.f_blocks = s.f_bfree = s.f_bavail = 1 << 30  # 1 PiB: S3 has no meaningful limit
    s.f_files = s.f_ffree = s.f_favail = 1 << 30
    s.f_namemax = fmt.NAME_MAX  # FUSE passes longer names than 255; S3 keys hold 1,024
    return s


def decode_name(name: bytes) -> str:
    """Kernel name → key segment; S3 keys are UTF-8, so undecodable names are refused."""
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        raise FsError(errno.EINVAL, f"name is not valid UTF-8: {name!r}") from None


class Filesystem(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        cfg: Config,
        store: S3Store,
        staging: StagingArea,
        index: MetaIndex,
        root_ino: int = ROOT_INO,
    ):
        """`root_ino` > 1: one bucket of an account mount; inodes and handles count up from
        it, so the router (account.py) finds the bucket from any inode or handle number."""
        super().__init__()
        self.cfg, self.store, self.staging, self.index = cfg, store, staging, index
        # Every multipart upload of this bucket (writes, streams, copies) is noted here,
        # so that the next mount aborts what a kill -9 left open.
        store.upload_notes = UploadNotes(staging.root.parent / "multipart")
        self.ns = Namespace(
            cfg.prefix,
            cfg.uid,
            cfg.gid,
            cfg.umask if cfg.umask is not None else DEFAULT_UMASK,
            cfg.attr_ttl,
            cfg.dir_ttl,
            root_ino=root_ino,
        )
        self.handles: dict[int, FileHandle] = {}
        self.dir_handles: dict[int, tuple[list[str], array[int]]] = {}  # opendir: names, inos
        self._root_meta_warned = False  # said once per mount: root metadata is not stored
        self._next_fh = root_ino
        self.get_limiter = trio.CapacityLimiter(max(4, cfg.parallel * 2))
        self.read_budget = MemoryBudget(cfg.memory_limit)
        self.big_dirs: cachetools.TTLCache[int, bool] = cachetools.TTLCache(
            4096, cfg.dir_ttl, timer=time.monotonic
        )
        self.listed_at: cachetools.LRUCache[int, float] = cachetools.LRUCache(4096)
        self.whole_copies: set[int] = set()  # inodes being fetched whole for random reads
        # meta_pending entries whose HEAD is out (getattr waits for its own), and one limit
        # on the HEADs readdir and those batches send at a time.
        self.pending_heads: dict[int, PendingHead] = {}
        self.head_limiter = trio.CapacityLimiter(16)
        # directory inode -> when a lookup in it last needed a HEAD (see SCAN_WINDOW)
        self.lookup_heads: cachetools.TTLCache[int, float] = cachetools.TTLCache(
            1024, SCAN_WINDOW, timer=time.monotonic
        )
        # directory inode -> (its listing, the names sorted): where a scan goes on from
        self.scan_order: cachetools.LRUCache[int, tuple[dict[str, Entry], list[str]]] = (
            cachetools.LRUCache(4)
        )
        self.nursery: trio.Nursery | None = None
        # The layers below get what they need passed in, and this object only as a host
        # seen through a Protocol of theirs: where streams run (eager.StreamHost), "this
        # node is stored" (uploader.UploadHost).
        bodies = trio.CapacityLimiter(cfg.parallel + 2)  # part bodies in memory, shared
        self.eager = EagerUploads(store, cfg.part_size, bodies, host=self)
        self.uploader = WriteBack(cfg, store, staging, self.ns, index, self.eager, host=self)
        self.renamer = Renamer(
            cfg, self.ns, staging, store, index, self.uploader, self.eager, host=self
        )

    # ===== helpers ======================================================================
    def _node(self, ino: int) -> Node:
        node = self.ns.get(ino)
        if node is None:
            raise FsError(errno.ENOENT, f"inode {ino} is gone")
        return node

    def _writable(self) -> None:
        if self.cfg.read_only:
            raise FsError(errno.EROFS, "mounted read-only")

    def _new_name(self, parent_inode: int, name: bytes, kind: Kind = Kind.FILE) -> tuple[Node, str]:
        """Parent and decoded name for an entry about to be created (or renamed to).

        ENAMETOOLONG for a name over NAME_MAX or whose key (a directory's with its '/')
        would exceed S3's 1,024 bytes."""
        parent = self._node(parent_inode)
        if len(name) > fmt.NAME_MAX:
            raise FsError(errno.ENAMETOOLONG, f"name of {len(name)} bytes")
        sname = decode_name(name)
        if not fmt.valid_name(sname):
            raise FsError(errno.EINVAL, f"not a valid name: {sname!r}")
        if not fmt.key_fits(self.ns.child_key(parent, sname, kind)):
            raise FsError(errno.ENAMETOOLONG, f"the key of {sname!r} would exceed 1,024 bytes")
        return parent, sname

    def _new_fh(self) -> int:
        self._next_fh += 1
        return self._next_fh

    def _is_bucket_root(self, inode: int) -> bool:
        return inode == self.ns.root_ino and not self.cfg.prefix

    @staticmethod
    def _dir_changed(*dirs: Node) -> None:
        """POSIX: an entry made, removed or renamed marks its directory's mtime and ctime.
        Kept in this mount's view only: storing it would cost a marker PUT per create."""
        now = time.time_ns()
        for d in dirs:
            d.mtime_ns = d.ctime_ns = now

    def attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.entry_timeout = self.cfg.attr_ttl
        a.attr_timeout = 0 if node.meta_pending else self.cfg.attr_ttl
        a.st_mode = node.mode
        a.st_nlink = 2 if node.kind is Kind.DIR else 1
        a.st_uid, a.st_gid = node.uid, node.gid
        a.st_rdev = node.rdev
        size = node.size
        if node.staged is not None and node.staged.local:  # never a partial download's size
            size = node.size = node.staged.size()
        a.st_size = size
        a.st_blksize = 1 << 20
        a.st_blocks = (size + 511) // 512
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = node.atime_ns, node.mtime_ns, node.ctime_ns
        return a

    def journal(self, staged: Staged, durable: bool) -> None:
        node = staged.node
        headers, ctype = headers_for(node)
        record = self.staging.journal_record(staged, headers, ctype)
        self.staging.write_journal(staged, record, durable)

    async def journal_durable(self, staged: Staged) -> None:
        node = staged.node
        headers, ctype = headers_for(node)
        record = self.staging.journal_record(staged, headers, ctype)
        await self.staging.commit(staged, record)  # shares a write + fsync with others

    # ===== resolving names ==============================================================
    async def resolve(self, parent: Node, name: str) -> Node | None:
        """The node for parent/name, asking S3 only when no fresh answer is cached."""
        if parent.kind is not Kind.DIR:
            raise FsError(errno.ENOTDIR)
        node = self.ns.child(parent.ino, name)
        now = time.monotonic()
        if node is not None and (
            node.staged is not None or node.fresh_until > now or not node.remote
        ):
            return node
        # --attr-ttl 0 (strict): a name missing from a cached listing is asked of S3, as
        # s3fs does, so a name another client just created is there at the next lookup.
        ask_on_miss = self.cfg.attr_ttl <= 0
        listing = self.ns.listings.get(parent.ino)
        if listing is not None:
            entry = listing.get(name)
            if entry is not None:
                return await self._node_from_entry(parent, name, entry, head_unknown=True)
            if not fmt.valid_name(name):
                return None
            if not ask_on_miss:
                if (
                    len(listing) >= LIST_PAGE
                    or parent.ino in self.big_dirs
                    or now - self.listed_at.get(parent.ino, 0.0) <= miss_trusted_for(len(listing))
                ):
                    return None  # young enough, or a directory too big to re-list
                listing = await self.list_dir(parent, max_pages=1, again=True)
                return await self._answer(parent, name, listing) if listing is not None else None
            node = await self._probe(parent, name)
            if node is not None and self.ns.listings.get(parent.ino) is listing:
                listing[name] = self.ns.entry_of(node)
            return node
        if (parent.ino, name) in self.ns.negative and not ask_on_miss:
            return None
        if not fmt.valid_name(name):
            return None
        if parent.ino not in self.big_dirs:
            # A few LIST pages answer every later lookup in a directory of up to
            # LOOKUP_PAGES * 1,000 entries (rsync and tar stat each name), where probing
            # costs HEAD + LIST per name: 500 stats in a 2,000-entry directory were 1,000
            # round trips when one page was all a lookup would list, 2 LISTs now.
            listing = await self.list_dir(parent, max_pages=LOOKUP_PAGES)
            if listing is not None:
                return await self._answer(parent, name, listing)
        return await self._probe(parent, name)

    async def _answer(self, parent: Node, name: str, listing: dict[str, Entry]) -> Node | None:
        """What a listing just taken says of parent/name: its node, or None (absent)."""
        entry = listing.get(name)
        if entry is None:
            return None
        return await self._node_from_entry(parent, name, entry, head_unknown=True)

    async def _node_from_entry(
        self,
        parent: Node,
        name: str,
        entry: Entry,
        head_unknown: bool,
        index_rows: dict[str, tuple[str, str]] | None = None,
    ) -> Node:
        """index_rows: the metadata index's entries of the directory, read at once
        (MetaIndex.under) by a caller that walks all of it."""
        existing = self.ns.child(parent.ino, name)
        if existing is not None:
            if existing.staged is not None:
                return existing
            same_kind = (existing.kind is Kind.DIR) == (entry.kind is Kind.DIR)
            if same_kind and (
                entry.kind is Kind.DIR or (existing.etag == entry.etag and existing.meta_known)
            ):
                existing.fresh_until = time.monotonic() + self.cfg.attr_ttl
                return existing  # the hot path of a warm `ls -l`: nothing changed
        node = self.ns.add(
            parent,
            name,
            entry.kind
            if entry.kind is Kind.DIR
            else (
                existing.kind
                if existing is not None and existing.kind is not Kind.DIR
                else Kind.FILE
            ),
        )
        self.ns.apply_entry(node, entry)
        if node.kind is not Kind.DIR and not node.meta_known and node.index_etag != node.etag:
            node.index_etag = node.etag
            key = self.ns.key(node)
            if index_rows is None:
                headers = self.index.get(key, node.etag)
            else:
                headers = current_headers(index_rows.get(key), node.etag)
            if headers is not None:
                self._apply_headers(node, headers)
            elif head_unknown:
                await self._head_for_lookup(parent, node)
        elif node.kind is not Kind.DIR and not node.meta_known and head_unknown:
            await self._head_for_lookup(parent, node)
        return node

    async def _head_for_lookup(self, parent: Node, node: Node) -> None:
        """A lookup needs this file's headers (it is small enough to be a symlink, and the
        metadata index does not know it). A lone lookup costs its HEAD. A scan — a second
        such lookup in the directory within SCAN_WINDOW — marks the next unknown entries
        of the listing pending, so one parallel round HEADs them with this one and the
        stats that follow find their answers ready: a round trip per batch, not per name."""
        scan = node.meta_pending or parent.ino in self.lookup_heads
        self.lookup_heads[parent.ino] = time.monotonic()
        if not scan:
            await self.head_into(node, unless_known=True)
            return
        node.meta_pending = True
        siblings = (
            []  # its batch is out already
            if node.ino in self.pending_heads
            else await self._mark_unknown_pending(parent, node.name, PENDING_HEAD_BATCH - 1)
        )
        try:
            await self._head_pending(node, siblings)
        except FsError as e:
            if e.errno != errno.ENOENT:
                raise
            # Gone: the listing's attributes stand, as after a lone HEAD that finds none.
            node.meta_pending = False

    async def _mark_unknown_pending(self, parent: Node, after: str, limit: int) -> list[Node]:
        """Up to `limit` listed files of `parent` after the name `after` (listing order:
        a scan goes that way) whose headers nobody knows yet (the metadata index is asked
        first), as nodes marked pending."""
        listing = self.ns.listings.get(parent.ino)
        if listing is None:
            return []
        cached = self.scan_order.get(parent.ino)
        if cached is None or cached[0] is not listing:
            cached = self.scan_order[parent.ino] = (listing, sorted(listing))
        names = cached[1]
        marked: list[Node] = []
        for name in itertools.islice(names, bisect.bisect_right(names, after), None):
            if len(marked) >= limit:
                break
            entry = listing.get(name)
            if entry is None or entry.kind is Kind.DIR or entry.size >= TYPED_BY_SIZE:
                continue
            child = self.ns.child(parent.ino, name)
            if child is not None and (child.meta_known or child.meta_pending):
                continue
            child = await self._node_from_entry(parent, name, entry, head_unknown=False)
            if child.kind is not Kind.DIR and not child.meta_known and child.staged is None:
                child.meta_pending = True
                marked.append(child)
        return marked

    def _apply_headers(self, node: Node, headers: dict[str, str]) -> None:
        kind = self.ns.kind_from_headers(headers)
        if kind is not node.kind and node.kind is not Kind.DIR:
            node.kind = kind
            node.mode = self.ns.default_mode(kind)
        self.ns.apply_meta(node, headers)

    async def head_into(self, node: Node, unless_known: bool = False) -> bool:
        """HEAD the node's object into it; unless_known: not if its metadata became known
        (a chmod, a write) while the HEAD was out, which the answer must not undo."""
        key = self.ns.key(node)
        info = await self.store.head(key)
        if info is None:
            return False
        if unless_known and (node.meta_known or node.staged is not None or not node.linked):
            return False
        node.size, node.etag = info.size, info.etag
        node.content_type, node.storage_class = info.content_type, info.storage_class
        node.mtime_ns = node.ctime_ns = node.atime_ns = info.mtime_ns
        headers = info.metadata or {}
        self._apply_headers(node, headers)
        self.index.put(key, info.etag, headers)
        node.remote = True
        node.fresh_until = time.monotonic() + self.cfg.attr_ttl
        return True

    async def _head_pending(self, node: Node, siblings: list[Node] | None = None) -> None:
        """Fetch a meta_pending entry's headers, with those of up to PENDING_HEAD_BATCH of
        its pending siblings (`ls -l` stats them next; `siblings`: these, not a walk of the
        listing): one round of parallel HEADs, in the background, so this stat waits for
        its own answer only. Raises what its HEAD raised (ENOENT: the object is gone);
        every caller waiting on it gets that."""
        pending = self.pending_heads.get(node.ino)
        if pending is None:
            batch = [node]
            if siblings is not None:
                batch += [c for c in siblings if c is not node and c.ino not in self.pending_heads]
            walk = self.ns.listings.get(node.parent) if siblings is None else None
            for name in walk or ():
                if len(batch) >= PENDING_HEAD_BATCH:
                    break
                sibling = self.ns.child(node.parent, name)
                if (
                    sibling is not None
                    and sibling is not node
                    and sibling.meta_pending
                    and sibling.ino not in self.pending_heads
                ):
                    batch.append(sibling)
            heads = {child.ino: PendingHead() for child in batch}
            self.pending_heads.update(heads)
            assert self.nursery is not None
            self.nursery.start_soon(
                guarded, f"HEAD of {len(batch)} listed files", self._head_batch, batch, heads
            )
            pending = heads[node.ino]
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error

    async def _head_batch(self, batch: list[Node], heads: dict[int, PendingHead]) -> None:
        async def head(child: Node) -> None:
            pending = heads[child.ino]
            try:
                async with self.head_limiter:
                    found = not child.meta_pending or await self.head_into(child, unless_known=True)
                if not found and not child.meta_known and child.staged is None:
                    pending.error = FsError(errno.ENOENT, "gone from the bucket")
            except FsError as e:  # its waiters get it; the next stat asks again
                pending.error = e
            finally:
                self.pending_heads.pop(child.ino, None)
                pending.done.set()

        try:
            async with open_nursery() as nursery:
                for child in batch:
                    nursery.start_soon(head, child)
        finally:  # a bug, or the mount closing: no stat may wait forever
            for child in batch:
                pending = heads[child.ino]
                if not pending.done.is_set():
                    pending.error = FsError(errno.EIO, "fetching its metadata failed")
                    self.pending_heads.pop(child.ino, None)
                    pending.done.set()

    async def know_meta(self, node: Node) -> None:
        """Before a change rewrites a file's metadata (chmod, chown, utime, a write): what
        it keeps (owner, times, xattrs) must be known, not the listing's defaults. Raises
        rather than let the change go on without them."""
        if node.kind is not Kind.FILE or node.staged is not None or node.meta_known:
            return
        if not node.remote:
            return
        if node.meta_pending:
            await self._head_pending(node)
        elif not await self.head_into(node):
            raise FsError(errno.ENOENT, f"{self.ns.key(node)}: gone from the bucket")
        if not node.meta_known and node.staged is None:
            raise FsError(errno.EIO, f"{self.ns.key(node)}: its metadata could not be read")

    async def _head_marker(self, node: Node) -> None:
        """Directory mode/owner/times live on the `dir/` marker (when the server keeps them)."""
        node.meta_known = True  # asked once per node, whatever the answer
        info = await self.store.head(self.ns.key(node))
        if info is not None and info.metadata:
            self.ns.apply_meta(node, info.metadata)

    async def _probe(self, parent: Node, name: str) -> Node | None:
        """No listing cached: HEAD the object and LIST the prefix at once."""
        key = self.ns.key(parent) + name
        batches = self.uploader.delete_batches  # a delete done after this may be answered
        sent = time.monotonic()  # a key this mount writes after this may be answered old
        results: dict[str, Any] = {}

        async def head() -> None:
            results["head"] = await self.store.head(key)

        async def list_prefix() -> None:
            results["list"] = await self.store.list_page(key + "/", "/", max_keys=1)

        async with open_nursery() as nursery:
            nursery.start_soon(head)
            nursery.start_soon(list_prefix)
        page, info = results["list"], results["head"]
        existing = self.ns.child(parent.ino, name)
        if existing is not None and existing.stored_at >= sent:
            return existing  # stored (or moved here) by this mount after the requests left
        if info is not None and self.uploader.deleted_since(key, batches):
            info = None
        if page.objects or page.prefixes:
            node = self.ns.add(parent, name, Kind.DIR)
            node.remote = True
            node.fresh_until = time.monotonic() + self.cfg.dir_ttl
            return node
        if info is None:
            if existing is not None and existing.staged is None:
                self.ns.unlink(existing)
            self.ns.negative[(parent.ino, name)] = True
            return None
        headers = info.metadata or {}
        node = self.ns.add(parent, name, self.ns.kind_from_headers(headers))
        node.size, node.etag = info.size, info.etag
        node.content_type, node.storage_class = info.content_type, info.storage_class
        node.mtime_ns = node.ctime_ns = node.atime_ns = info.mtime_ns
        self.ns.apply_meta(node, headers)
        self.index.put(key, info.etag, headers)
        node.remote = True
        node.fresh_until = time.monotonic() + self.cfg.attr_ttl
        return node

    async def _must_resolve(self, parent_ino: int, name: bytes) -> tuple[Node, Node, str]:
        parent = self._node(parent_ino)
        sname = decode_name(name)
        node = await self.resolve(parent, sname)
        if node is None:
            raise FsError(errno.ENOENT)
        return parent, node, sname

    async def list_dir(
        self, node: Node, max_pages: int | None = None, again: bool = False
    ) -> dict[str, Entry] | None:
        """The directory's entries: S3's listing (cached) merged with staged children.

        max_pages: list at most that many pages; None (and the directory remembered as
        big) if the directory has more entries than they hold.
        again: list even if a listing is cached (it is replaced when the new one arrives).
        """
        listing = self.ns.listings.get(node.ino)
        if listing is not None and not again:
            return listing
        # Listings past --dir-ttl are dropped only when the cache is next written: let them
        # go now, not after this directory's new listing is built beside its old one.
        self.ns.listings.expire()
        prefix = self.ns.key(node)
        batches = self.uploader.delete_batches  # deletes done after this may be listed
        sent = time.monotonic()  # keys this mount writes after this may be missing
        # Page by page into the one dict: a big directory's LIST answers are never all held
        # beside its entries (100,000 keys: ~20 MiB of ObjectInfo and key strings).
        listing = {}
        token, pages = None, 0
        while True:
            if pages == max_pages:
                self.big_dirs[node.ino] = True
                return None
            page = await self.store.list_page(prefix, "/", token)
            self.ns.add_listing_page(listing, node, prefix, page)
            pages += 1
            token = page.next_token
            if not token:
                break
        if max_pages is not None:
            cached = self.ns.listings.get(node.ino)
            if cached is not None and (not again or self.listed_at.get(node.ino, 0.0) >= sent):
                return cached  # a concurrent lookup or readdir listed it meanwhile
        up = self.uploader
        if up.pending_deletes or up.deleting or up.delete_batches > batches:
            for name in [
                n
                for n, e in listing.items()
                if e.kind is not Kind.DIR and up.deleted_since(prefix + n, batches)
            ]:
                del listing[name]  # unlinked: DeleteObjects not sent, or done after the LIST
        for name in self.ns.child_names(node):
            child = self.ns.child(node.ino, name)
            if child is None:
                continue
            stored_since = child.stored_at >= sent  # newer than the answer: ours stands
            if name in listing and not stored_since:
                continue
            if child.staged is not None or not child.remote or stored_since:
                listing[name] = self.ns.entry_of(child)
            elif child.kind is not Kind.DIR or child.fresh_until < time.monotonic():
                self.ns.unlink(child)  # gone from the bucket
        self.ns.listings[node.ino] = listing
        self.listed_at[node.ino] = time.monotonic()
        return listing

    # ===== attributes ===================================================================
    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        parent = self._node(parent_inode)
        if len(name) > fmt.NAME_MAX:
            raise FsError(errno.ENAMETOOLONG, f"name of {len(name)} bytes")
        sname = decode_name(name)
        if sname == ".":
            node = parent
        elif sname == "..":
            node = self._node(parent.parent)
        else:
            node = await self.resolve(parent, sname)
        if node is None:
            a = pyfuse3.EntryAttributes()
            a.st_ino = 0
            # kernel-side negative cache; none in strict mode (a miss is asked of S3)
            a.entry_timeout = self.ns.negative.ttl if self.cfg.attr_ttl > 0 else 0
            return a
        if node.kind is Kind.DIR and not node.meta_known and node.ino != self.ns.root_ino:
            await self._head_marker(node)
        elif (
            node.kind is Kind.FILE
            and not node.meta_known
            and node.staged is None
            and node.remote
            and node.size < TYPED_BY_SIZE
        ):
            # Maybe a symlink, and the kernel takes the type from this answer for good.
            await self._head_for_lookup(parent, node)
        node.lookups += 1
        return self.attrs(node)

    async def forget(self, inode_list: Any) -> None:
        for ino, n in inode_list:
            self.ns.forget(ino, n)

    @fuse_errors
    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        node = self._node(inode)
        if node.meta_pending:
            await self._head_pending(node)
        if (
            node.kind is not Kind.DIR
            and node.staged is None
            and node.remote
            and node.linked
            and node.fresh_until < time.monotonic()
            and not node.opens
        ):
            if self.cfg.attr_ttl <= 0 and await self.head_into(node):
                return self.attrs(node)  # strict: every stat asks S3, a listing is not enough
            parent = self.ns.get(node.parent)
            if parent is not None:
                fresh = await self.resolve(parent, node.name)
                if fresh is not None and fresh is not node:
                    node = fresh
        return self.attrs(node)

    @fuse_errors
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
        self._writable()
        node = self._node(inode)
        await self.know_meta(node)
        now = time.time_ns()
        if fields.update_size:
            if node.kind is not Kind.FILE:
                raise FsError(errno.EISDIR if node.kind is Kind.DIR else errno.EINVAL)
            staged = await self.ensure_data(node, keep=attr.st_size)
            self.eager.abandon(staged, "truncated")
            # On the trio thread, in one step with its touch (a local truncate is quick): an
            # upload's copy of the file (uploader._snapshot) never holds half a truncate,
            # and an upload of the old bytes cannot end in between and retire the file.
            os.truncate(staged.data_path, attr.st_size)
            node.size = attr.st_size
            node.mtime_ns = node.ctime_ns = now
            staged.touch()
            self.journal(staged, durable=False)
        # Only a real change is stored: rsync fchmods its mkstemp file to the mode it has,
        # and a durable journal append for nothing cost each file 0.8 ms.
        meta_changed = False
        if fields.update_mode:
            mode = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
            meta_changed |= mode != node.mode
            node.mode = mode
        if fields.update_uid:
            meta_changed |= attr.st_uid != node.uid
            node.uid = attr.st_uid
        if fields.update_gid:
            meta_changed |= attr.st_gid != node.gid
            node.gid = attr.st_gid
        if fields.update_mtime:
            meta_changed |= attr.st_mtime_ns != node.mtime_ns
            node.mtime_ns = attr.st_mtime_ns
            if node.staged is not None:
                node.staged.times_set = True
        if fields.update_atime:
            meta_changed |= attr.st_atime_ns != node.atime_ns
            node.atime_ns = attr.st_atime_ns
        if meta_changed:
            node.ctime_ns = now
            node.meta_known = True
            await self.metadata_changed(node)
        return self.attrs(node)

    async def metadata_changed(self, node: Node) -> None:
        """Persist new metadata: a marker PUT for dirs, a staged change for files."""
        if node.kind is Kind.DIR:
            if self._is_bucket_root(node.ino):
                # No marker carries it: kept in this mount's view, so that rsync -a and
                # cp -a into the mount root succeed; the next mount shows -o umask/uid/gid.
                if not self._root_meta_warned:
                    self._root_meta_warned = True
                    log.warning(
                        "mode, owner and times of the bucket root are not stored in S3 "
                        "(set them with -o umask/uid/gid)"
                    )
                return
            self.uploader.marker_changed(node)  # coalesced: rsync's chmod + utime = one PUT
            return
        if node.kind is Kind.LINK:
            # A symlink is tiny: rewrite it whole rather than copying it onto itself.
            target = (
                os.fsencode(node.link_target)
                if node.link_target is not None
                else (await self.store.get_object(self.ns.key(node)))
            )
            node.link_target = os.fsdecode(target)
            headers, _ = headers_for(node)
            node.etag = await self.store.put(
                self.ns.key(node), target, headers, fmt.LINK_CONTENT_TYPE
            )
            node.mark_stored()
            self.index.put(self.ns.key(node), node.etag, headers)
            return
        staged = node.staged
        if staged is None:
            staged = self.staging.new(
                self.ns.key(node),
                with_data=False,
                source_key=self.ns.key(node),
                source_etag=node.etag,
                state=State.CLEAN,
            )
            staged.node, node.staged = node, staged
        staged.touch(data=False)
        await self.journal_durable(staged)
        self.uploader.kick()

    # ===== staging ======================================================================
    async def ensure_data(self, node: Node, keep: int | None = None) -> Staged:
        """A staged copy whose local file is complete: new, or downloaded (only the first
        `keep` bytes).

        The download keeps the entry LOADING with its lock held, so a second open or
        truncate, an upload, an unlink or a rename waits for it: the uploader never sends a
        partial copy, and no write can be overwritten by download bytes arriving later. A
        failed download leaves S3 untouched and raises (EIO) to the caller."""
        while True:
            staged = node.staged
            if staged is not None and staged.local:
                return staged
            if staged is None or not staged.lock.locked():
                break
            async with staged.lock:  # a download (or an upload) in flight: wait, look again
                pass
        # From here to acquire_nowait() nothing yields: the entry is LOADING and locked at once.
        key = self.ns.key(node)
        if staged is None:
            staged = self.staging.new(
                key, source_key=key, source_etag=node.etag, state=State.LOADING
            )
            staged.node, node.staged = node, staged
        else:
            self.staging.begin_load(staged)  # a pending metadata change stays pending
        staged.lock.acquire_nowait()
        try:
            want = node.size if keep is None else min(keep, node.size)
            if node.remote and want > 0:
                staged.seq_end = -1  # existing bytes: not a fresh front-to-back write
                await self._download(key, node.etag, want, staged)
        except BaseException:
            if self.staging.load_failed(staged) and node.staged is staged:
                node.staged = None
            raise
        else:
            staged.loaded()
        finally:
            staged.lock.release()
        return staged

    async def _download(self, key: str, etag: str, size: int, staged: Staged) -> None:
        """Fill the LOADING copy through a descriptor of its own, closed only once every
        worker thread is done (a release() may close the staged file's shared fd)."""
        assert staged.data_path is not None
        fd = os.open(staged.data_path, os.O_WRONLY)

        async def fetch(start: int) -> None:
            async with self.get_limiter:
                data = await self.store.get_range(key, start, min(start + CHUNK, size), etag)
            await trio.to_thread.run_sync(os.pwrite, fd, data, start)

        try:
            async with open_nursery() as nursery:
                for start in range(0, size, CHUNK):
                    nursery.start_soon(fetch, start)
        finally:
            os.close(fd)

    def discard(self, node: Node) -> None:
        """Drop a staged file that must never be uploaded (its name is gone)."""
        staged = node.staged
        if staged is None:
            return
        self.staging.discard(staged)  # its journal record goes now, open or not
        self.eager.abandon(staged, "unlinked")
        if node.opens == 0:
            self.staging.remove(staged)
            node.staged = None

    def stored(self, node: Node) -> None:
        """Write-back's word (uploader.UploadHost) that `node`'s upload is in S3: its
        open handles now read the version this mount stored."""
        self.readers_follow(node)

    # ===== files ========================================================================
    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        node = self._node(inode)
        if node.kind is Kind.DIR:
            raise FsError(errno.EISDIR)
        writable = (flags & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR)
        if writable or flags & os.O_TRUNC:
            self._writable()
        if node.kind is Kind.LINK:
            raise FsError(errno.ELOOP)
        fi = pyfuse3.FileInfo()
        handle = FileHandle(node, writable, bool(flags & os.O_APPEND))
        if writable:
            await self.know_meta(node)
            staged = await self.ensure_data(node, keep=0 if flags & os.O_TRUNC else None)
            if flags & os.O_TRUNC and (staged.size() or node.size):  # keep=0: nothing local
                os.ftruncate(self.staging.open_fd(staged), 0)
                node.size = 0
                node.mtime_ns = node.ctime_ns = time.time_ns()
                staged.touch()
                self.journal(staged, durable=False)
            staged.writers += 1
        elif node.staged is None and node.remote:
            if node.fresh_until < time.monotonic():
                await self.head_into(node)  # close-to-open: see changes made elsewhere
            self._pin(handle, fi)
        if node.staged is not None:
            node.staged.handles += 1
            handle.staged = node.staged
            self.staging.open_fd(node.staged) if node.staged.local else None
        node.opens += 1
        fi.fh = self._new_fh()
        self.handles[fi.fh] = handle
        return fi

    @fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
        self._writable()
        parent, sname = self._new_name(parent_inode, name)
        existing = await self.resolve(parent, sname)
        if existing is None and not flags & (os.O_TRUNC | os.O_EXCL):
            # The kernel believed the name absent, and our caches may too; but O_CREAT
            # without O_TRUNC (`>>`, dd conv=notrunc) must keep an object that another
            # client created meanwhile, so ask S3 itself before making a new, empty file.
            existing = await self._probe(parent, sname)
        if existing is not None:
            if flags & os.O_EXCL:
                raise FsError(errno.EEXIST)
            fi = await self.open(existing.ino, flags, ctx)  # O_TRUNC only if the caller asked
            existing.lookups += 1
            return fi, self.attrs(existing)
        node = self.ns.add(parent, sname, Kind.FILE)
        node.remote = False
        node.mode = stat.S_IFREG | (stat.S_IMODE(mode) & ~ctx.umask)
        node.uid, node.gid = ctx.uid, ctx.gid
        node.meta_known = True
        staged = self.staging.new(self.ns.key(node))
        staged.node, node.staged = node, staged
        staged.touch()
        # An unlink of this name whose delete is still queued stays queued: the delete is
        # sent before this file's first upload (uploader.delete_first), never cancelled.
        # No journal record yet: it is written (durably) at close; a crash before close
        # drops the bytes, which nothing had acknowledged as stored.
        listing = self.ns.listings.get(parent.ino)
        if listing is not None:
            listing[sname] = self.ns.entry_of(node)
        self._dir_changed(parent)
        staged.writers += 1
        staged.handles += 1
        node.opens += 1
        node.lookups += 1
        fi = pyfuse3.FileInfo(fh=self._new_fh())
        self.handles[fi.fh] = FileHandle(node, True, bool(flags & os.O_APPEND), staged=staged)
        return fi, self.attrs(node)

    def _pin(self, handle: FileHandle, fi: pyfuse3.FileInfo) -> None:
        """Pin the version a read-only open of a remote object reads, and guard the page
        cache: the kernel keeps one per inode, so an open pinning another version than an
        open handle of the same inode bypasses it (direct_io); else each fd would read
        the pages the other fetched, bytes of two versions."""
        node = handle.node
        handle.version = (node.etag, node.size)
        fi.keep_cache = node.cached_etag == node.etag
        others = node.opens and any(
            h.node is node and h.version is not None and h.version != handle.version
            for h in self.handles.values()
        )
        if others:
            fi.direct_io = True
            node.cached_etag = None  # the next open drops whatever the others cached
        else:
            node.cached_etag = node.etag

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        handle = self.handles[fh]
        node = handle.node
        staged = node.staged
        if staged is not None and staged.local:  # LOADING: read the remote object instead
            # A descriptor of our own: a release() may close the shared one meanwhile.
            fd = os.dup(self.staging.open_fd(staged))
            try:
                return await trio.to_thread.run_sync(os.pread, fd, size, off)
            finally:
                os.close(fd)
        if staged is not None or handle.version is None:
            # A metadata change of this mount is pending: the node's ETag is changed only
            # by the mount itself until it is uploaded, so it is the version to read.
            handle.version = (node.etag, node.size)
        etag, known_size = handle.version
        reader = handle.reader
        if reader is None or (reader.etag, reader.size) != (etag or None, known_size):
            if reader is not None:
                reader.close()
            assert self.nursery is not None
            handle.reader = RemoteReader(
                self.store,
                self.ns.key(node),
                known_size,
                etag or None,
                self.cfg.read_ahead,
                self.nursery.start_soon,
                self.get_limiter,
                self.read_budget,
            )
        try:
            data = await handle.reader.read(off, size)
        except FsError as e:
            if e.errno == errno.EIO and "changed on the server" in e.message:
                node.fresh_until = 0  # next open sees the new version
            raise
        if (
            handle.reader.wants_whole_copy
            and node.staged is None
            and node.ino not in self.whole_copies
            and handle.version == (node.etag, node.size)
        ):
            self.whole_copies.add(node.ino)
            assert self.nursery is not None
            # guarded: a bug in it costs the copy (reads stay remote), never the mount
            self.nursery.start_soon(
                guarded, f"local copy of {self.ns.key(node)}", self._copy_whole, handle
            )
        return data

    async def _copy_whole(self, handle: FileHandle) -> None:
        """A file read at random all over: fetch it to local disk (parallel 8 MiB GETs, as
        a write to it would) so the rest of its reads cost no round trip. The copy is CLEAN
        and goes when its last handle closes; any failure leaves reads remote."""
        node = handle.node
        try:
            if shutil.disk_usage(self.staging.root).free < 2 * node.size:
                return  # the cache disk is for staged writes first
            staged = await self.ensure_data(node)
        except (FsError, OSError) as e:
            log.debug("local copy of %s for random reads: %s", self.ns.key(node), e)
            return
        finally:
            self.whole_copies.discard(node.ino)
        if handle.staged is None and any(h is handle for h in self.handles.values()):
            staged.handles += 1  # counted: its release retires the copy
            handle.staged = staged
        elif staged.handles == 0 and staged.state is State.CLEAN:
            self.uploader.retire(staged)  # closed meanwhile: nobody reads it

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.handles[fh]
        node = handle.node
        staged = node.staged
        if staged is None or not staged.local:
            staged = await self.ensure_data(node)
        fd = self.staging.open_fd(staged)
        if handle.append:
            off = os.fstat(fd).st_size
        written = os.pwrite(fd, buf, off)
        end = off + written
        if end > node.size:
            node.size = end
        node.mtime_ns = node.ctime_ns = time.time_ns()
        staged.touch()
        self.eager.wrote(staged, node.name, off, end)
        return written

    @fuse_errors
    async def flush(self, fh: int) -> None:
        handle = self.handles[fh]
        staged = handle.node.staged
        if not handle.writable or staged is None or not staged.dirty:
            return
        await self.journal_durable(staged)  # close() returns only once it is on local disk
        if self.cfg.upload_delay <= 0:
            await self.uploader.upload(staged)

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        staged = self.handles[fh].node.staged
        if staged is not None and staged.dirty:
            await self.journal_durable(staged)
            await self.uploader.upload(staged)

    @fuse_errors
    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh)
        node = handle.node
        node.opens -= 1
        if handle.reader is not None:
            handle.reader.close()
        counted = handle.staged  # a handle opened before the file was staged counts in none
        if counted is not None:
            counted.handles -= 1
            if handle.writable:
                counted.writers -= 1
                counted.last_change = time.monotonic()
            if counted.handles == 0:
                self.staging.close_fd(counted)
        staged = node.staged
        if staged is not None and staged.handles == 0:
            if staged.discarded:
                if node.opens == 0:  # nobody reads the unlinked file's local copy any more
                    self.staging.remove(staged)
                    node.staged = None
            elif staged.state is State.CLEAN:
                self.uploader.retire(staged)
            elif counted is staged:
                self.uploader.kick()
        self.ns._maybe_drop(node)

    # ===== directories ==================================================================
    @fuse_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        node = self._node(inode)
        if node.kind is not Kind.DIR:
            raise FsError(errno.ENOTDIR)
        cached = self.ns.listings.get(node.ino)
        if (
            cached is not None
            and len(cached) < LIST_PAGE
            and time.monotonic() - self.listed_at.get(node.ino, 0.0) > RELIST_ON_OPENDIR_AFTER
        ):
            self.ns.listings.pop(node.ino, None)  # one LIST sees what other clients did
        listing = await self.list_dir(node)
        names = sorted(listing)
        # A big directory's index entries in one query, not one query per name.
        index_rows = (
            self.index.under(self.ns.key(node), 4 * len(names)) if len(names) > 64 else None
        )
        unknown: list[Node] = []  # at most HEAD_ON_LIST_LIMIT + 1: more are not HEADed
        # The names and an array of their inodes, not a (name, ino) tuple per entry (100,000
        # entries: 6 MiB). Inode 0 (a name gone from the listing meanwhile) is skipped by
        # readdir as a forgotten node is.
        inos = array("Q")
        for name in names:
            entry = listing.get(name)
            if entry is None:
                inos.append(0)
                continue
            child = await self._node_from_entry(
                node, name, entry, head_unknown=False, index_rows=index_rows
            )
            inos.append(child.ino)
            if (
                child.kind is not Kind.DIR
                and not child.meta_known
                and child.staged is None
                and len(unknown) <= HEAD_ON_LIST_LIMIT
            ):
                unknown.append(child)
        if 0 < len(unknown) <= HEAD_ON_LIST_LIMIT:
            for child in unknown:
                # (a small entry still pending has its HEAD out in a lookup's batch)
                child.meta_pending = (
                    child.kind is Kind.FILE and child.size >= TYPED_BY_SIZE
                ) or child.ino in self.pending_heads

            async def head(child: Node) -> None:
                async with self.head_limiter:
                    await self.head_into(child)

            async def wait_pending(child: Node) -> None:
                try:
                    await self._head_pending(child)
                except FsError as e:
                    if e.errno != errno.ENOENT:
                        await head(child)  # its type is what readdirplus must get right

            async with open_nursery() as nursery:
                for child in unknown:
                    if not child.meta_pending:
                        nursery.start_soon(head, child)
                    elif child.size < TYPED_BY_SIZE:  # readdirplus gives the kernel its type
                        nursery.start_soon(wait_pending, child)
        fh = self._new_fh()
        self.dir_handles[fh] = (names, inos)
        return fh

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        names, inos = self.dir_handles[fh]
        for i in range(start_id, len(names)):
            name, ino = names[i], inos[i]
            node = self.ns.get(ino)
            if node is None:
                continue
            if not pyfuse3.readdir_reply(
                token, name.encode("utf-8", "surrogateescape"), self.attrs(node), i + 1
            ):
                return
            node.lookups += 1

    async def releasedir(self, fh: int) -> None:
        self.dir_handles.pop(fh, None)

    @fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        self._writable()
        parent, sname = self._new_name(parent_inode, name, Kind.DIR)
        if await self.resolve(parent, sname) is not None:
            raise FsError(errno.EEXIST)
        node = self.ns.add(parent, sname, Kind.DIR)
        node.mode = stat.S_IFDIR | (stat.S_IMODE(mode) & ~ctx.umask)
        node.uid, node.gid = ctx.uid, ctx.gid
        node.mtime_ns = node.ctime_ns = node.atime_ns = time.time_ns()
        node.remote = False  # until its marker exists: a concurrent re-list must keep it
        headers, ctype = headers_for(node)
        try:
            # A file of this name unlinked a moment ago may still be in S3 (its delete is
            # batched): stores with a real directory tree (SeaweedFS, MinIO) refuse `x/`
            # beside `x`, so that delete goes first.
            await self.uploader.delete_first(self.ns.key(node).rstrip("/"))
            await self.store.put(self.ns.key(node), b"", headers, ctype)
        except BaseException:
            self.ns.unlink(node)
            raise
        node.mark_stored()
        node.meta_known = True
        node.fresh_until = float("inf")
        self.ns.listings[node.ino] = {}  # known empty: creating files inside needs no LIST
        self.listed_at[node.ino] = time.monotonic()
        listing = self.ns.listings.get(parent.ino)
        if listing is not None:
            listing[sname] = Entry(Kind.DIR)
        self._dir_changed(parent)
        node.lookups += 1
        return self.attrs(node)

    async def dir_is_empty(self, node: Node, queued_count_as_gone: bool = False) -> bool:
        """No staged child and nothing in S3 under the directory's key but its marker.

        queued_count_as_gone: keys whose delete is queued or was sent after the LIST went
        out count as gone (rmdir after `rm -rf` unlinked the files: one LIST, no wait for
        their DeleteObjects first)."""
        if any(c.staged is not None and not c.staged.discarded for c in self.ns.descendants(node)):
            return False
        prefix = self.ns.key(node)
        if not queued_count_as_gone:
            page = await self.store.list_page(prefix, "/", max_keys=2)
            return not page.prefixes and all(o.key == prefix for o in page.objects)
        up = self.uploader
        batches = up.delete_batches
        queued = sum(1 for k in up.queued_deletes() if k.startswith(prefix))
        page = await self.store.list_page(prefix, "/", max_keys=min(1000, queued + 2))
        if page.prefixes or any(
            o.key != prefix and not up.deleted_since(o.key, batches) for o in page.objects
        ):
            return False
        if page.next_token is None:
            return True
        await up.flush_deletes(prefix)  # more than a page: ask again once they are gone
        return await self.dir_is_empty(node)

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._writable()
        parent, node, sname = await self._must_resolve(parent_inode, name)
        if node.kind is not Kind.DIR:
            raise FsError(errno.ENOTDIR)
        if not await self.dir_is_empty(node, queued_count_as_gone=True):
            raise FsError(errno.ENOTEMPTY)
        try:
            await self.uploader.delete_dir(self.ns.key(node))
        except FsError:
            # DeleteObjects fails key by key: the marker may be gone with the directory
            # still there. PUT it again (its mode, owner and times) once settled.
            self.uploader.marker_changed(node)
            raise
        self.ns.listings.pop(node.ino, None)
        self.ns.unlink(node)
        self.ns.negative[(parent.ino, sname)] = True
        self._dir_changed(parent)

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._writable()
        parent, node, sname = await self._must_resolve(parent_inode, name)
        if node.kind is Kind.DIR:
            raise FsError(errno.EISDIR)
        await self._remove_file(node)
        self.ns.unlink(node)
        self.ns.negative[(parent.ino, sname)] = True
        self._dir_changed(parent)

    async def _remove_file(self, node: Node) -> None:
        key = self.ns.key(node)
        if node.staged is None and node.opens and node.remote:
            await self.ensure_data(node)  # open handles keep reading, as POSIX says
        staged = node.staged
        if staged is not None:
            async with staged.lock:
                if node.remote:
                    await self.uploader.delete(key)
                self.discard(node)
        elif node.remote:
            await self.uploader.delete(key)
        node.remote = False
        self.index.delete(key)

    @fuse_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        self._writable()
        parent, sname = self._new_name(parent_inode, name)
        if await self.resolve(parent, sname) is not None:
            raise FsError(errno.EEXIST)
        node = self.ns.add(parent, sname, Kind.LINK)
        node.remote = False  # until stored: a concurrent re-list must keep it
        node.uid, node.gid = ctx.uid, ctx.gid
        node.link_target = os.fsdecode(target)
        body = target
        node.size = len(body)
        headers, _ = headers_for(node)
        try:
            key = self.ns.key(node)
            await self.uploader.delete_first(key)
            node.etag = await self.store.put(key, body, headers, fmt.LINK_CONTENT_TYPE)
        except BaseException:
            self.ns.unlink(node)
            raise
        self.index.put(self.ns.key(node), node.etag, headers)
        node.mark_stored()
        node.meta_known = True
        node.fresh_until = time.monotonic() + self.cfg.attr_ttl
        listing = self.ns.listings.get(parent.ino)
        if listing is not None:
            listing[sname] = self.ns.entry_of(node)
        self._dir_changed(parent)
        node.lookups += 1
        return self.attrs(node)

    @fuse_errors
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        node = self._node(inode)
        if node.kind is not Kind.LINK:
            raise FsError(errno.EINVAL)
        if node.link_target is None:
            node.link_target = os.fsdecode(await self.store.get_object(self.ns.key(node)))
        return os.fsencode(node.link_target)

    @fuse_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
        raise FsError(errno.EOPNOTSUPP, "hard links cannot be stored in S3")

    @fuse_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> Any:
        """A regular file (as create + close would make it), or a FIFO, socket or device:
        an empty object whose mode carries the type, as s3fs's mknod writes it, plus
        `rdev` for devices. Opening a FIFO or device is the kernel's business, not ours."""
        self._writable()
        ftype = stat.S_IFMT(mode)
        if ftype in (0, stat.S_IFREG):
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
            fi, _ = await self.create(parent_inode, name, stat.S_IMODE(mode), flags, ctx)
            node = self.handles[fi.fh].node
            try:
                await self.flush(fi.fh)  # the journal record close() would write
            finally:
                await self.release(fi.fh)
            return self.attrs(node)
        if ftype not in fmt.SPECIAL_TYPES:
            raise FsError(errno.EINVAL, f"mknod of file type {ftype:o}")
        parent, sname = self._new_name(parent_inode, name)
        if await self.resolve(parent, sname) is not None:
            raise FsError(errno.EEXIST)
        node = self.ns.add(parent, sname, Kind.FILE)
        node.remote = False  # until stored: a concurrent re-list must keep it
        node.mode = ftype | (stat.S_IMODE(mode) & ~ctx.umask)
        node.rdev = rdev if ftype in (stat.S_IFCHR, stat.S_IFBLK) else 0
        node.uid, node.gid = ctx.uid, ctx.gid
        node.size = 0
        node.mtime_ns = node.ctime_ns = node.atime_ns = time.time_ns()
        headers, ctype = headers_for(node)
        key = self.ns.key(node)
        try:
            await self.uploader.delete_first(key)
            node.etag = await self.store.put(key, b"", headers, ctype)
        except BaseException:
            self.ns.unlink(node)
            raise
        self.index.put(key, node.etag, headers)
        node.mark_stored()
        node.meta_known = True
        node.fresh_until = time.monotonic() + self.cfg.attr_ttl
        listing = self.ns.listings.get(parent.ino)
        if listing is not None:
            listing[sname] = self.ns.entry_of(node)
        self._dir_changed(parent)
        node.lookups += 1
        return self.attrs(node)

    # ===== rename =======================================================================
    @fuse_errors
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: Any,
    ) -> None:
        self._writable()
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise FsError(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        old_parent, src, _ = await self._must_resolve(parent_inode_old, name_old)
        new_parent, new_name = self._new_name(parent_inode_new, name_new, src.kind)
        dst = await self.resolve(new_parent, new_name)
        if dst is src:
            return
        if dst is not None:
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise FsError(errno.EEXIST)
            if src.kind is Kind.DIR and dst.kind is not Kind.DIR:
                raise FsError(errno.ENOTDIR)
            if src.kind is not Kind.DIR and dst.kind is Kind.DIR:
                raise FsError(errno.EISDIR)
            if dst.kind is Kind.DIR and not await self.dir_is_empty(dst):
                raise FsError(errno.ENOTEMPTY)
        # POSIX: a rename changes the moved inode's ctime. Set before the move, so that a
        # staged file's upload and a directory's new marker carry it.
        src.ctime_ns = time.time_ns()
        if src.kind is Kind.DIR:
            await self.renamer.rename_dir(src, new_parent, new_name, dst)
        else:
            await self.renamer.rename_file(src, new_parent, new_name, dst)
        self._dir_changed(old_parent, new_parent)

    def readers_follow(self, node: Node | None, copied_etag: str | None = None) -> None:
        """The mount itself moved or replaced `node`'s object: its open handles follow.

        After an upload (copied_etag None) every handle reads the version this mount
        stored (it read the staged bytes meanwhile). After a rename (copied_etag: the
        version that was copied, same bytes under a new key and maybe a new ETag) the
        handles pinned to that version follow it; others keep their pin and get EIO.
        """
        if node is None or not node.opens:
            return
        key = self.ns.key(node)
        for handle in self.handles.values():
            if handle.node is not node:
                continue
            if copied_etag is None:
                handle.version = None
            elif handle.version is not None and handle.version[0] == copied_etag:
                handle.version = (node.etag, handle.version[1])
                if handle.reader is not None:
                    handle.reader.etag = node.etag or None  # keeps the chunks it fetched
            if handle.reader is not None:
                handle.reader.key = key

    # ===== life cycle ===================================================================
    async def recover(self) -> None:
        """Take back what a crashed earlier run left staged: each file becomes part of the
        namespace again, served from its staged copy, and the write-back uploads it once
        the mount is up (`fbmount sync` waits for it).

        Nothing is uploaded before the mount answers (systemd's start timeout), a later
        write changes the same staged copy (an old record is never replayed over newer
        data), and a failed upload is retried like any other. Never fails the mount: a bug
        here is logged, not raised."""
        assert self.store.upload_notes is not None
        await guarded(
            "aborting the multipart uploads left by the last run",
            self.store.upload_notes.abort_leftovers,
            self.store.abort_multipart,
            self.store.uploads_begun,
        )
        try:
            found = self.staging.recover()
        except Exception:  # noqa: BLE001
            log.exception("reading the staging directory %s failed", self.staging.root)
            return
        if not found:
            return
        log.info("recovering %d staged file(s) from an earlier run", len(found))
        # Oldest first: a newer record of the same key supersedes an older one.
        for staged, record in sorted(found, key=lambda f: f[1].get("written", 0)):
            await guarded(f"recovering {staged.key}", self._adopt_recovered, staged, record)
        self.uploader.kick()

    async def _adopt_recovered(self, staged: Staged, record: dict) -> None:
        """Give a recovered staged file its node (and its directories' nodes)."""
        where = fmt.split_key(self.cfg.prefix, staged.key)
        if where is None or where.kind != "object" or not where.parts:
            log.error(
                "recovered %s is not a file name here; kept in %s", staged.key, self.staging.root
            )
            self.staging.entries.pop(staged.id, None)
            return
        parent = self.ns.get(self.ns.root_ino)
        assert parent is not None
        for name in where.parts[:-1]:
            child = self.ns.child(parent.ino, name)
            if child is None or child.kind is not Kind.DIR:
                child = self.ns.add(parent, name, Kind.DIR)
                child.remote = False  # not known in S3 yet: a re-list must keep it
            parent = child
        name = where.parts[-1]
        headers = record.get("headers") or {}
        older = self.ns.child(parent.ino, name)
        if older is not None and older.staged is not None:
            self.discard(older)  # an older record of the same key: superseded
        node = self.ns.add(parent, name, self.ns.kind_from_headers(headers))
        if not staged.has_data:  # metadata only: the bytes are the remote object's
            info = await self.store.head(staged.source_key or staged.key)
            if info is None:
                log.error("recovered metadata change of %s: the object is gone", staged.key)
                self.staging.discard(staged)
                self.staging.remove(staged)
                return
            node.size, node.etag = info.size, info.etag
        self.ns.apply_meta(node, headers)
        node.content_type = record.get("content_type") or node.content_type
        node.remote = True  # may exist in S3: an unlink must delete the key
        node.meta_known = True
        node.staged, staged.node = staged, node

    async def adopt_bucket_acl(self) -> None:
        """Without -o umask, objects that carry no mode show the bucket's ACL (see
        umask_from_acl)."""
        if self.cfg.umask is None:
            self.ns.set_umask(umask_from_acl(await self.store.bucket_acl()))

    # ===== misc =========================================================================
    async def statfs(self, ctx: Any) -> Any:
        return statfs_data()

    # ----- extended attributes ----------------------------------------------------------
    async def _meta_node(self, inode: int) -> Node:
        node = self._node(inode)
        if node.kind is not Kind.DIR and not node.meta_known and node.staged is None:
            await self.head_into(node)
        return node

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        sname = name.decode("utf-8", "surrogateescape")
        if not fmt.user_xattr(sname):
            # Not stored (setxattr says so too): ENOTSUP, not ENOATTR. ls -l asks for
            # security.selinux and system.posix_acl_access of every file, and on ENOTSUP
            # stops asking for the rest of this filesystem's files: two FUSE round trips
            # per entry fewer (coreutils' getfilecon_cache, file_has_acl_cache).
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        if (
            self._is_bucket_root(inode)
            and sname.startswith(XATTR_PREFIX)
            and sname[len(XATTR_PREFIX) :] in BUCKET_XATTRS
        ):
            value = await self._bucket_xattr(sname[len(XATTR_PREFIX) :])
            if value is None:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
            return value.encode()
        if sname.startswith(XATTR_PREFIX) and sname != XATTR_PREFIX + "cid":
            node = self._node(inode)
        else:
            node = await self._meta_node(inode)
        if sname.startswith(XATTR_PREFIX):
            value = self._fbmount_xattr(node, sname[len(XATTR_PREFIX) :])
            if value is None:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
            return value.encode()
        if sname in node.xattrs:
            return node.xattrs[sname]
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def _bucket_xattr(self, name: str) -> str | None:
        """Bucket ACL, CORS and versioning: not filesystem concepts, shown read-only."""
        bucket = self.store.bucket
        try:
            if name == "acl":
                return await self.store.bucket_acl()
            if name == "cors":
                r = await self.store.bucket_call("get_bucket_cors", "GetBucketCors", Bucket=bucket)
                return json.dumps(r.get("CORSRules", []))
            if name == "versioning":
                r = await self.store.bucket_call(
                    "get_bucket_versioning", "GetBucketVersioning", Bucket=bucket
                )
                return r.get("Status", "Disabled")
        except FsError:
            return None  # not configured, or not supported by the server
        return None

    def _fbmount_xattr(self, node: Node, name: str) -> str | None:
        if node.kind is Kind.DIR:
            return None
        if name == "etag":
            return node.etag or None if node.remote else None
        if name == "cid":
            return node.cid
        if name == "content_type":
            return node.content_type or fmt.guess_content_type(node.name)
        if name == "storage_class":
            return node.storage_class or ("STANDARD" if node.remote else None)
        if name == "url":
            if not node.remote:
                return None
            return self.store.presign_get(self.ns.key(node), int(self.cfg.url_expiry))
        return None

    @fuse_errors
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        """Exactly the names getxattr answers, so that `getfattr -d` prints no error."""
        node = await self._meta_node(inode)
        names = [
            n.encode("utf-8", "surrogateescape")
            for n in node.xattrs
            if fmt.user_xattr(n) and not n.startswith(XATTR_PREFIX)
        ]
        if self._is_bucket_root(inode):
            for name in BUCKET_XATTRS:
                if await self._bucket_xattr(name) is not None:
                    names.append((XATTR_PREFIX + name).encode())
        for name in ("etag", "cid", "content_type", "storage_class", "url"):
            if name == "url":  # presigning only when asked for
                shown = node.kind is not Kind.DIR and node.remote
            else:
                shown = self._fbmount_xattr(node, name) is not None
            if shown:
                names.append((XATTR_PREFIX + name).encode())
        if node.kind is Kind.LINK or stat.S_IFMT(node.mode) in fmt.SPECIAL_TYPES:
            # The kernel keeps user.* to regular files and directories (ENODATA otherwise).
            names = [n for n in names if not n.startswith(b"user.")]
        return names

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        self._writable()
        sname = name.decode("utf-8", "surrogateescape")
        if sname.startswith(XATTR_PREFIX):
            raise FsError(errno.EPERM, f"{sname} is read-only")
        if not fmt.user_xattr(sname):
            raise FsError(errno.ENOTSUP, f"{sname}: security.*, system.* and trusted.* not stored")
        if not fmt.valid_xattr_name(sname):
            raise FsError(errno.ENOTSUP, f"{sname!r}: s3fs's xattr header cannot hold this name")
        if self._is_bucket_root(inode):
            raise FsError(errno.EPERM, "the bucket root has no object to store xattrs on")
        node = await self._meta_node(inode)
        old = node.xattrs
        node.xattrs = {**old, sname: bytes(value)}  # a new mapping: nodes share the empty one
        if fmt.metadata_size(headers_for(node)[0]) > fmt.MAX_USER_METADATA_BYTES:
            node.xattrs = old  # refused: leave the node as it was
            raise FsError(errno.E2BIG, f"{sname}: object metadata would exceed 2 KiB")
        node.ctime_ns = time.time_ns()
        await self.metadata_changed(node)

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        self._writable()
        sname = name.decode("utf-8", "surrogateescape")
        if sname.startswith(XATTR_PREFIX):
            raise FsError(errno.EPERM, f"{sname} is read-only")
        if not fmt.user_xattr(sname):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        node = await self._meta_node(inode)
        if sname not in node.xattrs:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        node.xattrs = {n: v for n, v in node.xattrs.items() if n != sname}
        node.ctime_ns = time.time_ns()
        await self.metadata_changed(node)
