"""Whole-account mount: one directory per bucket, each served by its own Filesystem.

The kernel sees one inode space. Bucket slot n (never reused while mounted) owns inode and
file-handle numbers [n << SLOT_BITS, (n + 1) << SLOT_BITS), its root directory being inode
(n << SLOT_BITS) + 1; slot 0 is the account root (inode 1) and its directory handles. Each
bucket's Filesystem hands out numbers from its own range (Namespace root_ino), so a request
is routed by `number >> SLOT_BITS` and passed on unchanged: no translation tables.

A bucket's Filesystem (an S3Store view on the shared client, its staging directory, its
metadata index, its uploader task) is built on first use, not when `ls` shows the bucket,
so listing an account of a hundred buckets costs one ListBuckets.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import logging
import re
import shutil
import stat
import time
from dataclasses import dataclass
from typing import Any

import pyfuse3
import trio

from fbmount import format as fmt
from fbmount.config import DEFAULT_UMASK, PRIVATE_UMASK, Config
from fbmount.errors import FsError
from fbmount.fs import Filesystem, decode_name, fuse_errors, statfs_data, umask_from_acl
from fbmount.metaindex import MetaIndex
from fbmount.namespace import ROOT_INO
from fbmount.staging import StagingArea
from fbmount.store import S3Store
from fbmount.tasks import open_nursery

log = logging.getLogger("fbmount.account")

SLOT_BITS = 40  # 2^40 inodes per bucket; 2^24 bucket slots per mount
# Listing the top asks the ACL of buckets not yet known, but only up to this many at once
# (at Filebase's 100 requests/s, 256 is ~2.5 s); beyond, buckets show private until used.
ACL_ON_LIST_LIMIT = 256
_BUCKET_CHARS = re.compile(r"[a-z0-9][a-z0-9.-]*[a-z0-9]")


def bucket_name_problem(name: str) -> str | None:
    """Why S3 would refuse `name` as a bucket name (the rules every provider shares)."""
    if not 3 <= len(name) <= 63:
        return "a bucket name has 3 to 63 characters"
    if not _BUCKET_CHARS.fullmatch(name):
        return (
            "a bucket name has only lowercase letters, digits, dots and hyphens, "
            "and begins and ends with a letter or digit"
        )
    if ".." in name or ".-" in name or "-." in name:
        return "a bucket name has no '..', '.-' or '-.'"
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return None
    return "a bucket name cannot look like an IP address"


@dataclass(eq=False)
class Bucket:
    name: str
    slot: int
    created_ns: int
    umask: int | None = None  # from -o umask or the bucket ACL, once known
    fs: Filesystem | None = None
    loading: trio.Event | None = None
    scope: trio.CancelScope | None = None

    @property
    def root_ino(self) -> int:
        return (self.slot << SLOT_BITS) + ROOT_INO


class AccountFilesystem(pyfuse3.Operations):
    """Routes each request to the bucket's Filesystem; answers the account root itself."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, cfg: Config, store: S3Store) -> None:
        super().__init__()
        self.cfg, self.store = cfg, store
        self.by_name: dict[str, Bucket] = {}  # buckets the last ListBuckets (or mkdir) showed
        self.by_slot: dict[int, Bucket] = {}  # every bucket an inode may still point into
        self._next_slot = 1
        self._listed_until = 0.0
        self._listing = trio.Lock()
        self.dir_handles: dict[int, list[Bucket]] = {}
        self._next_fh = 0
        self.started_ns = time.time_ns()
        self.nursery: trio.Nursery | None = None  # set by the daemon before serving

    def filesystems(self) -> list[Filesystem]:
        """The buckets in use so far (what status, sync and the final flush look at)."""
        return [b.fs for b in self.by_slot.values() if b.fs is not None]

    # ===== buckets ======================================================================
    async def refresh(self, force: bool = False) -> None:
        """ListBuckets, at most once per --dir-ttl unless forced."""
        async with self._listing:
            if not force and time.monotonic() < self._listed_until:
                return
            listed = dict(await self.store.list_buckets())
            for name, created_ns in listed.items():
                if name not in self.by_name:
                    self._add(name, created_ns)
            for name in set(self.by_name) - set(listed):
                gone = self.by_name.pop(name)  # deleted elsewhere: its inodes now give ENOENT
                if gone.fs is None:
                    self.by_slot.pop(gone.slot, None)
            self._listed_until = time.monotonic() + self.cfg.dir_ttl

    def _add(self, name: str, created_ns: int) -> Bucket:
        b = Bucket(name, self._next_slot, created_ns)
        self._next_slot += 1
        self.by_name[name] = self.by_slot[b.slot] = b
        return b

    async def bucket_fs(self, number: int) -> Filesystem:
        """The Filesystem owning an inode or handle number, built on first use."""
        slot = number >> SLOT_BITS
        if slot == 0:
            raise FsError(errno.EPERM, "the account root holds buckets only")
        while True:
            b = self.by_slot.get(slot)
            if b is None:
                raise FsError(errno.ENOENT, f"inode {number}: its bucket is gone")
            if b.fs is not None:
                return b.fs
            if b.loading is not None:
                await b.loading.wait()
                continue
            b.loading = trio.Event()
            try:
                b.fs = await self._load(b)
            finally:
                b.loading.set()
                b.loading = None

    async def _load(self, b: Bucket) -> Filesystem:
        state = self.cfg.bucket_state_dir(b.name)
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        fs = Filesystem(
            dataclasses.replace(self.cfg, bucket=b.name),
            self.store.for_bucket(b.name),
            StagingArea(state / "staging"),
            MetaIndex(state / "meta.sqlite"),
            root_ino=b.root_ino,
        )
        root = fs.ns.root
        root.mtime_ns = root.ctime_ns = root.atime_ns = b.created_ns
        try:
            fs.ns.set_umask(await self._umask_of(b))
            assert self.nursery is not None
            b.scope = await self.nursery.start(_serve_bucket, fs)
            await fs.recover()
        except BaseException:
            if b.scope is not None:
                b.scope.cancel()
            fs.index.close()
            raise
        log.debug("bucket %s: slot %d", b.name, b.slot)
        return fs

    async def _umask_of(self, b: Bucket) -> int:
        if b.umask is None:
            if self.cfg.umask is not None:
                b.umask = self.cfg.umask
            else:
                b.umask = umask_from_acl(await self.store.bucket_acl(b.name))
        return b.umask

    async def _learn_umasks(self, buckets: list[Bucket]) -> None:
        """The ACLs of buckets `ls -l` is about to show, 16 at a time (once per bucket)."""
        unknown = [b for b in buckets if b.umask is None and b.fs is None]
        if not unknown or len(unknown) > ACL_ON_LIST_LIMIT:
            return
        limiter = trio.CapacityLimiter(16)

        async def learn(b: Bucket) -> None:
            async with limiter:
                await self._umask_of(b)

        async with open_nursery() as nursery:
            for b in unknown:
                nursery.start_soon(learn, b)

    async def _unload(self, b: Bucket) -> None:
        self.by_name.pop(b.name, None)
        self.by_slot.pop(b.slot, None)
        if b.fs is not None:
            if b.scope is not None:
                b.scope.cancel()
            b.fs.index.close()
            state = self.cfg.bucket_state_dir(b.name)
            await trio.to_thread.run_sync(lambda: shutil.rmtree(state, ignore_errors=True))

    def _unloaded_attrs(self, ino: int, created_ns: int, umask: int) -> pyfuse3.EntryAttributes:
        """The account root, or a bucket not used yet."""
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.entry_timeout = a.attr_timeout = self.cfg.attr_ttl
        a.st_mode = stat.S_IFDIR | (0o777 & ~umask)
        a.st_nlink = 2
        a.st_uid, a.st_gid = self.cfg.uid, self.cfg.gid
        a.st_blksize = 1 << 20
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = created_ns
        return a

    def _bucket_attrs(self, b: Bucket) -> pyfuse3.EntryAttributes:
        if b.fs is None:  # private until its ACL says more
            umask = b.umask if b.umask is not None else PRIVATE_UMASK
            return self._unloaded_attrs(b.root_ino, b.created_ns, umask)
        return b.fs.attrs(b.fs.ns.root)

    async def _create_bucket(self, name: bytes) -> pyfuse3.EntryAttributes:
        if self.cfg.read_only:
            raise FsError(errno.EROFS, "mounted read-only")
        sname = decode_name(name)
        problem = bucket_name_problem(sname)
        if problem is not None:
            raise FsError(errno.EINVAL, f"{sname!r} cannot be a bucket: {problem}")
        await self.refresh(force=True)  # AWS us-east-1 answers 200 to a bucket you own
        if sname in self.by_name:
            raise FsError(errno.EEXIST, f"bucket {sname} exists")
        params: dict[str, Any] = {"Bucket": sname}
        if self.cfg.region not in ("us-east-1", "auto", ""):
            params["CreateBucketConfiguration"] = {"LocationConstraint": self.cfg.region}
        await self.store.bucket_call("create_bucket", f"create bucket {sname}", **params)
        log.info("created bucket %s", sname)
        b = self.by_name.get(sname) or self._add(sname, time.time_ns())
        fs = await self.bucket_fs(b.root_ino)
        return fs.attrs(fs.ns.root)

    async def _remove_bucket(self, name: bytes) -> None:
        if self.cfg.read_only:
            raise FsError(errno.EROFS, "mounted read-only")
        sname = decode_name(name)
        await self.refresh()
        b = self.by_name.get(sname)
        if b is None:
            raise FsError(errno.ENOENT)
        fs = await self.bucket_fs(b.root_ino)
        await fs.uploader.flush_deletes()  # rm -rf BUCKET/* then rmdir BUCKET
        if not await fs.dir_is_empty(fs.ns.root):
            raise FsError(errno.ENOTEMPTY, f"bucket {sname} is not empty")
        # BucketNotEmpty (unfinished multipart uploads, old versions) → ENOTEMPTY too.
        await self.store.bucket_call("delete_bucket", f"delete bucket {sname}", Bucket=sname)
        log.info("deleted bucket %s", sname)
        await self._unload(b)

    # ===== the account root (slot 0) and routing ========================================
    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        if parent_inode != ROOT_INO:
            return await (await self.bucket_fs(parent_inode)).lookup(parent_inode, name, ctx)
        if name in (b".", b".."):
            return await self.getattr(ROOT_INO, ctx)
        await self.refresh()
        b = self.by_name.get(decode_name(name))
        if b is None:
            a = pyfuse3.EntryAttributes()
            a.st_ino = 0
            a.entry_timeout = self.cfg.dir_ttl
            return a
        fs = await self.bucket_fs(b.root_ino)
        return fs.attrs(fs.ns.root)

    async def forget(self, inode_list: Any) -> None:
        by_slot: dict[int, list[tuple[int, int]]] = {}
        for ino, n in inode_list:
            by_slot.setdefault(ino >> SLOT_BITS, []).append((ino, n))
        for slot, items in by_slot.items():
            b = self.by_slot.get(slot)
            if b is not None and b.fs is not None:
                await b.fs.forget(items)

    @fuse_errors
    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        if inode == ROOT_INO:
            umask = self.cfg.umask if self.cfg.umask is not None else DEFAULT_UMASK
            return self._unloaded_attrs(ROOT_INO, self.started_ns, umask)
        return await (await self.bucket_fs(inode)).getattr(inode, ctx)

    @fuse_errors
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
        if inode == ROOT_INO:
            raise FsError(errno.EPERM, "the account root is not stored anywhere")
        return await (await self.bucket_fs(inode)).setattr(inode, attr, fields, fh, ctx)

    @fuse_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode != ROOT_INO:
            return await (await self.bucket_fs(inode)).opendir(inode, ctx)
        await self.refresh()
        snapshot = sorted(self.by_name.values(), key=lambda b: b.name)
        await self._learn_umasks(snapshot)
        self._next_fh += 1
        self.dir_handles[self._next_fh] = snapshot
        return self._next_fh

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        if fh >> SLOT_BITS:
            return await (await self.bucket_fs(fh)).readdir(fh, start_id, token)
        snapshot = self.dir_handles[fh]
        for i in range(start_id, len(snapshot)):
            b = snapshot[i]
            if not pyfuse3.readdir_reply(token, b.name.encode(), self._bucket_attrs(b), i + 1):
                return

    async def releasedir(self, fh: int) -> None:
        if fh >> SLOT_BITS:
            b = self.by_slot.get(fh >> SLOT_BITS)
            if b is not None and b.fs is not None:
                await b.fs.releasedir(fh)
        else:
            self.dir_handles.pop(fh, None)

    @fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        if parent_inode == ROOT_INO:
            return await self._create_bucket(name)
        return await (await self.bucket_fs(parent_inode)).mkdir(parent_inode, name, mode, ctx)

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        if parent_inode == ROOT_INO:
            return await self._remove_bucket(name)
        return await (await self.bucket_fs(parent_inode)).rmdir(parent_inode, name, ctx)

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        if parent_inode == ROOT_INO:
            await self.refresh()
            raise FsError(errno.EISDIR if decode_name(name) in self.by_name else errno.ENOENT)
        return await (await self.bucket_fs(parent_inode)).unlink(parent_inode, name, ctx)

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
        # Buckets cannot be renamed and objects cannot move between buckets in one request:
        # EXDEV makes mv(1) copy and delete, as it does between filesystems.
        if ROOT_INO in (parent_inode_old, parent_inode_new) or (
            parent_inode_old >> SLOT_BITS != parent_inode_new >> SLOT_BITS
        ):
            raise FsError(errno.EXDEV, "rename across buckets")
        fs = await self.bucket_fs(parent_inode_old)
        return await fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx)

    @fuse_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
        return await (await self.bucket_fs(inode)).link(inode, new_parent_inode, new_name, ctx)

    @fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
        fs = await self.bucket_fs(parent_inode)  # EPERM at the root: only buckets live there
        return await fs.create(parent_inode, name, mode, flags, ctx)

    @fuse_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> Any:
        fs = await self.bucket_fs(parent_inode)
        return await fs.mknod(parent_inode, name, mode, rdev, ctx)

    @fuse_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        fs = await self.bucket_fs(parent_inode)
        return await fs.symlink(parent_inode, name, target, ctx)

    @fuse_errors
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return await (await self.bucket_fs(inode)).readlink(inode, ctx)

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        return await (await self.bucket_fs(inode)).open(inode, flags, ctx)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await (await self.bucket_fs(fh)).read(fh, off, size)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await (await self.bucket_fs(fh)).write(fh, off, buf)

    @fuse_errors
    async def flush(self, fh: int) -> None:
        return await (await self.bucket_fs(fh)).flush(fh)

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        return await (await self.bucket_fs(fh)).fsync(fh, datasync)

    @fuse_errors
    async def release(self, fh: int) -> None:
        return await (await self.bucket_fs(fh)).release(fh)

    async def statfs(self, ctx: Any) -> Any:
        return statfs_data()

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        # `ls -l` asks every entry for security.* and system.posix_acl_*: answering those
        # here keeps a listing of the account from loading every bucket.
        if inode == ROOT_INO or not fmt.user_xattr(name.decode("utf-8", "surrogateescape")):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return await (await self.bucket_fs(inode)).getxattr(inode, name, ctx)

    @fuse_errors
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        if inode == ROOT_INO:
            return []
        return await (await self.bucket_fs(inode)).listxattr(inode, ctx)

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        return await (await self.bucket_fs(inode)).setxattr(inode, name, value, ctx)

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        return await (await self.bucket_fs(inode)).removexattr(inode, name, ctx)


async def _serve_bucket(fs: Filesystem, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """A bucket's background work (uploads, streamed parts) lives in its own nursery,
    cancelled when the bucket is removed and with the mount otherwise."""
    async with open_nursery() as nursery:
        fs.nursery = nursery
        nursery.start_soon(fs.uploader.run)
        task_status.started(nursery.cancel_scope)
