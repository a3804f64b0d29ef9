"""Races of the write-back state machine, each forced on purpose (issue #15).

trio is cooperative, so a race in fbmount is two operations interleaved at an `await`.
These tests make the interleaving happen instead of hoping for it: the fault proxy holds
one request (a ranged GET of a download, say) until the test releases it, and meanwhile the
test does the other operation. Every outcome is checked in S3 with boto3 and through the
mount; waits are on conditions with bounds, never on the clock alone.

The journal (staging.py) is pure enough to be tested without FUSE: those tests are at the end.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import Mount, MountFactory
from faultproxy import FaultProxy, RequestInfo
from helpers import body, exists, journal_records, read_file, sync_path, wait_for

from fbmount.journal import INLINE_MAX, record_bytes
from fbmount.reader import CHUNK
from fbmount.staging import SPARES, Staged, StagingArea, State

MIB = 1 << 20
HANG_BOUND = 60.0  # a syscall still blocked after this long is a hang
UPLOADS = {"PutObject", "CreateMultipartUpload", "UploadPart", "CopyObject", "UploadPartCopy"}


# --------------------------------------------------------------------------- helpers
def data_of(n: int, seed: str) -> bytes:
    """Deterministic, never-zero-filled bytes (a zero-filled hole or shift would show)."""
    return random.Random(seed).randbytes(n)


class Worker:
    """A blocking syscall sequence in a thread; join() fails the test if it hangs."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread
            self.error = e

    def join(self, timeout: float = HANG_BOUND) -> Any:
        self._thread.join(timeout)
        if self._thread.is_alive():
            pytest.fail(f"still blocked after {timeout:.0f} s: a hang")
        return self.error if self.error is not None else self.result


def range_from(start: int) -> Callable[[RequestInfo], bool]:
    """Select the ranged GET whose range starts at `start` (one chunk of a download)."""
    return lambda info: (info.header("Range") or "").startswith(f"bytes={start}-")


def uploads_of(proxy: FaultProxy, key: str) -> list[str]:
    """Upload requests (PUT, multipart, copy) that reached the proxy for `key`."""
    return [r.kind for r in proxy.records if r.kind in UPLOADS and r.path.endswith("/" + key)]


def staging_dir(m: Mount) -> Path:
    (state,) = [p for p in m.cache_dir.iterdir() if p.is_dir()]
    return state / "staging"


def let_uploader_scan(m: Mount, s3: Any, bucket: str, name: str) -> None:
    """Write a small file and wait until it is in S3: the write-back has then scanned its
    queue after everything staged before it was old enough to be due. Done twice, so an
    upload started by the first scan has certainly sent its first request."""
    for i in range(2):
        (m.path / f"{name}{i}").write_bytes(b"x")
        wait_for(lambda i=i: exists(s3, bucket, f"{name}{i}"), f"{name}{i} in S3")


def append(path: Path, data: bytes) -> None:
    """`echo data >> path`: O_WRONLY|O_APPEND|O_CREAT, one write, close."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def pwrite(path: Path, data: bytes, offset: int) -> None:
    """Open O_RDWR (no truncation), write at `offset`, close."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def dd_slices_at_once(path: Path, tmp_path: Path, tag: str, want: bytearray) -> None:
    """Ten `dd conv=notrunc` at once, each writing its own 400 KiB slice of `path`; all
    must succeed. `want` is updated with what they wrote."""
    n, block = 10, 400 * 1024
    sources = []
    for i in range(n):
        src = tmp_path / f"slice-{tag}-{i}"
        src.write_bytes(data_of(block, f"{tag}-{i}"))
        sources.append(src)
        want[i * block : (i + 1) * block] = src.read_bytes()

    def dd(src: Path, i: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["dd", f"if={src}", f"of={path}", f"bs={block}", f"seek={i}", "count=1",
             "conv=notrunc", "status=none"],
            capture_output=True, text=True, timeout=HANG_BOUND,
        )  # fmt: skip

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(dd, sources, range(n)))
    failed = [(r.returncode, r.stderr) for r in results if r.returncode]
    assert not failed, f"{tag}: {failed}"


