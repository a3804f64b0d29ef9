"""The inode table: nodes, names, keys, lookup counts and the listing cache.

Everything here is synchronous on purpose: trio only switches tasks at `await`, so each
method runs atomically and the table's invariants (every (parent, name) pair maps to one
live node; a node's key is derived from its parent chain) can never be seen half-updated.
S3 is consulted by fs.py, which feeds the answers in through `add_listing_page` and friends.

Rules for keys (the README "Semantics" section repeats them):
- directory D ↔ prefix "D/"; file F ↔ object "F"; the mount's PREFIX is prepended.
- a key segment that cannot be a file name (empty, ".", "..", longer than 1,024 bytes,
  or containing NUL) is skipped, never followed.
- a FILE node may be a FIFO, socket or device: its type is in `mode` (s3fs's mknod), its
  object is empty, and the kernel, not fbmount, does what opening it means.
- a key that is both an object and a prefix ("a" and "a/b") shows as the directory; the
  object is hidden (it is still in the bucket, untouched).
"""

from __future__ import annotations

import enum
import functools
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import cachetools

from fbmount import format as fmt
from fbmount.staging import Staged
from fbmount.store import ListPage

ROOT_INO = 1
# Default mode: a name missing from a small directory's listing is absent for a moment (here
# and in the kernel's cache); after it, the next miss re-lists the directory: one LIST for
# every name in it, not a HEAD per name. So a file another client just stored is found by name
# within a quarter of a second, and rsync's stat of each new name costs at most four LISTs
# per directory and second. A listing of n entries is trusted for n ms if that is longer:
# re-listing then parses at most about a thousand entries a second per directory.
MISS_TRUSTED_FOR = 0.25
RELIST_ENTRIES_PER_SECOND = 1000


def miss_trusted_for(entries: int) -> float:
    """How long a listing of this many entries answers "no such name" without asking S3."""
    return max(MISS_TRUSTED_FOR, entries / RELIST_ENTRIES_PER_SECOND)


class Kind(enum.Enum):
    FILE = "file"
    DIR = "dir"
    LINK = "link"


@dataclass(slots=True)
class Entry:
    """One name in a cached directory listing."""

    kind: Kind
    size: int = 0
    etag: str = ""
    mtime_ns: int = 0
    storage_class: str | None = None


# What most nodes carry as xattrs and other tools' metadata: nothing. One shared read-only
# mapping instead of two empty dicts per node (100,000 listed files: 12 MiB). Nodes never
# change these mappings in place, they get new ones (a change in place raises TypeError).
NOTHING: Mapping[str, bytes] = MappingProxyType({})
NO_EXTRA: Mapping[str, str] = MappingProxyType({})


# slots: a node is kept for every name the kernel knows; without them each one also carries
# its own attribute dictionary.
@dataclass(eq=False, slots=True)
class Node:
    ino: int
    parent: int
    name: str
    kind: Kind
    mode: int
    uid: int
    gid: int
    size: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    atime_ns: int = 0
    etag: str = ""
    remote: bool = True  # the key exists in S3 right now
    meta_known: bool = False  # x-amz-meta-* is known (HEAD, index, or written by us)
    # A listed regular file whose x-amz-meta-* is fetched when its attributes are asked
    # for (fs.Filesystem.getattr); until then the kernel may not cache them.
    meta_pending: bool = False
    fresh_until: float = 0.0
    lookups: int = 0
    opens: int = 0
    linked: bool = True  # still has a name (False after unlink/replace)
    staged: Staged | None = None
    link_target: str | None = None
    rdev: int = 0  # st_rdev of a character or block device
    # replaced, never changed in place (dataclass refuses an unhashable default)
    xattrs: Mapping[str, bytes] = field(default_factory=lambda: NOTHING)
    cid: str | None = None
    # x-amz-meta-* keys of other tools (rclone's btime, md5chksum ...): written back as read
    meta_extra: Mapping[str, str] = field(default_factory=lambda: NO_EXTRA)  # replaced too
    content_type: str | None = None
    storage_class: str | None = None
    cached_etag: str | None = None  # ETag whose bytes the kernel page cache may hold
    index_etag: str | None = None  # ETag for which the metadata index was last consulted
    # time.monotonic() when this mount last wrote the key: a LIST or HEAD sent before may
    # be answered without it (or with the old object), and must not override it.
    stored_at: float = 0.0

    def mark_stored(self) -> None:
        """This mount just wrote the key (PUT, completed upload, copy)."""
        self.remote = True
        self.stored_at = time.monotonic()


