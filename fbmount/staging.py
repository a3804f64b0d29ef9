"""Dirty files on local disk, with a journal that survives kill -9 and power cuts.

Every file that is written (or whose metadata changes) through the mount becomes a Staged
entry: `<id>.data` holds its bytes (absent for a metadata-only change, whose bytes are still
the remote object) and `<id>.json` the journal record: target key, headers, state. The
journal is replaced atomically (write temp, fsync, rename, fsync dir), so after a crash the
next mount finds every entry whose close() returned and uploads it. Files are 0600 inside
a 0700 directory; their names are random, never derived from keys, so no key can make us
write outside the staging directory.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

log = logging.getLogger("fbmount.staging")


@dataclass(eq=False)
class Staged:
    """One file waiting to be uploaded (or being written). Mutated only from the trio thread."""

    id: str
    key: str
    data_path: Path | None  # None: metadata-only change, body = remote `source_key`
    source_key: str | None = None
    source_etag: str | None = None
    generation: int = 0  # bumped on every change
    uploaded_generation: int = -1  # generation that is in S3 (-1: none yet)
    writers: int = 0
    handles: int = 0
    last_change: float = field(default_factory=time.monotonic)
    fd: int = -1
    discarded: bool = False  # unlinked: never upload
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
    # Journal writes of one entry run in worker threads too (close() of several handles at
    # once): they take turns, and an older record never replaces a newer one.
    journal_lock: threading.Lock = field(default_factory=threading.Lock)
    filling: trio.Event | None = None  # set once the remote bytes are all downloaded

    @property
    def dirty(self) -> bool:
        return self.generation != self.uploaded_generation and not self.discarded

    @property
    def has_data(self) -> bool:
        return self.data_path is not None

    def touch(self) -> None:
        self.generation += 1
        self.last_change = time.monotonic()

    def size(self) -> int:
        if self.fd >= 0:
            return os.fstat(self.fd).st_size
        return self.data_path.stat().st_size if self.data_path else 0


class StagingArea:
    """The staging directory of one mount (one endpoint + bucket + prefix)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(root, 0o700)
        self.entries: dict[str, Staged] = {}
        self._journal_seq = itertools.count(1)  # orders the records made by this process

    # ----- creation ---------------------------------------------------------------------
    def new(
        self,
        key: str,
        with_data: bool = True,
        source_key: str | None = None,
        source_etag: str | None = None,
    ) -> Staged:
        sid = secrets.token_hex(8)
        data_path = self.root / f"{sid}.data" if with_data else None
        staged = Staged(sid, key, data_path, source_key=source_key, source_etag=source_etag)
        if data_path is not None:
            staged.fd = os.open(data_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self.entries[sid] = staged
        return staged

    def add_data(self, staged: Staged) -> None:
        """Turn a metadata-only entry into one with a local data file (empty)."""
        staged.data_path = self.root / f"{staged.id}.data"
        staged.fd = os.open(staged.data_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        staged.source_key = staged.source_etag = None

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
        return {
            "version": 1,
            "key": staged.key,
            "headers": headers,
            "content_type": content_type,
            "has_data": staged.has_data,
            "source_key": staged.source_key,
            "source_etag": staged.source_etag,
            "written": time.time(),
            "seq": next(self._journal_seq),
        }

    def write_journal(self, staged: Staged, record: dict, durable: bool) -> None:
        """Atomically replace the journal record; durable=True also fsyncs data and dir.
        Concurrent calls for one entry take turns; each writes the newest record made."""
        with staged.journal_lock:
            if record.get("seq", 0) >= staged.record.get("seq", 0):
                staged.record = record
            record = staged.record
            path = self.root / f"{staged.id}.json"
            tmp = self.root / f"{staged.id}.json.tmp"
            if durable and staged.fd >= 0:
                os.fsync(staged.fd)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, json.dumps(record).encode())
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            if durable:
                dfd = os.open(self.root, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)

    def remove(self, staged: Staged) -> None:
        """Forget an entry: its upload is done or it was discarded."""
        self.close_fd(staged)
        for suffix in (".json", ".json.tmp", ".data"):
            try:
                (self.root / f"{staged.id}{suffix}").unlink()
            except FileNotFoundError:
                pass
        self.entries.pop(staged.id, None)

    def recover(self) -> list[tuple[Staged, dict]]:
        """Entries left by an earlier run of this mount (crash or failed uploads)."""
        found = []
        for path in sorted(self.root.glob("*.json")):
            try:
                record = json.loads(path.read_text())
                record.pop("seq", None)  # another process's order: older than any new one
                sid = path.stem
                data_path = self.root / f"{sid}.data"
                if record.get("has_data") and not data_path.exists():
                    log.error("staged %s has lost its data file; skipping", record.get("key"))
                    continue
                staged = Staged(
                    sid,
                    record["key"],
                    data_path if record.get("has_data") else None,
                    source_key=record.get("source_key"),
                    source_etag=record.get("source_etag"),
                    generation=1,
                    uploaded_generation=0,
                    record=record,
                )
            except (OSError, ValueError, KeyError) as e:
                log.error("unreadable journal record %s: %s", path.name, e)
                continue
            self.entries[sid] = staged
            found.append((staged, record))
        for orphan in self.root.glob("*.data"):
            if orphan.stem not in self.entries:
                orphan.unlink(missing_ok=True)  # never closed/journaled: nothing acknowledged
        return found

    def usage_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob("*.data"))