# --------------------------------------------------------------------------- race 1
@pytest.mark.parametrize("first", ["append", "truncate"])
def test_open_for_write_during_download(
    s3: Any, bucket: str, mount: MountFactory, s3_endpoint: str, first: str
) -> None:
    """Race 1: a remote file opened for writing is downloaded into staging first. While a
    GET of that download is held: nothing of the file is uploaded (S3 keeps the original,
    the reported symptom was a 152 MiB object left of a 600 MiB log), and a second writer
    waits for the download, so download bytes never overwrite its write."""
    original = data_of(CHUNK + MIB, "big")
    s3.put_object(Bucket=bucket, Key="big.log", Body=original)
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--endpoint", proxy.endpoint, "--upload-delay", "0.2")
        path = m.path / "big.log"
        held = proxy.add_rule("GetObject", "hold", key="/big.log", where=range_from(CHUNK), times=1)
        if first == "append":
            want = original + b"line\n"
            opener = Worker(lambda: append(path, b"line\n"))
        else:
            want = original + bytes(100)
            opener = Worker(lambda: os.truncate(path, len(original) + 100))
        assert held.wait_held(30), "the download's second GET never came"
        let_uploader_scan(m, s3, bucket, "marker")
        assert uploads_of(proxy, "big.log") == [], "a partial download was uploaded"
        assert body(s3, bucket, "big.log") == original

        patch, at = b"MIDDLE", CHUNK + 10  # inside the range still held
        second = Worker(lambda: pwrite(path, patch, at))
        want = want[:at] + patch + want[at + len(patch) :]
        let_uploader_scan(m, s3, bucket, "again")  # the second writer is in fbmount by now
        assert uploads_of(proxy, "big.log") == [], "a partial download was uploaded"
        assert body(s3, bucket, "big.log") == original

        held.release()
        assert opener.join() is None
        assert second.join() is None
        assert read_file(path) == want
        sync_path(path)
        assert body(s3, bucket, "big.log") == want
        assert "Traceback" not in m.log_text(), m.log_text()
        assert m.unmount() == 0
    assert body(s3, bucket, "big.log") == want


@pytest.mark.parametrize("status", [412, 500])
def test_failed_download_leaves_the_object_untouched(
    s3: Any, bucket: str, mount: MountFactory, s3_endpoint: str, status: int
) -> None:
    """Race 1, failing: the download's GET is held (the upload delay passes meanwhile), then
    answered with an error. The writer gets EIO, S3 keeps the original object, nothing is
    left staged, and the same append works once the server answers again."""
    original = data_of(CHUNK + MIB, "fail")
    s3.put_object(Bucket=bucket, Key="big.log", Body=original)
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--endpoint", proxy.endpoint, "--upload-delay", "0.2", "-o", "retries=1")
        path = m.path / "big.log"
        held = proxy.add_rule("GetObject", "hold", key="/big.log", where=range_from(CHUNK))
        failing = proxy.add_rule(
            "GetObject", "status", key="/big.log", where=range_from(CHUNK), status=status
        )
        opener = Worker(lambda: append(path, b"line\n"))
        assert held.wait_held(30), "the download's second GET never came"
        let_uploader_scan(m, s3, bucket, "marker")
        assert uploads_of(proxy, "big.log") == []
        held.release()
        result = opener.join()
        assert isinstance(result, OSError) and result.errno == errno.EIO, result
        assert body(s3, bucket, "big.log") == original
        assert wait_for(lambda: not list(staging_dir(m).glob("*.data")), "the partial copy to go")
        proxy.remove_rule(failing)
        proxy.remove_rule(held)
        append(path, b"line\n")
        sync_path(path)
        assert body(s3, bucket, "big.log") == original + b"line\n"
        assert m.unmount() == 0


def test_ten_writers_open_a_remote_file_at_once(
    s3: Any, bucket: str, mount: MountFactory, tmp_path: Path
) -> None:
    """Race 1 with ten openers: ten `dd conv=notrunc` of an object that is only in S3 at
    once. The first open downloads it; the nine others wait for that download instead of
    writing into a copy that is still being filled (their slices were overwritten by
    download bytes). After each round is uploaded the staged copy is retired, so every
    round downloads again."""
    want = bytearray(data_of(4 * MIB, "remote"))
    s3.put_object(Bucket=bucket, Key="shared.bin", Body=bytes(want))
    m = mount(bucket, "--upload-delay", "0.2")
    path = m.path / "shared.bin"
    for rnd in range(3):
        dd_slices_at_once(path, tmp_path, f"round{rnd}", want)
        assert read_file(path) == want, f"round {rnd}"
        sync_path(path)
        assert body(s3, bucket, "shared.bin") == want, f"round {rnd}"
        wait_for(lambda: not list(staging_dir(m).glob("*.data")), "the staged copy to retire")
    assert "Traceback" not in m.log_text(), m.log_text()
    assert m.unmount() == 0


