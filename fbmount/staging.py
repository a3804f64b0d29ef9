"""Dirty files on local disk, with a journal that survives kill -9 and power cuts.

Every file that is written (or whose metadata changes) through the mount becomes a Staged
entry: `<id>.data` holds its bytes (absent for a metadata-only change, whose bytes are still
the remote object), and its records in the journal (journal.py, one log shared by all
entries) say what it is: target key, headers, state. A durable record is appended and the
log fdatasynced once per group commit; a file of up to INLINE_MAX bytes rides in its
record, so its data file needs no fsync of its own, and no record costs an inode. After a
crash the next mount takes every entry's newest record, rewrites inline bytes into its data
file and uploads it; a record file of an older fbmount (`<id>.json`, two checksummed slots
or plain JSON) is read too, and one that cannot be read is moved to `quarantine/` with its
data, never deleted. Files are 0600 inside a 0700 directory; their names are random, never
derived from keys, so no key can make us write outside the staging directory.

This module owns the state of a staged file. Each Staged is in exactly one State, changed
only by the plain synchronous methods below (trio is cooperative: code between two awaits
is atomic, so a transition can never be seen half done):

    new file (create)            ─▶ DIRTY
    existing object to write     ─▶ LOADING           StagingArea.new(state=LOADING)
    metadata-only change         ─▶ CLEAN ─touch()─▶ DIRTY
    CLEAN | DIRTY (metadata only) ─begin_load()─▶ LOADING   (it gets a local copy)
    LOADING   ─loaded()─▶        CLEAN, or DIRTY when a change is pending (a metadata change
                                 made before or during the download)
    LOADING   ─load_failed()─▶   DIRTY metadata-only again (if it was), else DISCARDED
    CLEAN     ─touch()─▶         DIRTY          (LOADING/UPLOADING stay, the change is noted)
    DIRTY     ─begin_upload()─▶  UPLOADING
    UPLOADING ─sending(g)─▶      UPLOADING, sending a copy of generation g (taken after begin)
    UPLOADING ─upload_done(g)─▶  CLEAN, or DIRTY if touched since the upload took generation g
    UPLOADING ─upload_failed()─▶ DIRTY
    any       ─discard()─▶       DISCARDED      (terminal: the name is gone)

Invariants:
- LOADING: the download holds `Staged.lock` from begin to end, so every other user of the
  file (a second open or truncate, an upload, an unlink, a rename) waits for it; only the
  download writes the local file, nobody reads it (readers still read the remote object),
  and a journal record written meanwhile describes the remote body (has_data false), so a
  crash can never upload a partial copy.
- Only a DIRTY file is ever picked by the write-back (uploader.WriteBack.due), and only
  when no writer has it open; UPLOADING holds `Staged.lock` for the whole upload.
- `dirty` (S3 is behind the local state) is true for DIRTY and UPLOADING, and for LOADING
  with a pending change; never for CLEAN or DISCARDED.
- DISCARDED: never uploaded, its journal record is removed by the transition itself and no
  later journal write may bring it back; the entry is dropped once no handle has it open.
- Journal records carry a sequence number: an older record never replaces a newer one.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import secrets
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from fbmount.journal import INLINE_MAX, Journal, fsync_path

log = logging.getLogger("fbmount.staging")

SPARES = 32  # empty data files kept ready for new files (keep_spares)
SLOT = 64 * 1024  # a record is at most a few KiB: key, source key, 2 KiB of S3 metadata
_SLOT_MAGIC = b"FBJ2"
_SLOT_HEAD = struct.Struct("<4sII")  # magic, payload length, crc32 of the payload


def read_journal_record(raw: bytes) -> tuple[dict, int]:
    """The newest intact record in a record file's bytes and its slot (-1: a plain JSON
    record of an older fbmount). ValueError if no slot holds one."""
    if raw[:1] == b"{":
        return json.loads(raw), -1
    best: tuple[dict, int] | None = None
    for slot in (0, 1):
        head = raw[slot * SLOT : slot * SLOT + _SLOT_HEAD.size]
        if len(head) < _SLOT_HEAD.size:
            continue
        magic, length, crc = _SLOT_HEAD.unpack(head)
        start = slot * SLOT + _SLOT_HEAD.size
        payload = raw[start : start + length]
        if magic != _SLOT_MAGIC or len(payload) != length or zlib.crc32(payload) != crc:
            continue  # torn by a crash while being rewritten: the other slot stands
        try:
            record = json.loads(payload)
            int(record["seq"])
        except (ValueError, KeyError, TypeError):
            continue
        if best is None or int(record["seq"]) > int(best[0]["seq"]):
            best = (record, slot)
    if best is None:
        raise ValueError("no intact journal record")
    return best


class State(enum.Enum):
    """Where a staged file is in its life; see the transitions at the top of the module."""

    LOADING = "loading"  # the remote object is being downloaded into the local copy
    DIRTY = "dirty"  # S3 is behind: waiting to be uploaded
    UPLOADING = "uploading"  # an upload is in flight (it holds Staged.lock)
    CLEAN = "clean"  # S3 has what is staged
    DISCARDED = "discarded"  # its name is gone: never uploaded


class InvalidTransition(RuntimeError):
    """A transition the state machine does not allow: a bug, never a user error."""


@dataclass(eq=False)
class Staged:
    """One file waiting to be uploaded (or being written). Mutated only from the trio
    thread, except journal_on_disk, record and the *_synced fields: journal writes in
    worker threads change them under the StagingArea's journal lock."""

    id: str
    key: str
    data_path: Path | None  # None: metadata-only change, body = remote `source_key`
    source_key: str | None = None
    source_etag: str | None = None
    state: State = State.DIRTY
    generation: int = 0  # bumped on every change
    writers: int = 0
    handles: int = 0
    last_change: float = field(default_factory=time.monotonic)
    fd: int = -1
    lock: trio.Lock = field(default_factory=trio.Lock)
    last_error: str | None = None
    failures: int = 0
    retry_at: float = 0.0
    in_flight_bytes: int = 0
    node: Any = None  # the namespace Node this belongs to (None during recovery)
    record: dict = field(default_factory=dict)  # last journal record (key, headers, type)
    eager: Any = None  # eager.Stream: parts already going up while the file is written
    seq_end: int = 0  # written front to back up to here; -1 once not (or not new content)
    times_set: bool = False  # utime/touch set times explicitly (a stream then needs a copy)
    pending: bool = False  # LOADING: a change is waiting for the load to finish
    upload_generation: int = -1  # UPLOADING: the generation the upload sends
    stored_generation: int = -1  # the newest generation an upload has put in S3
    journal_seq: int = 0  # sequence number of the newest journal record built
    journal_on_disk: int = 0  # ... and of the newest one in the journal (journal lock)
    journal_closed: bool = False  # removed: no journal write may add a record any more
    legacy: bool = False  # recovered from an older fbmount's `<id>.json` (deleted with it)
    inline_seq: int = 0  # the newest record with this file's bytes inline ...
    inline_version: int = -1  # ... and their data_version (journal lock)
    # What a durable record of a big file (not inline) may skip: the data file's fsync when
    # its bytes have not changed since the last one, and the directory's when the data
    # file's name is on disk already.
    data_version: int = 1  # bumped by every change of the local bytes (touch(), load)
    data_synced: int = 0  # the data_version the last data fsync covered
    data_file: int = 1  # bumped when the data file is created
    data_file_synced: int = 0  # the data_file a directory fsync covered

    # ----- what the state says --------------------------------------------------------
    @property
    def dirty(self) -> bool:
        """S3 is behind what is staged (an upload in flight has not made it yet)."""
        if self.state is State.LOADING:
            return self.pending
        return self.state in (State.DIRTY, State.UPLOADING)

    @property
    def discarded(self) -> bool:
        return self.state is State.DISCARDED

    @property
    def has_data(self) -> bool:
        """It has a local data file (complete unless LOADING; see `local`)."""
        return self.data_path is not None

    @property
    def local(self) -> bool:
        """The local data file is the file's content: reads and writes go there."""
        return self.data_path is not None and self.state is not State.LOADING

    def size(self) -> int:
        if self.fd >= 0:
            return os.fstat(self.fd).st_size
        return self.data_path.stat().st_size if self.data_path else 0

    # ----- transitions (synchronous: none of them can be interrupted halfway) ---------
    def _expect(self, *allowed: State) -> None:
        if self.state not in allowed:
            raise InvalidTransition(f"{self.key}: {self.state.name} is not one of {allowed}")

    def touch(self, data: bool = True) -> None:
        """A change of bytes (or of metadata only, data=False): CLEAN → DIRTY; LOADING
        notes it for later."""
        self.generation += 1
        if data:
            self.data_version += 1
        self.last_change = time.monotonic()
        if self.state is State.CLEAN:
            self.state = State.DIRTY
        elif self.state is State.LOADING:
            self.pending = True

    def begin_upload(self) -> int:
        """DIRTY → UPLOADING (the caller holds `lock`); returns the generation it sends."""
        self._expect(State.DIRTY)
        self.state = State.UPLOADING
        self.upload_generation = self.generation
        return self.generation

    def sending(self, generation: int) -> None:
        """UPLOADING: the upload sends a copy of `generation`, taken after begin_upload."""
        self._expect(State.UPLOADING)
        self.upload_generation = generation

    def upload_done(self) -> None:
        """UPLOADING → CLEAN, or DIRTY when it changed while the upload ran."""
        if self.state is State.DISCARDED:
            return
        self._expect(State.UPLOADING)
        self.stored_generation = self.upload_generation
        changed = self.generation != self.upload_generation
        self.state = State.DIRTY if changed else State.CLEAN

    def upload_failed(self) -> None:
        """UPLOADING → DIRTY: retried later."""
        if self.state is State.UPLOADING:
            self.state = State.DIRTY

    def loaded(self) -> None:
        """LOADING → CLEAN, or DIRTY when a change is pending: the local copy is complete."""
        if self.state is State.DISCARDED:
            return
        self._expect(State.LOADING)
        self.state = State.DIRTY if self.pending else State.CLEAN
        self.pending = False
        self.source_key = self.source_etag = None  # the body is the local file now
        self.data_version += 1  # the download's bytes

    def discard(self) -> None:
        """Any state → DISCARDED: the name is gone, nothing of it may reach S3 any more."""
        self.state = State.DISCARDED
        self.pending = False