def headers_for(node: Node, name: str | None = None) -> tuple[dict[str, str], str]:
    """x-amz-meta-* and Content-Type that an upload of `node` (named `name`) must carry.

    Here, beside the node, so that every layer that uploads (fs, write-back, streams)
    describes a file the same way without asking the filesystem above."""
    meta = fmt.ObjectMeta(
        mode=node.mode,
        uid=node.uid,
        gid=node.gid,
        mtime_ns=node.mtime_ns,
        ctime_ns=node.ctime_ns,
        atime_ns=node.atime_ns,
        xattrs=dict(node.xattrs),
        rdev=node.rdev if stat.S_IFMT(node.mode) in (stat.S_IFCHR, stat.S_IFBLK) else None,
        cid=node.cid,
        extra=dict(node.meta_extra),
    )
    if node.staged is not None and node.staged.has_data:
        # Other tools' checksums described the old bytes: gone for good (a later
        # metadata-only update must not bring them back).
        meta = meta.for_new_content()
        node.meta_extra = meta.extra
    headers = fmt.encode_meta(meta)
    if node.kind is Kind.DIR:
        return headers, fmt.DIR_CONTENT_TYPE
    if node.kind is Kind.LINK:
        return headers, fmt.LINK_CONTENT_TYPE
    ctype = node.content_type
    if ctype is None or (
        name is not None and fmt.content_type_base(ctype) == fmt.guess_content_type(node.name)
    ):
        # A type that came from the name follows a new name (as s3fs sets it on a
        # rename); one another tool chose is kept.
        ctype = fmt.guess_content_type(name or node.name)
    return headers, ctype


@functools.cache
def default_mode(kind: Kind, umask: int) -> int:
    """The mode of an object that carries none. Cached: one int object shared by all the
    nodes of a kind, not one each (an int above 256 is an object of 32 bytes)."""
    if kind is Kind.DIR:
        return stat.S_IFDIR | (0o777 & ~umask)
    if kind is Kind.LINK:
        return stat.S_IFLNK | 0o777
    return stat.S_IFREG | (0o666 & ~umask)