# --------------------------------------------------------------------------- race 3
def test_create_over_an_object_the_kernel_believes_absent(
    s3: Any, bucket: str, mount: MountFactory
) -> None:
    """Race 3: the mount has cached "no such name" (kernel and fbmount), then another client
    creates the object. open(O_CREAT|O_WRONLY) without O_TRUNC reaches fbmount as create():
    it must open the object that is there (not truncate or replace it), so writing one byte
    at offset 0 keeps the rest of it."""
    m = mount(bucket, "--upload-delay", "0")
    path = m.path / "late.bin"
    assert not path.exists()  # negative lookup cached, a listing of the root too
    original = data_of(MIB + 7, "late")
    s3.put_object(Bucket=bucket, Key="late.bin", Body=original)

    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.pwrite(fd, b"X", 0)
    finally:
        os.close(fd)
    want = b"X" + original[1:]
    assert body(s3, bucket, "late.bin") == want
    assert read_file(path) == want
    # `echo >> name` (O_CREAT|O_APPEND) on such a name appends instead of replacing.
    (m.path / "late.log").exists()
    s3.put_object(Bucket=bucket, Key="late.log", Body=b"first\n")
    append(m.path / "late.log", b"second\n")
    assert body(s3, bucket, "late.log") == b"first\nsecond\n"
    assert m.unmount() == 0


# --------------------------------------------------------------------------- race 4
@pytest.mark.parametrize("how", ["unlink", "rename-over"])
def test_file_removed_while_open_does_not_come_back_after_kill9(
    s3: Any, bucket: str, mount: MountFactory, how: str
) -> None:
    """Race 4: a staged file, journaled at close, is opened again and, while that fd is
    held, unlinked (or another file is renamed over it). Its journal record must go at that
    moment: after kill -9 and a remount it must not come back, in S3 or on the mount."""
    m = mount(bucket, "--upload-delay", "60")  # nothing is uploaded before the crash
    victim = m.path / "victim.txt"
    victim.write_bytes(b"removed while open\n")
    records = wait_for(lambda: journal_records(staging_dir(m)), "the journal record")
    assert len(records) == 1
    if how == "rename-over":
        (m.path / "other.txt").write_bytes(b"renamed over it\n")
    fd = os.open(victim, os.O_RDONLY)
    try:
        if how == "unlink":
            os.unlink(victim)
        else:
            os.rename(m.path / "other.txt", victim)
        assert os.pread(fd, 100, 0) == b"removed while open\n"  # still readable: POSIX
        m.kill9()
    finally:
        try:
            os.close(fd)
        except OSError:
            pass  # the daemon is dead: ENOTCONN
    assert not exists(s3, bucket, "victim.txt")

    m2 = mount(bucket, "--upload-delay", "60", cache_dir=m.cache_dir, mountpoint=m.path)
    m2.sync()  # recovery: what was journaled is served and uploaded in the background
    if how == "unlink":
        assert not exists(s3, bucket, "victim.txt")
        assert not (m2.path / "victim.txt").exists()
    else:
        assert body(s3, bucket, "victim.txt") == b"renamed over it\n"
        assert (m2.path / "victim.txt").read_bytes() == b"renamed over it\n"
        assert not exists(s3, bucket, "other.txt")
    assert not journal_records(staging_dir(m2))
    assert m2.unmount() == 0


# --------------------------------------------------------------------------- race 10
def test_ten_dd_notrunc_writers_of_one_staged_file(
    s3: Any, bucket: str, mount: MountFactory, tmp_path: Path
) -> None:
    """Race 10: ten `dd conv=notrunc` of one staged 4 MiB file at once, three rounds. Each
    close() journals the file durably at about the same moment as the others; they used to
    share one temp name, and three of ten failed in close() with ENOENT. All succeed now,
    the file holds every slice, and exactly one record is left, with no temp files."""
    m = mount(bucket, "--upload-delay", "30")  # the file stays staged the whole time
    path = m.path / "shared.bin"
    want = bytearray(data_of(4 * MIB, "shared"))
    path.write_bytes(want)
    for rnd in range(3):
        dd_slices_at_once(path, tmp_path, f"round{rnd}", want)
        assert read_file(path) == want, f"round {rnd}"
    assert len(journal_records(staging_dir(m))) == 1
    assert not list(staging_dir(m).glob("*.tmp"))
    sync_path(path)
    assert body(s3, bucket, "shared.bin") == want
    assert "Traceback" not in m.log_text(), m.log_text()
    assert m.unmount() == 0


# --------------------------------------------------------------------------- the journal, no FUSE
def staged_file(area: StagingArea, key: str = "k", data: bytes = b"data") -> Staged:
    staged = area.new(key)
    os.pwrite(staged.fd, data, 0)
    return staged