@dataclass(eq=False)
class _Group:
    """Journal records committed together: one worker-thread call, one directory fsync."""

    items: list[tuple[Staged, dict]] = field(default_factory=list)
    outcomes: list[bool | BaseException] | None = None  # set once written
    done: trio.Event = field(default_factory=trio.Event)


class StagingArea:
    """The staging directory of one mount (one endpoint + bucket + prefix)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(root, 0o700)
        self.entries: dict[str, Staged] = {}
        # Journal writes run in worker threads; their final rename (and remove()) is
        # decided under this lock, so an older record can never land after a newer one.
        self._journal_lock = threading.Lock()
        self.journal = Journal(root)
        # Group commit (commit()): the group taking records, and whether one is writing.
        self._open_group: _Group | None = None
        self._leading = False
        # Data files made ahead by keep_spares() in a worker thread: creating an inode on
        # ext4 took 0.5 ms of each create(), on the trio thread. (id, open descriptor)
        self._spares: list[tuple[str, int]] = []
        self._spares_low = trio.Event()
        self._recovered = trio.Event()  # no spare before recover() has deleted orphans
        self._spares_closed = False

    # ----- creation ---------------------------------------------------------------------
    def new(
        self,
        key: str,
        with_data: bool = True,
        source_key: str | None = None,
        source_etag: str | None = None,
        state: State = State.DIRTY,
    ) -> Staged:
        """A new entry: DIRTY (a new file), CLEAN (about to get a metadata change) or
        LOADING (an existing object about to be downloaded into it)."""
        fd = -1
        sid = secrets.token_hex(8)
        if with_data and len(self._spares) <= SPARES // 4:
            self._spares_low.set()  # (also after a full disk left none to take)
        if with_data and self._spares:
            spare, spare_fd = self._spares.pop()
            try:
                os.rename(self.root / f"{spare}.spare", self.root / f"{spare}.data")
                sid, fd = spare, spare_fd  # a rename, no new inode
            except OSError:
                os.close(spare_fd)  # gone somehow: a fresh file below
        data_path = self.root / f"{sid}.data" if with_data else None
        staged = Staged(
            sid, key, data_path, source_key=source_key, source_etag=source_etag, state=state
        )
        if data_path is not None:
            staged.fd = fd if fd >= 0 else _create_file(data_path)
        self.entries[sid] = staged
        return staged

    async def keep_spares(self) -> None:
        """Forever (a background task, started with the write-back): keep up to SPARES
        empty files (`<id>.spare`) ready for new(), which renames one to `<id>.data`. A
        spare is no entry's; recover() and drop_spares() delete leftovers."""
        await self._recovered.wait()  # recover() first: it deletes what it does not know
        try:
            while not self._spares_closed:
                want = SPARES - len(self._spares)
                if want > 0:
                    made = await trio.to_thread.run_sync(self._make_spares, want)
                    self._spares.extend(made)
                    if self._spares_closed:  # made while drop_spares() ran
                        return
                self._spares_low = trio.Event()
                await self._spares_low.wait()
        finally:  # cancelled with its bucket (an account mount unloads it), or closed
            self.drop_spares()

    def _make_spares(self, count: int) -> list[tuple[str, int]]:
        made = []
        for _ in range(count):
            sid = secrets.token_hex(8)
            try:
                made.append((sid, _create_file(self.root / f"{sid}.spare")))
            except OSError:
                break  # a full disk: new() makes its own file, and fails there if it must
        return made

    def drop_spares(self) -> None:
        """At exit: no spare is made or left any more."""
        self._spares_closed = True
        while self._spares:
            sid, fd = self._spares.pop()
            os.close(fd)
            (self.root / f"{sid}.spare").unlink(missing_ok=True)

    def begin_load(self, staged: Staged) -> None:
        """CLEAN/DIRTY metadata-only → LOADING: give it an empty local data file to fill.

        `source_key`/`source_etag` stay until loaded(): until then the remote object is
        still the body that a journal record (and a recovery) must name."""
        staged._expect(State.CLEAN, State.DIRTY)
        if staged.data_path is not None:
            raise InvalidTransition(f"{staged.key}: already has local data")
        staged.pending = staged.state is State.DIRTY
        staged.state = State.LOADING
        staged.data_path = self.root / f"{staged.id}.data"
        staged.fd = os.open(staged.data_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        staged.data_file += 1
        staged.data_version += 1

    def load_failed(self, staged: Staged) -> bool:
        """LOADING → back to the metadata-only change it was (DIRTY), else DISCARDED and
        removed. The partial copy is deleted either way. Returns True if the entry is gone."""
        if staged.state is not State.LOADING:
            return False
        if staged.pending:  # a metadata change waits: it still applies to the remote body
            self.close_fd(staged)
            if staged.data_path is not None:
                staged.data_path.unlink(missing_ok=True)
            staged.data_path = None
            staged.state = State.DIRTY
            staged.pending = False
            return False
        staged.discard()
        self.remove(staged)
        return True

    def open_fd(self, staged: Staged) -> int:
        if staged.fd < 0 and staged.data_path is not None:
            staged.fd = os.open(staged.data_path, os.O_RDWR)
        return staged.fd

    def close_fd(self, staged: Staged) -> None:
        if staged.fd >= 0:
            os.close(staged.fd)
            staged.fd = -1

    # ----- journal ----------------------------------------------------------------------
    def journal_record(self, staged: Staged, headers: dict[str, str], content_type: str) -> dict:
        """The record describing `staged` now, numbered: built in the trio thread, so a later
        record always describes a later state."""
        staged.journal_seq += 1
        return {
            "version": 1,
            "seq": staged.journal_seq,
            "key": staged.key,
            "headers": headers,
            "content_type": content_type,
            # LOADING: the local copy is partial, the body is still the remote object.
            "has_data": staged.local,
            "source_key": staged.source_key,
            "source_etag": staged.source_etag,
            "written": time.time(),
            # Which bytes and which data file this record vouches for (see Staged).
            "data_version": staged.data_version,
            "data_file": staged.data_file,
        }

    def write_journal(self, staged: Staged, record: dict, durable: bool) -> bool:
        """Append `record` to the journal; durable=True also makes it, and the data bytes it
        describes, durable (fsyncs already done are skipped: see Staged). Safe to run in
        several worker threads at once: a record older than the newest appended, or of an
        entry removed meanwhile, is skipped. Returns whether it was appended."""
        (outcome,) = self._write_group([(staged, record)], durable)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def commit(self, staged: Staged, record: dict) -> bool:
        """write_journal(durable=True) in a group commit: records handed in while one
        group is being written go together in the next, one worker-thread call and one
        directory fsync for all. Returns (or raises) only once this record's group is on
        disk, so close()'s "durable on local disk" holds when it returns. Not cancellable
        (like the worker-thread call it replaces): a caller must know whether its record
        is on disk."""
        with trio.CancelScope(shield=True):
            return await self._commit(staged, record)

    async def _commit(self, staged: Staged, record: dict) -> bool:
        group = self._open_group
        if group is None:
            group = self._open_group = _Group()
        index = len(group.items)
        group.items.append((staged, record))
        while group.outcomes is None:
            if self._leading:
                await group.done.wait()  # committed, or its leader left: look again
                continue
            self._leading = True
            try:
                while group.outcomes is None:  # lead until our own group is on disk
                    current, self._open_group = self._open_group, None
                    assert current is not None
                    try:
                        current.outcomes = await trio.to_thread.run_sync(
                            self._write_group, current.items, True
                        )
                    except BaseException as e:  # noqa: BLE001 - each waiter gets it
                        current.outcomes = [e] * len(current.items)
                        raise
                    finally:
                        current.done.set()
            finally:
                self._leading = False
                left = self._open_group
                if left is not None:  # its waiters take the lead
                    woken, left.done = left.done, trio.Event()
                    woken.set()
        outcome = group.outcomes[index]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _write_group(
        self, items: list[tuple[Staged, dict]], durable: bool
    ) -> list[bool | BaseException]:
        """Append the records in one write (a small file's bytes inline) and, when durable,
        fdatasync the journal once for all: that also covers a newer record of one of them
        appended before without a sync, which carries its change."""
        outcomes: list[bool | BaseException] = [False] * len(items)
        ready: list[tuple[int, Staged, dict, bytes | None]] = []
        dir_sync: list[tuple[Staged, int]] = []  # big files whose data file's name is new
        for i, (staged, record) in enumerate(items):
            try:
                data, name_pending = self._record_data(staged, record, durable)
            except FileNotFoundError:
                continue  # removed meanwhile (uploaded and retired, or discarded)
            except Exception as e:  # noqa: BLE001 - this record's caller gets it
                outcomes[i] = e
                continue
            if name_pending:
                dir_sync.append((staged, record["data_file"]))
            ready.append((i, staged, record, data))
        if dir_sync:  # a big file's data file must keep its name after a power cut
            try:
                fsync_path(self.root)
            except OSError as e:
                return [e] * len(items)
            with self._journal_lock:
                for staged, data_file in dir_sync:
                    staged.data_file_synced = max(staged.data_file_synced, data_file)
        sync_fd = -1
        with self._journal_lock:
            appending = [
                (i, staged, record, data)
                for i, staged, record, data in ready
                if not staged.journal_closed and record["seq"] > staged.journal_on_disk
            ]
            payloads = self._payloads(appending)
            try:
                self.journal.append(payloads)
            except OSError as e:
                for i, *_ in appending:
                    outcomes[i] = e
                appending, payloads = [], []
            for (i, staged, record, _), (_, payload, _) in zip(appending, payloads, strict=True):
                staged.journal_on_disk, staged.record = record["seq"], record
                if payload["inline"]:
                    staged.inline_seq, staged.inline_version = record["seq"], record["data_version"]
                outcomes[i] = True
            if durable:
                try:
                    self.journal.rotate_if_full()
                    sync_fd = self.journal.sync_handle()
                except OSError as e:
                    return [e] * len(items)
        if sync_fd >= 0:
            try:
                os.fdatasync(sync_fd)
            except OSError as e:
                return [e] * len(items)
            finally:
                os.close(sync_fd)
        return outcomes

    def _payloads(
        self, appending: list[tuple[int, Staged, dict, bytes | None]]
    ) -> list[tuple[str, dict, bytes | None]]:
        """What goes into the journal (the lock is held): a small file's bytes inline, unless
        a record of the journal (or earlier in this batch) holds these very bytes (same
        data_version): then a reference to it. rsync's utime, chmod and rename of a file
        it just closed carried the same bytes three more times (1.6 → 0.96 s for 300)."""
        payloads: list[tuple[str, dict, bytes | None]] = []
        # Per entry, the inline record earlier in this batch (seq, data_version), or None
        # after a record without bytes: the journal drops what came before such a record.
        in_batch: dict[int, tuple[int, int] | None] = {}
        for _, staged, record, data in appending:
            payload = {**record, "id": staged.id, "inline": data is not None}
            key = id(staged)
            if data is None:
                in_batch[key] = None
            else:
                if key in in_batch:
                    held = in_batch[key]
                elif self.journal.holds_data(staged.id, staged.inline_seq):
                    held = (staged.inline_seq, staged.inline_version)
                else:
                    held = None
                if held is not None and held[1] == record["data_version"]:
                    payload.update(inline=False, data_seq=held[0])
                    data = None
                else:
                    in_batch[key] = (record["seq"], record["data_version"])
            payloads.append((staged.id, payload, data))
        return payloads

    def _record_data(
        self, staged: Staged, record: dict, durable: bool
    ) -> tuple[bytes | None, bool]:
        """The bytes a record carries inline (a file of up to INLINE_MAX), or None: then a
        durable record has the data file synced here, and the bool says its name still
        waits for a directory fsync. FileNotFoundError: the entry was removed meanwhile."""
        if not record["has_data"] or staged.data_path is None:
            return None, False
        fd = os.open(staged.data_path, os.O_RDONLY)  # its own: the shared one may be closed
        try:
            data = os.pread(fd, INLINE_MAX + 1, 0)
            if len(data) <= INLINE_MAX:
                return data, False
            if durable and staged.data_synced < record["data_version"]:
                os.fsync(fd)
                with self._journal_lock:
                    staged.data_synced = max(staged.data_synced, record["data_version"])
        finally:
            os.close(fd)
        return None, durable and staged.data_file_synced < record["data_file"]

    def discard(self, staged: Staged) -> None:
        """Any state → DISCARDED (its name is gone: unlinked or renamed over), and its
        journal record goes at once, even while handles keep the local copy open: after a
        crash a removed file must not come back. No later journal write may add one."""
        staged.discard()
        with self._journal_lock:
            staged.journal_closed = True
            self._drop_records(staged)

    def drop_record(self, staged: Staged) -> None:
        """Drop the journal record of an entry that stays (clean but still open): a
        journal write already under way, built before now, must not bring it back."""
        with self._journal_lock:
            staged.journal_on_disk = max(staged.journal_on_disk, staged.journal_seq)
            self._drop_records(staged)

    def _drop_records(self, staged: Staged) -> None:
        """A tombstone newer than every record built so far (the journal lock is held)."""
        self.journal.tombstone(staged.id, max(staged.journal_seq, staged.journal_on_disk))
        if staged.legacy:
            (self.root / f"{staged.id}.json").unlink(missing_ok=True)
            staged.legacy = False

    def remove(self, staged: Staged) -> None:
        """Forget an entry: its upload is done or it was discarded."""
        with self._journal_lock:
            staged.journal_closed = True
            self._drop_records(staged)
        self.close_fd(staged)
        if staged.data_path is not None:
            staged.data_path.unlink(missing_ok=True)
        self.entries.pop(staged.id, None)

    def remove_settled(self) -> None:
        """At exit, once FUSE is closed: forget the entries that are in S3 or discarded.
        An upload that ends before the kernel's RELEASE of its file arrives keeps the
        local copy for the open handle (`drop_record`); no handle is left now."""
        for staged in list(self.entries.values()):
            if staged.state in (State.CLEAN, State.DISCARDED):
                self.remove(staged)
        self.drop_spares()
        with self._journal_lock:
            self.journal.close()

    def quarantine(self, sid: str, why: str) -> None:
        """Move an entry's files aside (never delete what may be someone's only copy) and
        say where in the log."""
        qdir = self.root / "quarantine"
        qdir.mkdir(exist_ok=True, mode=0o700)
        moved = []
        for suffix in (".json", ".data"):
            src = self.root / f"{sid}{suffix}"
            if src.exists():
                os.replace(src, qdir / src.name)
                moved.append(src.name)
        log.error("%s: %s; moved %s to %s, not uploaded", sid, why, ", ".join(moved), qdir)

    def recover(self) -> list[tuple[Staged, dict]]:
        """Entries left by an earlier run of this mount (crash or failed uploads): the
        journal's, and record files of an older fbmount (`<id>.json`)."""
        try:
            return self._recover()
        finally:
            self._recovered.set()

    def _recover(self) -> list[tuple[Staged, dict]]:
        for tmp in [*self.root.glob("*.tmp"), *self.root.glob("*.spare")]:
            tmp.unlink(missing_ok=True)  # upload snapshots, spares, an older fbmount's temps
        newest: dict[str, tuple[dict, bytes | None, bool]] = {}  # id -> record, data, legacy
        quarantined = set()
        for path in sorted(self.root.glob("*.json")):
            try:
                record, _ = read_journal_record(path.read_bytes())
                int(record.get("seq", 0))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                self.quarantine(path.stem, f"unreadable journal record ({e})")
                quarantined.add(path.stem)
                continue
            newest[path.stem] = (record, None, True)
        for sid, (record, data) in self.journal.recover().items():
            legacy = newest.get(sid)
            if legacy is None or int(record["seq"]) >= int(legacy[0].get("seq", 0)):
                newest[sid] = (record, data, legacy is not None)
        found = []
        for sid, (record, data, legacy) in sorted(newest.items()):
            data_path = self.root / f"{sid}.data"
            if record.get("data_seq") and data is None:  # its bytes' record is lost
                self.quarantine(sid, "the journal record holding its bytes is unreadable")
                quarantined.add(sid)
                continue
            try:
                if data is not None:
                    data_path.write_bytes(data)  # the journal's copy is the file's content
                    os.chmod(data_path, 0o600)
                elif record.get("has_data") and not data_path.exists():
                    log.error("staged %s has lost its data file; skipping", record.get("key"))
                    continue
                seq = int(record.get("seq", 0))
                staged = Staged(
                    sid,
                    record["key"],
                    data_path if record.get("has_data") else None,
                    source_key=record.get("source_key"),
                    source_etag=record.get("source_etag"),
                    state=State.DIRTY,
                    generation=1,
                    record=record,
                    journal_seq=seq,
                    journal_on_disk=seq,
                    legacy=legacy,
                )
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                self.quarantine(sid, f"unreadable journal record ({e})")
                quarantined.add(sid)
                continue
            self.entries[sid] = staged
            found.append((staged, record))
        for orphan in self.root.glob("*.data"):
            if orphan.stem not in self.entries and orphan.stem not in quarantined:
                orphan.unlink(missing_ok=True)  # never closed/journaled: nothing acknowledged
        return found

    def usage_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob("*.data")) + self.journal.size()


def _create_file(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