class Namespace:
    def __init__(
        self,
        prefix: str,
        uid: int,
        gid: int,
        umask: int,
        attr_ttl: float,
        dir_ttl: float,
        max_listings: int = 4096,
        root_ino: int = ROOT_INO,
    ) -> None:
        self.prefix = prefix
        # An account mount gives each bucket's namespace its own inode range (account.py).
        self.root_ino = root_ino
        self.uid, self.gid, self.umask = uid, gid, umask
        self.attr_ttl, self.dir_ttl = attr_ttl, dir_ttl
        self.started_ns = time.time_ns()
        self.nodes: dict[int, Node] = {}
        # parent ino → name → ino: no (parent, name) tuple per node, and a directory's
        # children are found without walking every node of the mount.
        self.children: dict[int, dict[str, int]] = {}
        self.listings: cachetools.TTLCache[int, dict[str, Entry]] = cachetools.TTLCache(
            max_listings, dir_ttl, timer=time.monotonic
        )
        self.negative: cachetools.TTLCache[tuple[int, str], bool] = cachetools.TTLCache(
            65536, min(dir_ttl, MISS_TRUSTED_FOR), timer=time.monotonic
        )
        self._next_ino = root_ino + 1
        root = Node(
            root_ino,
            root_ino,
            "",
            Kind.DIR,
            self.default_mode(Kind.DIR),
            uid,
            gid,
            mtime_ns=self.started_ns,
            ctime_ns=self.started_ns,
            atime_ns=self.started_ns,
        )
        root.lookups = 1
        root.fresh_until = float("inf")
        self.nodes[root_ino] = root

    # ----- keys -------------------------------------------------------------------------
    def path(self, node: Node) -> str:
        names = []
        while node.ino != self.root_ino:
            names.append(node.name)
            node = self.nodes[node.parent]
        return "/".join(reversed(names))

    def key(self, node: Node) -> str:
        """Object key of a file/symlink, or the prefix (with '/') of a directory."""
        p = self.path(node)
        if node.kind is Kind.DIR:
            return self.prefix + p + "/" if p else self.prefix
        return self.prefix + p

    def child_key(self, parent: Node, name: str, kind: Kind) -> str:
        base = self.key(parent) + name
        return base + "/" if kind is Kind.DIR else base

    # ----- nodes ------------------------------------------------------------------------
    @property
    def root(self) -> Node:
        return self.nodes[self.root_ino]

    def set_umask(self, umask: int) -> None:
        """Change the mode of objects that carry none (decided once the bucket ACL is known)."""
        self.umask = umask
        self.root.mode = self.default_mode(Kind.DIR)

    def default_mode(self, kind: Kind) -> int:
        return default_mode(kind, self.umask)

    def get(self, ino: int) -> Node | None:
        return self.nodes.get(ino)

    def child(self, parent: int, name: str) -> Node | None:
        ino = self.children.get(parent, {}).get(name)
        return self.nodes[ino] if ino is not None else None

    def child_names(self, parent: Node) -> list[str]:
        """The names of a directory's known children (a copy: safe to unlink while walking)."""
        return list(self.children.get(parent.ino, ()))

    def add(self, parent: Node, name: str, kind: Kind) -> Node:
        """The node for parent/name, created if new; a kind change makes a new node."""
        node = self.child(parent.ino, name)
        if node is not None and node.kind is kind:
            return node
        if node is not None:
            self.unlink(node)
        now = time.time_ns()
        node = Node(
            self._next_ino,
            parent.ino,
            name,
            kind,
            self.default_mode(kind),
            self.uid,
            self.gid,
            mtime_ns=now,
            ctime_ns=now,
            atime_ns=now,
        )
        if kind is Kind.DIR:
            node.mtime_ns = node.ctime_ns = node.atime_ns = self.started_ns
        self._next_ino += 1
        self.nodes[node.ino] = node
        self._link(parent.ino, name, node.ino)
        if self.negative:  # a TTLCache lookup costs ~2 µs: 0.2 s for 100,000 listed names
            self.negative.pop((parent.ino, name), None)
        return node

    def unlink(self, node: Node) -> None:
        """Remove node's name; the node lives on while the kernel or a handle holds it."""
        self._unlink_name(node)
        listing = self.listings.get(node.parent)
        if listing is not None:
            listing.pop(node.name, None)
        node.linked = False
        self._maybe_drop(node)

    def move(self, node: Node, new_parent: Node, new_name: str) -> None:
        old_listing = self.listings.get(node.parent)
        entry = old_listing.pop(node.name, None) if old_listing is not None else None
        self._unlink_name(node)
        target = self.child(new_parent.ino, new_name)
        if target is not None and target is not node:
            self.unlink(target)
        node.parent, node.name = new_parent.ino, new_name
        self._link(new_parent.ino, new_name, node.ino)
        self.negative.pop((new_parent.ino, new_name), None)
        new_listing = self.listings.get(new_parent.ino)
        if new_listing is not None:
            new_listing[new_name] = entry or self.entry_of(node)

    def forget(self, ino: int, n: int) -> None:
        node = self.nodes.get(ino)
        if node is None or ino == self.root_ino:
            return
        node.lookups = max(0, node.lookups - n)
        self._maybe_drop(node)

    def _maybe_drop(self, node: Node) -> None:
        if node.lookups or node.opens or node.ino == self.root_ino:
            return
        if node.linked and (node.staged is not None or self.has_children(node)):
            return
        if node.linked:
            self._unlink_name(node)
        self.nodes.pop(node.ino, None)

    def _link(self, parent: int, name: str, ino: int) -> None:
        self.children.setdefault(parent, {})[name] = ino

    def _unlink_name(self, node: Node) -> None:
        names = self.children.get(node.parent)
        if names is not None and names.get(node.name) == node.ino:
            del names[node.name]
            if not names:
                del self.children[node.parent]

    def has_children(self, node: Node) -> bool:
        return node.ino in self.children  # an emptied directory's dict is dropped

    def descendants(self, node: Node) -> list[Node]:
        """Known nodes below a directory (for renames of staged files)."""
        out, stack = [], [node.ino]
        while stack:
            for ino in self.children.get(stack.pop(), {}).values():
                out.append(self.nodes[ino])
                stack.append(ino)
        return out

    # ----- attributes from S3 -----------------------------------------------------------
    def entry_of(self, node: Node) -> Entry:
        return Entry(node.kind, node.size, node.etag, node.mtime_ns, node.storage_class)

    def apply_meta(self, node: Node, headers: dict[str, str] | None) -> None:
        """Fold x-amz-meta-* (s3fs/rclone format) into a node; None = unknown."""
        if headers is None:
            return
        meta = fmt.decode_meta(headers)
        if node.kind is Kind.FILE:
            # The header decides between a regular file and a FIFO, socket or device.
            if meta.mode is not None:
                node.mode = fmt.resolve_mode(meta.mode, "file", self.umask)
            elif stat.S_IFMT(node.mode) in fmt.SPECIAL_TYPES:
                node.mode = self.default_mode(Kind.FILE)
            devices = (stat.S_IFCHR, stat.S_IFBLK)
            node.rdev = (meta.rdev or 0) if stat.S_IFMT(node.mode) in devices else 0
        elif meta.mode is not None and stat.S_IFMT(meta.mode) in (0, stat.S_IFMT(node.mode)):
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(meta.mode)
        if meta.uid is not None:
            node.uid = meta.uid
        if meta.gid is not None:
            node.gid = meta.gid
        if meta.mtime_ns is not None:
            node.mtime_ns = meta.mtime_ns
        node.ctime_ns = meta.ctime_ns if meta.ctime_ns is not None else node.mtime_ns
        node.atime_ns = meta.atime_ns if meta.atime_ns is not None else node.mtime_ns
        node.xattrs = dict(meta.xattrs) if meta.xattrs else NOTHING
        node.cid = meta.cid
        node.meta_extra = dict(meta.extra) if meta.extra else NO_EXTRA
        node.meta_known = True
        node.meta_pending = False

    def kind_from_headers(self, headers: dict[str, str] | None) -> Kind:
        if headers:
            meta = fmt.decode_meta(headers)
            if meta.mode is not None and stat.S_ISLNK(meta.mode):
                return Kind.LINK
        return Kind.FILE

    def apply_entry(self, node: Node, entry: Entry) -> None:
        """Attributes LIST gives (size, ETag, Last-Modified) for a node we do not stage."""
        if node.staged is not None:
            return
        if node.kind is not Kind.DIR:
            if entry.etag != node.etag:
                node.meta_known = False
            node.size, node.etag = entry.size, entry.etag
            node.storage_class = entry.storage_class
            if not node.meta_known:
                node.mtime_ns = node.ctime_ns = node.atime_ns = entry.mtime_ns
        node.remote = True
        node.fresh_until = time.monotonic() + self.attr_ttl

    def add_listing_page(
        self, entries: dict[str, Entry], parent: Node, dir_key: str, page: ListPage
    ) -> None:
        """Add one page of a delimiter listing of directory `parent` (key `dir_key`) to
        name → Entry, by the key rules above. Pages come in key order, and "a" sorts before
        "a/": a prefix replaces a file of its name from an earlier page as it does one from
        its own page."""
        known = self.children.get(parent.ino, {})
        for p in page.prefixes:
            name = p[len(dir_key) :].rstrip("/")
            if "/" not in name and fmt.valid_name(name):
                entries[name] = Entry(Kind.DIR)
        for o in page.objects:
            name = o.key[len(dir_key) :]
            if not name or name.endswith("/"):
                continue  # the directory's own marker ("dir/"), or a "a//" oddity
            legacy = fmt.legacy_folder_name(name)
            if legacy is not None:
                if fmt.valid_name(legacy):
                    entries.setdefault(legacy, Entry(Kind.DIR))
                continue
            if not fmt.valid_name(name) or name in entries:
                continue  # a file hidden by a same-named prefix: the directory wins
            etag, mtime_ns, ino = o.etag, o.mtime_ns, known.get(name)
            if ino is not None:
                # Listed again: share the node's objects rather than hold a second copy of
                # each (a relisted 100,000-entry directory: 16 MiB).
                node = self.nodes[ino]
                name = node.name
                if node.etag == etag:
                    etag = node.etag
                if node.mtime_ns == mtime_ns:
                    mtime_ns = node.mtime_ns
            entries[name] = Entry(Kind.FILE, o.size, etag, mtime_ns, o.storage_class)