def overwrite(path: Path, data: bytes, offset: int = 0) -> None:
    """What a crash in the middle of an append leaves, or a damaged disk."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def record_of(area: StagingArea, staged: Staged) -> dict:
    return journal_records(area.root)[staged.id]


def test_journal_concurrent_writes_keep_the_newest(tmp_path: Path) -> None:
    """Many durable journal writes of one file at once, from threads (as close() runs them):
    none fails, the newest record wins whatever order they finish in, no temp is left."""
    area = StagingArea(tmp_path / "staging")
    staged = staged_file(area)
    records = [area.journal_record(staged, {"n": str(i)}, "text/plain") for i in range(20)]
    with ThreadPoolExecutor(10) as pool:
        list(pool.map(lambda r: area.write_journal(staged, r, True), reversed(records)))
    assert record_of(area, staged)["seq"] == records[-1]["seq"]
    assert record_of(area, staged)["headers"] == {"n": "19"}
    assert staged.record is not None and staged.record["seq"] == records[-1]["seq"]
    assert sorted(p.name for p in area.root.iterdir()) == [f"{staged.id}.data", "journal-1.log"]


def test_journal_older_record_never_replaces_a_newer_one(tmp_path: Path) -> None:
    area = StagingArea(tmp_path / "staging")
    staged = staged_file(area)
    older = area.journal_record(staged, {"v": "old"}, "text/plain")
    newer = area.journal_record(staged, {"v": "new"}, "text/plain")
    assert newer["seq"] > older["seq"]
    assert area.write_journal(staged, newer, durable=False)
    assert not area.write_journal(staged, older, durable=True)  # finished last: skipped
    assert record_of(area, staged)["headers"] == {"v": "new"}
    assert not list(area.root.glob("*.tmp"))


def test_journal_write_after_remove_does_not_resurrect(tmp_path: Path) -> None:
    """A journal write still running when the entry is removed (uploaded and retired, or
    unlinked) must not create its record again: after a crash it would come back."""
    area = StagingArea(tmp_path / "staging")
    staged = staged_file(area)
    record = area.journal_record(staged, {}, "text/plain")
    area.remove(staged)
    assert not area.write_journal(staged, record, durable=False)
    assert list(area.root.iterdir()) == []
    # A clean but still open entry: its record is dropped, older writes cannot put it back.
    kept = staged_file(area)
    late = area.journal_record(kept, {}, "text/plain")
    area.drop_record(kept)
    assert not area.write_journal(kept, late, durable=False)
    assert kept.id not in journal_records(area.root)
    newer = area.journal_record(kept, {}, "text/plain")  # changed again afterwards: kept
    assert area.write_journal(kept, newer, durable=False)


def test_discard_drops_the_record_while_the_copy_stays_open(tmp_path: Path) -> None:
    """Race 4 without FUSE: an unlinked (or renamed-over) file still open keeps its local
    copy for its readers, but its journal record goes at once and stays gone."""
    area = StagingArea(tmp_path / "staging")
    staged = staged_file(area)
    assert area.write_journal(staged, area.journal_record(staged, {}, "text/plain"), True)
    late = area.journal_record(staged, {}, "text/plain")  # a close() journaling meanwhile
    area.discard(staged)
    assert staged.state is State.DISCARDED and not staged.dirty
    assert not area.write_journal(staged, late, durable=True)
    assert sorted(p.name for p in area.root.iterdir()) == [f"{staged.id}.data", "journal-1.log"]
    assert journal_records(area.root) == {}
    assert os.pread(staged.fd, 10, 0) == b"data"


def test_journal_appends_and_a_torn_tail_leaves_the_records_before(tmp_path: Path) -> None:
    """Records are appended to one log, a small file's bytes inline: after a crash the next
    mount rewrites them into its data file. A crash in the middle of an append (a torn
    tail) recovers the records before it, never nothing; damage in the middle of a
    segment is reported and a copy kept; a record file of an older fbmount (plain JSON) is
    read, and a newer journal record of the same entry wins over it."""
    root = tmp_path / "staging"
    area = StagingArea(root)
    staged = staged_file(area, "f.txt", b"bytes")
    for n in range(4):
        assert area.write_journal(staged, area.journal_record(staged, {"n": str(n)}, "t"), True)
        assert record_of(area, staged)["headers"] == {"n": str(n)}
    log_path = root / "journal-1.log"
    records = journal_records(root)
    # The bytes went in with the first record; the later ones (same bytes) refer to it.
    assert list(records) == [staged.id] and records[staged.id]["data_seq"] == 1

    # A crash while record 4 was being appended: half of it written.
    raw = log_path.read_bytes()
    end = len(raw.rstrip(b"\0"))
    torn = area.journal_record(staged, {"n": "4"}, "t")
    whole = record_bytes({**torn, "id": staged.id, "inline": True}, b"bytes")
    overwrite(log_path, whole[: len(whole) // 2], end)  # zeros follow: the segment's fill
    area.close_fd(staged)
    staged.data_path.write_bytes(b"lost")  # the data file was not synced: the log has it
    after = StagingArea(root)
    ((found, record),) = after.recover()
    assert record["headers"] == {"n": "3"} and torn["seq"] > record["seq"]
    assert found.data_path.read_bytes() == b"bytes"
    assert not (root / "quarantine").exists()  # a torn tail is no damage

    # Damage before the last record: what follows it is not read; a copy is kept.
    overwrite(log_path, b"\xff", 40)
    assert StagingArea(root).recover() == []
    assert list((root / "quarantine").glob("journal-1-*.log"))

    # An older fbmount's record: plain JSON, read as is; a newer journal record wins.
    old = staged_file(area, "old.txt", b"old")
    legacy = area.journal_record(old, {"v": "1"}, "t")
    (root / f"{old.id}.json").write_text(json.dumps(legacy))
    area.close_fd(old)
    later = StagingArea(root)
    ((recovered, record),) = later.recover()
    assert record["headers"] == {"v": "1"} and recovered.legacy
    assert later.write_journal(recovered, later.journal_record(recovered, {"v": "2"}, "t"), True)
    ((_, record),) = StagingArea(root).recover()
    assert record["headers"] == {"v": "2"}
    later.remove(recovered)
    assert not (root / f"{old.id}.json").exists()


def test_a_durable_record_overtaken_by_an_unsynced_one_syncs_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() (durable) queued behind a truncate's record (not synced, newer): close()'s
    record is skipped as older, and the journal is synced before close() is told its
    change is on disk: the newer record carries it."""
    area = StagingArea(tmp_path / "staging")
    staged = staged_file(area)
    assert area.write_journal(staged, area.journal_record(staged, {"n": "1"}, "t"), True)
    closing = area.journal_record(staged, {"n": "2"}, "t")
    truncating = area.journal_record(staged, {"n": "3"}, "t")
    synced: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd)))
    assert area.write_journal(staged, truncating, durable=False)
    assert synced == []
    assert not area.write_journal(staged, closing, durable=True)  # older: skipped ...
    assert len(synced) == 1  # ... but the journal holding the newer record is synced
    assert record_of(area, staged)["headers"] == {"n": "3"}


def test_durable_records_skip_the_syncs_already_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small file rides in its record: no fsync of its data file or of the directory,
    ever. A big one (rsync's close, utime and rename are three durable records) syncs its
    data and the directory once, then only when its bytes changed or after a crash."""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        synced.append("dir" if os.path.isdir(path) else Path(path).suffix)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    root = tmp_path / "staging"
    area = StagingArea(root)
    warm_up = staged_file(area, "warm-up")  # the journal's first segment is made and synced
    assert area.write_journal(warm_up, area.journal_record(warm_up, {}, "t"), True)
    small = staged_file(area, "small", b"tiny")
    big = staged_file(area, "big", b"b" * (INLINE_MAX + 1))

    def durable_record(staged: Staged, data_changed: bool) -> list[str]:
        synced.clear()
        staged.touch(data=data_changed)
        assert area.write_journal(staged, area.journal_record(staged, {}, "t"), durable=True)
        return sorted(synced)

    assert durable_record(small, True) == []  # inline: one fdatasync of the journal
    assert durable_record(big, True) == [".data", "dir"]  # close: its bytes and its name
    assert durable_record(big, False) == []  # utime
    assert durable_record(big, False) == []  # rename
    os.pwrite(big.fd, b"more", 4)
    assert durable_record(big, True) == [".data"]  # written again: its bytes first
    area.close_fd(big)
    area.close_fd(small)
    after = StagingArea(root)
    recovered = {s.key: s for s, _ in after.recover()}
    assert recovered["small"].data_path.read_bytes() == b"tiny"
    synced.clear()
    big2 = recovered["big"]
    assert after.write_journal(big2, after.journal_record(big2, {}, "t"), True)
    # After a crash nothing is assumed: the data and the directory are synced again (and
    # the first record after a recovery starts a new segment: its file and name).
    assert sorted(synced) == [".data", ".log", "dir", "dir"]


def test_the_journal_cleans_old_segments_and_keeps_the_live_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Segments fill and new ones begin; an old segment whose records are all superseded
    or dropped is deleted, and live records of a mostly dead one are copied forward first.
    Every entry still staged is recovered with its newest record after all that."""
    import fbmount.journal as journal_module

    monkeypatch.setattr(journal_module, "SEGMENT_MAX", 64 * 1024)
    root = tmp_path / "staging"
    area = StagingArea(root)
    keep = staged_file(area, "keep", b"k" * 1000)
    assert area.write_journal(keep, area.journal_record(keep, {"v": "keep"}, "t"), True)
    for n in range(300):  # files written, closed and uploaded, as rsync's would be
        staged = staged_file(area, f"f{n}", b"x" * 2000)
        assert area.write_journal(staged, area.journal_record(staged, {}, "t"), True)
        area.remove(staged)
    segments = sorted(root.glob("journal-*.log"))
    assert 1 <= len(segments) <= 3, segments  # 600 KiB appended, segments of 64 KiB
    assert "journal-1.log" not in [p.name for p in segments]
    assert list(journal_records(root)) == [keep.id]
    area.close_fd(keep)
    ((found, record),) = StagingArea(root).recover()
    assert found.id == keep.id and record["headers"] == {"v": "keep"}
    assert found.data_path.read_bytes() == b"k" * 1000


def test_recovery_syncs_what_it_read_before_it_deletes_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A killed process's last records may be only in the page cache. Recovery acts on
    them (an older segment whose records they supersede is deleted), so it syncs every
    segment it reads first: a power cut after that cannot lose both."""
    import fbmount.journal as journal_module

    monkeypatch.setattr(journal_module, "SEGMENT_MAX", 64 * 1024)
    root = tmp_path / "staging"
    area = StagingArea(root)
    big, small = staged_file(area, "big", b"b" * 40_000), staged_file(area, "small")

    def record(staged: Staged) -> None:
        staged.touch()  # changed bytes: each record carries them
        assert area.write_journal(staged, area.journal_record(staged, {}, "t"), True)

    record(big)  # most of segment 1 is live: kept when segment 2 begins
    while len(list(root.glob("journal-*.log"))) < 2:
        record(small)
    record(big)  # newer records in segment 2 ...
    record(small)  # ... and nothing in segment 1 is live any more
    assert len(list(root.glob("journal-*.log"))) == 2
    for staged in (big, small):
        area.close_fd(staged)
    events: list[str] = []
    real_sync, real_unlink = os.fdatasync, Path.unlink
    monkeypatch.setattr(
        os,
        "fdatasync",
        lambda fd: (events.append("sync " + os.readlink(f"/proc/self/fd/{fd}")), real_sync(fd)),
    )
    monkeypatch.setattr(
        Path, "unlink", lambda p, **k: (events.append(f"unlink {p}"), real_unlink(p, **k))
    )
    segments = sorted(str(p) for p in root.glob("journal-*.log"))
    assert sorted(s.key for s, _ in StagingArea(root).recover()) == ["big", "small"]
    assert not (root / "journal-1.log").exists()  # recovery deleted it
    synced = [e.split(" ", 1)[1] for e in events if e.startswith("sync")]
    first_unlink = next((i for i, e in enumerate(events) if e.startswith("unlink")), len(events))
    assert set(segments) <= set(synced)
    assert all(events.index(f"sync {p}") < first_unlink for p in segments), events


def test_a_failed_append_still_gets_its_tombstone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk cut an append short after its records were written whole: the close
    failed, but the record is on disk. When the file is then deleted, its tombstone is
    written all the same, so a later mount does not bring the file back."""
    root = tmp_path / "staging"
    area = StagingArea(root)
    other = staged_file(area, "other")
    assert area.write_journal(other, area.journal_record(other, {}, "t"), True)
    victim = staged_file(area, "victim")
    real = os.pwrite
    journal_fd = area.journal._fd

    def short(fd: int, data: bytes, offset: int) -> int:
        written = real(fd, data, offset)
        return written - 1 if fd == journal_fd else written

    monkeypatch.setattr(os, "pwrite", short)
    with pytest.raises(OSError):
        area.write_journal(victim, area.journal_record(victim, {}, "t"), True)
    monkeypatch.setattr(os, "pwrite", real)
    area.discard(victim)
    area.remove(victim)
    area.close_fd(other)
    assert [s.key for s, _ in StagingArea(root).recover()] == ["other"]


def test_a_nearly_full_disk_still_takes_records_and_tombstones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No room for a zero-filled segment: a plain one is used, grown by its appends."""
    import fbmount.journal as journal_module

    real = os.pwrite

    def no_room_for_fill(fd: int, data: bytes, offset: int) -> int:
        if len(data) == journal_module.SEGMENT_MAX:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", no_room_for_fill)
    root = tmp_path / "staging"
    area = StagingArea(root)
    kept, gone = staged_file(area, "kept"), staged_file(area, "gone")
    for staged in (kept, gone):
        assert area.write_journal(staged, area.journal_record(staged, {}, "t"), True)
    area.remove(gone)
    area.close_fd(kept)
    assert (root / "journal-1.log").stat().st_size < 4096
    assert [s.key for s, _ in StagingArea(root).recover()] == ["kept"]


def test_records_of_entries_set_aside_outlive_a_clean_exit(tmp_path: Path) -> None:
    """A recovered entry the mount cannot place (its key is no file name here) is left
    out of the entries but kept: the exit that finds nothing else staged keeps its
    journal record, and the next mount finds it again."""
    root = tmp_path / "staging"
    area = StagingArea(root)
    odd = staged_file(area, "dir/", b"kept")
    assert area.write_journal(odd, area.journal_record(odd, {}, "t"), True)
    area.close_fd(odd)
    after = StagingArea(root)
    ((found, _),) = after.recover()
    after.entries.pop(found.id)  # what fs._adopt_recovered does with such a key
    after.remove_settled()
    ((again, _),) = StagingArea(root).recover()
    assert again.data_path.read_bytes() == b"kept"


def test_spares_are_made_after_recovery_and_gone_when_their_task_ends(tmp_path: Path) -> None:
    """Empty files are made ahead for new files, only once recovery has deleted what it
    did not know; new() renames one into place; cancelling the task (an account mount
    unloading a bucket) deletes the rest."""
    import trio

    root = tmp_path / "staging"
    area = StagingArea(root)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(area.keep_spares)
            await trio.sleep(0.2)
            assert not list(root.glob("*.spare"))  # not before recover()
            area.recover()
            while len(list(root.glob("*.spare"))) < SPARES:
                await trio.sleep(0.01)
            staged = area.new("k")
            assert staged.data_path.exists() and len(list(root.glob("*.spare"))) == SPARES - 1
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert not list(root.glob("*.spare"))


def test_records_with_the_same_bytes_refer_to_the_one_that_carries_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rsync closes a file, then sets its times and mode and renames it: four durable
    records of the same bytes. Only the first carries them; the others refer to it, and
    that record is kept (copied forward, never cleaned) while they do. New bytes go inline
    again. After a crash every entry gets the bytes of its newest record."""
    import fbmount.journal as journal_module

    monkeypatch.setattr(journal_module, "SEGMENT_MAX", 64 * 1024)
    root = tmp_path / "staging"
    area = StagingArea(root)
    kept = staged_file(area, "kept", b"k" * 20_000)

    def durable(staged: Staged, headers: dict) -> dict:
        assert area.write_journal(staged, area.journal_record(staged, headers, "t"), True)
        return journal_records(root)[staged.id]

    assert durable(kept, {"step": "close"})["inline"]
    for step in ("utime", "chmod", "rename"):
        record = durable(kept, {"step": step})
        assert not record["inline"] and record["data_seq"] == 1
    size = area.journal.size()  # bytes of records, not the zero fill
    for n in range(300):  # other files come and go: segments fill, rotate and are cleaned
        other = staged_file(area, f"o{n}", b"o" * 3000)
        durable(other, {})
        area.remove(other)
    assert "journal-1.log" not in [p.name for p in root.glob("journal-*.log")]
    assert journal_records(root)[kept.id]["data_seq"] == 1
    changed = staged_file(area, "changed", b"old")
    durable(changed, {})
    os.pwrite(changed.fd, b"new", 0)
    changed.touch()
    assert durable(changed, {})["inline"]  # new bytes: carried again
    for staged in (kept, changed):
        area.close_fd(staged)
        staged.data_path.write_bytes(b"lost")  # not synced: the journal has the bytes
    found = {s.key: (s, r) for s, r in StagingArea(root).recover()}
    assert sorted(found) == ["changed", "kept"]
    assert found["kept"][1]["headers"] == {"step": "rename"}
    assert found["kept"][0].data_path.read_bytes() == b"k" * 20_000
    assert found["changed"][0].data_path.read_bytes() == b"new"
    assert size < 30_000  # the first record's 20 KB, not four times that


def test_a_record_without_bytes_in_a_batch_ends_what_later_ones_may_refer_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three records of one file in one group commit, the middle one read while the file
    was over the inline limit (no bytes): the journal drops the first one's bytes at the
    middle one, so the third must carry its own, never refer back. A reference to a record
    the journal does not keep is refused before anything is written."""
    import fbmount.journal as journal_module

    root = tmp_path / "staging"
    area = StagingArea(root)
    staged = staged_file(area, "f", b"small")
    records = [area.journal_record(staged, {"n": str(n)}, "t") for n in range(3)]
    real = area._record_data
    calls = iter([False, True, False])

    def record_data(s: Staged, record: dict, durable: bool) -> tuple:
        return (None, False) if next(calls) else real(s, record, durable)

    monkeypatch.setattr(area, "_record_data", record_data)
    assert area._write_group([(staged, r) for r in records], True) == [True, True, True]
    newest = journal_records(root)[staged.id]
    assert newest["headers"] == {"n": "2"} and newest["inline"]
    area.close_fd(staged)
    ((found, _),) = StagingArea(root).recover()
    assert found.data_path.read_bytes() == b"small"

    with pytest.raises(ValueError, match="not kept"):
        area.journal.append([(staged.id, {"id": staged.id, "seq": 99, "data_seq": 1}, None)])
    assert journal_module.read_records((root / "journal-1.log").read_bytes())[0][-1][2]["seq"] == 3


def test_recover_quarantines_unreadable_records(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After a crash: a readable record is recovered (its sequence continues), a `.data`
    whose record is unreadable is moved aside and reported, never deleted; a `.data` with
    no record at all (never closed) and leftover temp files are cleaned up."""
    root = tmp_path / "staging"
    area = StagingArea(root)
    good = staged_file(area, "good.txt", b"good")
    area.write_journal(good, area.journal_record(good, {}, "text/plain"), durable=True)
    area.write_journal(good, area.journal_record(good, {}, "text/plain"), durable=True)
    bad = staged_file(area, "bad.txt", b"precious")
    (root / f"{bad.id}.json").write_text('{"key": "bad.txt", "head')  # torn record
    never_closed = staged_file(area, "tmp.txt")
    (root / f"{good.id}.json.9-abcd.tmp").write_text("{}")
    for staged in (good, bad, never_closed):
        area.close_fd(staged)

    after = StagingArea(root)
    with caplog.at_level(logging.ERROR, logger="fbmount.staging"):
        found = after.recover()
    assert [(s.id, s.key, s.state) for s, _ in found] == [(good.id, "good.txt", State.DIRTY)]
    assert found[0][0].journal_seq == 2
    assert after.journal_record(found[0][0], {}, "text/plain")["seq"] == 3
    quarantine = root / "quarantine"
    assert (quarantine / f"{bad.id}.data").read_bytes() == b"precious"
    assert (quarantine / f"{bad.id}.json").exists()
    assert bad.id in caplog.text and "quarantine" in caplog.text
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [f"{good.id}.data", "journal-1.log", "quarantine"]
    )


def test_sync_during_the_download_of_a_file_opened_for_writing(
    s3: Any, s3_endpoint: str, bucket: str, mount: Any, run_fbmount: Any
) -> None:
    """`fbmount sync` while an open-for-write downloads a stored file into staging must
    not upload the partial local copy over the object (the crash soak found S3 left with
    0 bytes of an fsync'ed 3 MiB file)."""
    data = os.urandom(3 * MIB)
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--endpoint", proxy.endpoint, "--upload-delay", "0.3", "--part-size", "5")
        with open(m.path / "f", "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
        assert s3.get_object(Bucket=bucket, Key="f")["Body"].read() == data
        held = proxy.add_rule("GetObject", "hold", key="f", times=1)
        result: dict[str, Any] = {}

        def writer() -> None:
            try:
                fd = os.open(m.path / "f", os.O_WRONLY)  # downloads the object first
                os.pwrite(fd, b"X", 0)
                os.close(fd)
                result["ok"] = True
            except OSError as e:
                result["error"] = e

        t = threading.Thread(target=writer)
        t.start()
        assert held.wait_held(30), m.log_text()
        r = run_fbmount("sync", str(m.path), timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert s3.get_object(Bucket=bucket, Key="f")["Body"].read() == data  # untouched
        held.release()
        t.join(30)
        assert result == {"ok": True}
        assert m.unmount() == 0
    assert s3.get_object(Bucket=bucket, Key="f")["Body"].read() == b"X" + data[1:]


def test_group_commit_writes_every_record_before_its_caller_returns(tmp_path: Path) -> None:
    """Closes at the same moment share a journal write (one worker-thread call, one
    fdatasync); each still returns only once its own record is on disk, and an error in
    one record is that caller's alone."""
    import trio

    area = StagingArea(tmp_path / "staging")
    files = [staged_file(area, key=f"k{i}") for i in range(20)]
    broken = files[7]
    broken.data_path = area.root  # its bytes cannot be read: this caller gets the error
    groups: list[int] = []
    write_group = area._write_group

    def counted(items: list, durable: bool) -> list:
        groups.append(len(items))
        return write_group(items, durable)

    area._write_group = counted  # type: ignore[method-assign]
    results: dict[str, object] = {}

    async def close(staged: Staged) -> None:
        record = area.journal_record(staged, {"n": staged.key}, "text/plain")
        try:
            results[staged.key] = await area.commit(staged, record)
        except OSError as e:
            results[staged.key] = e
        if results[staged.key] is True:  # on disk when commit returns
            assert record_of(area, staged)["headers"] == {"n": staged.key}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for staged in files:
                nursery.start_soon(close, staged)

    trio.run(main)
    assert sum(groups) == len(files) and len(groups) < len(files), groups
    assert isinstance(results.pop("k7"), OSError)
    assert set(results.values()) == {True}, results
