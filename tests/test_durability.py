"""Durability of written data through real mounts: fsync, unmount, SIGTERM, kill -9.

What the peers got wrong (docs: /work/shared/FIELD-NOTES.md) and fbmount must not:
rclone lost 21 of 148 files written just before `umount` and returned from fsync with the
object absent; s3fs never stored a file created with O_EXCL and closed at once. Here a
closed file is on local disk before close() returns, fsync waits for the upload, unmount
and SIGTERM flush, and a mount after kill -9 serves and uploads what was staged.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Mount, MountFactory
from faultproxy import FaultProxy
from helpers import journal_records, status_json

MIB = 1024 * 1024
FIXED_NS = 1_500_000_000_123_456_789  # 2017-07-14, an mtime no clock would produce


# --------------------------------------------------------------------------- helpers
def content(name: str, size: int = 0) -> bytes:
    """Deterministic bytes for a file name; ``size`` 0 means a small varied size."""
    seed = hashlib.sha256(name.encode()).digest()
    size = size or 1 + seed[0] * 7
    return (seed * (size // len(seed) + 1))[:size]


def write_files(directory: Path, n: int, stem: str = "f") -> dict[str, bytes]:
    """Create n files (O_CREAT|O_EXCL, written, closed at once); returns name → bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for i in range(n):
        name = f"{stem}{i:04d}.dat"
        data = content(name)
        fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        out[name] = data
    return out


def s3_body(s3: Any, bucket: str, key: str) -> bytes | None:
    try:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except s3.exceptions.NoSuchKey:
        return None


def s3_keys(s3: Any, bucket: str, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.update(o["Key"] for o in page.get("Contents", []))
    return keys - {".fbmount-test-warmup"}


def check_all_in_s3(s3: Any, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    keys = s3_keys(s3, bucket, prefix)
    missing = sorted(prefix + n for n in files if prefix + n not in keys)
    assert not missing, f"{len(missing)} of {len(files)} files lost: {missing[:10]}"
    for name, data in files.items():
        assert s3_body(s3, bucket, prefix + name) == data, name


def state_dir(m: Mount) -> Path:
    dirs = [p for p in m.cache_dir.iterdir() if p.is_dir()]
    assert len(dirs) == 1, f"expected one state dir under {m.cache_dir}: {dirs}"
    return dirs[0]


def staged_records(m: Mount) -> list[dict]:
    return list(journal_records(state_dir(m) / "staging").values())


def wait_settled(m: Mount, timeout: float = 60) -> None:
    """Until nothing is staged any more (every journal record uploaded and removed)."""
    deadline = time.monotonic() + timeout
    while staged_records(m):
        if time.monotonic() > deadline:
            pytest.fail(f"uploads did not settle in {timeout:.0f} s")
        time.sleep(0.1)


def s3_meta_ns(value: str) -> int:
    sec, _, frac = value.partition(".")
    return int(sec) * 1_000_000_000 + int(frac.ljust(9, "0")[:9] or 0)


def poll(predicate: Any, timeout: float = 15.0) -> float | None:
    """Seconds until predicate() was true, or None after ``timeout`` (a bound, not a
    timing assertion)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.1)
    return None


# --------------------------------------------------------------------------- fsync
def test_fsync_returns_once_object_is_in_s3(s3: Any, bucket: str, mount: MountFactory) -> None:
    m = mount(bucket)  # default --upload-delay 2: without fsync nothing would be up yet
    path = m.path / "synced.txt"
    data = content("synced", 300_000)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        assert s3_body(s3, bucket, "synced.txt") == data  # while still open
    # Rewrite an uploaded file: fsync waits for the new version.
    with open(path, "r+b") as f:
        f.seek(10)
        f.write(b"CHANGED")
        f.flush()
        os.fsync(f.fileno())
        assert s3_body(s3, bucket, "synced.txt") == data[:10] + b"CHANGED" + data[17:]

    # Rename and chmod an open, staged file, then fsync: the upload carries the final
    # key and metadata, and the old name never reaches S3.
    fd = os.open(m.path / "draft.tmp", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, b"final words\n")
        os.rename(m.path / "draft.tmp", m.path / "final.txt")
        os.fchmod(fd, 0o600)
        os.utime(fd, ns=(FIXED_NS, FIXED_NS))
        os.fsync(fd)
        obj = s3.get_object(Bucket=bucket, Key="final.txt")
        assert obj["Body"].read() == b"final words\n"
        assert int(obj["Metadata"]["mode"]) == stat.S_IFREG | 0o600
        assert s3_meta_ns(obj["Metadata"]["mtime"]) == FIXED_NS
        assert "draft.tmp" not in s3_keys(s3, bucket)
    finally:
        os.close(fd)
    assert m.unmount() == 0


# --------------------------------------------------------------------------- flush on exit
def test_close_then_immediate_unmount_loses_nothing(
    s3: Any, bucket: str, mount: MountFactory
) -> None:
    """rclone lost 21 of 148 files written just before umount."""
    m = mount(bucket)  # default --upload-delay 2
    files = write_files(m.path / "burst", 150)
    assert m.unmount() == 0  # fusermount3 -u at once; fbmount flushes, then exits
    assert m.proc.returncode == 0, m.log_text()
    check_all_in_s3(s3, bucket, "burst/", files)
    assert not list((state_dir(m) / "staging").iterdir())


def test_sigterm_flushes_everything(s3: Any, bucket: str, mount: MountFactory) -> None:
    m = mount(bucket, "--upload-delay", "30")
    files = write_files(m.path / "term", 150)
    assert s3_keys(s3, bucket, "term/") == {"term/"}  # only mkdir's marker: the delay holds
    assert m.terminate(signal.SIGTERM) == 0, m.log_text()
    assert not m.is_mounted()
    check_all_in_s3(s3, bucket, "term/", files)
    assert not list((state_dir(m) / "staging").iterdir())


# --------------------------------------------------------------------------- kill -9
def test_kill9_staged_files_uploaded_by_next_mount(
    s3: Any, bucket: str, mount: MountFactory
) -> None:
    m = mount(bucket, "--upload-delay", "60")
    root = m.path
    # Uploaded before the crash (fsync), then changed only in metadata: a staged
    # metadata-only change.
    with open(root / "old.txt", "wb") as f:
        f.write(b"old contents\n")
        os.fsync(f.fileno())
    os.chmod(root / "old.txt", 0o640)

    files = write_files(root / "many", 40)
    plain = content("plain.bin", 3 * MIB)
    (root / "plain.bin").write_bytes(plain)
    (root / "b.txt").write_bytes(b"renamed before the crash\n")
    (root / "sub").mkdir()
    os.rename(root / "b.txt", root / "sub" / "b-renamed.txt")
    (root / "c.txt").write_bytes(b"chmod + utime before the crash\n")
    os.chmod(root / "c.txt", 0o600)
    os.utime(root / "c.txt", ns=(FIXED_NS, FIXED_NS))
    (root / "twice.txt").write_bytes(b"first version, longer than the second\n")
    (root / "twice.txt").write_bytes(b"second version\n")
    (root / "gone.txt").write_bytes(b"deleted before the crash\n")
    os.unlink(root / "gone.txt")

    before = s3_keys(s3, bucket)
    assert before == {"old.txt", "sub/", "many/"}, before  # the 60 s delay: nothing else
    m.kill9()
    assert not m.is_mounted()

    m2 = mount(bucket, "--upload-delay", "60", cache_dir=m.cache_dir, mountpoint=m.path)
    # Recovery serves the staged copies at once and uploads them in the background.
    m2.sync()
    keys = s3_keys(s3, bucket)
    expected = {"old.txt", "sub/", "plain.bin", "sub/b-renamed.txt", "c.txt", "twice.txt"}
    expected |= {f"many/{n}" for n in files}
    assert expected <= keys, sorted(expected - keys)
    assert not {"b.txt", "gone.txt"} & keys
    check_all_in_s3(s3, bucket, "many/", files)
    assert s3_body(s3, bucket, "plain.bin") == plain
    assert s3_body(s3, bucket, "sub/b-renamed.txt") == b"renamed before the crash\n"
    assert s3_body(s3, bucket, "twice.txt") == b"second version\n"
    c = s3.get_object(Bucket=bucket, Key="c.txt")
    assert c["Body"].read() == b"chmod + utime before the crash\n"
    assert int(c["Metadata"]["mode"]) == stat.S_IFREG | 0o600
    assert s3_meta_ns(c["Metadata"]["mtime"]) == FIXED_NS
    old = s3.get_object(Bucket=bucket, Key="old.txt")
    assert old["Body"].read() == b"old contents\n"
    assert int(old["Metadata"]["mode"]) == stat.S_IFREG | 0o640
    assert staged_records(m2) == []
    # And the new mount shows the same.
    assert (m2.path / "sub" / "b-renamed.txt").read_bytes() == b"renamed before the crash\n"
    st = (m2.path / "c.txt").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o600, FIXED_NS)
    assert stat.S_IMODE((m2.path / "old.txt").stat().st_mode) == 0o640
    assert m2.unmount() == 0


def test_cache_dir_is_private(bucket: str, mount: MountFactory) -> None:
    """State dir and staging dir 0700, staged data and journal files 0600 — also when an
    earlier, looser directory is found."""
    m = mount(bucket, "--upload-delay", "60")
    (m.path / "secret.txt").write_bytes(b"not for other users\n")
    state = state_dir(m)
    staging = state / "staging"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE(staging.stat().st_mode) == 0o700
    staged = list(staging.iterdir())
    assert {".data", ".log"} <= {p.suffix for p in staged} <= {".data", ".log", ".spare"}, staged
    for p in staged:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert m.unmount() == 0

    os.chmod(state, 0o755)
    os.chmod(staging, 0o755)
    m2 = mount(bucket, "--upload-delay", "60", cache_dir=m.cache_dir)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE(staging.stat().st_mode) == 0o700
    assert m2.unmount() == 0


# --------------------------------------------------------------------------- two mounts
def test_two_mounts_see_each_others_changes_after_ttl(
    s3: Any, bucket: str, mount: MountFactory
) -> None:
    a = mount(bucket, "--dir-ttl", "1", "--attr-ttl", "1")
    b = mount(bucket, "--dir-ttl", "1", "--attr-ttl", "1")
    (a.path / "shared").mkdir()
    assert poll(lambda: (b.path / "shared").is_dir()) is not None
    # b caches "empty directory" and "no such file" first.
    assert os.listdir(b.path / "shared") == []
    assert not (b.path / "shared" / "new.txt").exists()

    with open(a.path / "shared" / "new.txt", "wb") as f:
        f.write(b"version 1\n")
        os.fsync(f.fileno())

    def b_reads(expected: bytes) -> bool:
        try:
            return (b.path / "shared" / "new.txt").read_bytes() == expected
        except FileNotFoundError:
            return False

    seen = poll(lambda: b_reads(b"version 1\n") and "new.txt" in os.listdir(b.path / "shared"))
    assert seen is not None, "the other mount never saw the new file"

    with open(a.path / "shared" / "new.txt", "r+b") as f:
        f.write(b"VERSION 2, longer\n")
        os.fsync(f.fileno())
    changed = poll(lambda: b_reads(b"VERSION 2, longer\n"))
    assert changed is not None, "the other mount kept the old contents"

    os.unlink(a.path / "shared" / "new.txt")
    removed = poll(lambda: not (b.path / "shared" / "new.txt").exists())
    assert removed is not None, "the other mount still shows a deleted file"
    print(
        f"\n[two mounts, ttl 1 s] new file seen after {seen:.1f} s, change after "
        f"{changed:.1f} s, deletion after {removed:.1f} s"
    )
    assert a.unmount() == 0
    assert b.unmount() == 0


def test_two_mounts_of_one_bucket_share_a_cache_dir(
    s3: Any, bucket: str, mount: MountFactory, run_fbmount: Any
) -> None:
    """A second mount of the same bucket with the same --cache-dir takes a cache directory
    of its own (NAME-2) instead of being refused; `fbmount status`/`sync` find each mount's
    own, what is written through each is in S3, and both unmount cleanly."""
    a = mount(bucket)
    b = mount(bucket, cache_dir=a.cache_dir)
    dir_a = status_json(run_fbmount, a.path)["cache_dir"]
    dir_b = status_json(run_fbmount, b.path)["cache_dir"]
    assert dir_b == f"{dir_a}-2", (dir_a, dir_b)
    assert f"cache directory {dir_b}; in use by other mounts of this bucket: {dir_a}" in (
        b.log_text()
    )
    (a.path / "from-a.txt").write_bytes(b"written through the first mount\n")
    (b.path / "from-b.txt").write_bytes(b"written through the second mount\n")
    for m in (a, b):
        r = run_fbmount("sync", str(m.path), timeout=60)
        assert r.returncode == 0, r.stderr
    assert s3_body(s3, bucket, "from-a.txt") == b"written through the first mount\n"
    assert s3_body(s3, bucket, "from-b.txt") == b"written through the second mount\n"
    assert b.unmount() == 0
    assert a.unmount() == 0


def test_files_staged_in_a_second_cache_dir_are_recovered(
    s3: Any, bucket: str, mount: MountFactory, run_fbmount: Any
) -> None:
    """Crash recovery is per cache directory: what a killed second mount staged in NAME-2
    is uploaded by the next mount, which takes NAME-2 for it although the bucket's first
    directory is free again by then."""
    a = mount(bucket)
    b = mount(bucket, "--upload-delay", "60", cache_dir=a.cache_dir)
    dir_b = status_json(run_fbmount, b.path)["cache_dir"]
    data = content("staged-in-second.bin", 300_000)
    (b.path / "staged.bin").write_bytes(data)
    b.kill9()
    assert s3_body(s3, bucket, "staged.bin") is None  # only staged, in NAME-2
    assert a.unmount() == 0

    c = mount(bucket, cache_dir=a.cache_dir)
    assert status_json(run_fbmount, c.path)["cache_dir"] == dir_b
    assert f"cache directory {dir_b} (holds files staged by an earlier mount)" in c.log_text()
    c.sync()  # recovered: served from the staged copy, uploaded in the background
    assert s3_body(s3, bucket, "staged.bin") == data
    assert (c.path / "staged.bin").read_bytes() == data
    assert c.unmount() == 0


# --------------------------------------------------------------------------- coalescing
def test_changes_within_settle_window_make_one_put(
    s3: Any, s3_endpoint: str, bucket: str, mount: MountFactory, run_fbmount: Any
) -> None:
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--endpoint", proxy.endpoint)  # default --upload-delay 2
        assert proxy.wait_idle()
        proxy.reset()
        path = m.path / "big.bin"
        first = content("big-1", MIB)
        path.write_bytes(first)
        # Change it again (twice) inside the 2 s window: overwrite the middle, append.
        with open(path, "r+b") as f:
            f.seek(MIB // 2)
            f.write(b"X" * 4096)
        with open(path, "ab") as f:
            f.write(b"tail")
        final = first[: MIB // 2] + b"X" * 4096 + first[MIB // 2 + 4096 :] + b"tail"
        wait_settled(m)  # the write-back uploaded it by itself...
        r = run_fbmount("sync", str(m.path), timeout=60)  # ...and nothing else is pending
        assert r.returncode == 0, r.stdout + r.stderr
        assert proxy.wait_idle(timeout=30)
        puts = proxy.paths("PutObject")
        print(f"\n[coalescing] requests: {dict(proxy.counts)}")
        assert puts == [f"/{bucket}/big.bin"], puts
        assert proxy.counts["CopyObject"] == 0
        assert proxy.counts["CreateMultipartUpload"] == 0
        assert s3_body(s3, bucket, "big.bin") == final
        assert m.unmount() == 0


def test_excl_create_closed_at_once_is_stored(s3: Any, bucket: str, mount: MountFactory) -> None:
    """s3fs never stored a file created with O_CREAT|O_EXCL and closed at once."""
    m = mount(bucket)
    fd = os.open(m.path / "empty-excl", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    os.close(fd)
    with pytest.raises(FileExistsError):
        os.open(m.path / "empty-excl", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    assert m.unmount() == 0
    obj = s3.get_object(Bucket=bucket, Key="empty-excl")
    assert obj["Body"].read() == b""
    assert int(obj["Metadata"]["mode"]) == stat.S_IFREG | 0o640


def test_kill9_leaves_no_stale_mount_blocking_the_next(bucket: str, mount: MountFactory) -> None:
    """A dead mount answers ENOTCONN; once detached, the same place mounts again."""
    m = mount(bucket)
    m.kill9(unmount=False)
    with pytest.raises(OSError) as err:
        os.listdir(m.path)
    assert err.value.errno == errno.ENOTCONN
    subprocess.run(["fusermount3", "-uz", str(m.path)], check=True, timeout=30)
    m2 = mount(bucket, cache_dir=m.cache_dir, mountpoint=m.path)
    assert os.listdir(m2.path) == []
    assert m2.unmount() == 0


def test_kill9_mid_multipart_upload_leaves_no_open_upload(
    s3: Any, bucket: str, mount: MountFactory, s3_endpoint: str
) -> None:
    """kill -9 while a whole-file multipart upload (not a stream: a dot-file is never
    streamed) has a part in flight: the next mount aborts the open upload and uploads the
    file from its journal."""
    data = content(".mpu-crash", 12 * MIB)
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--endpoint", proxy.endpoint, "--upload-delay", "0.2", "--part-size", "5")
        held = proxy.add_rule("UploadPart", "hold", key=".mpu-crash", times=1)
        (m.path / ".mpu-crash").write_bytes(data)
        assert held.wait_held(30), m.log_text()
        assert [u["Key"] for u in open_multipart(s3, bucket)] == [".mpu-crash"]
        m.kill9()
        held.release()
        m2 = mount(  # the same endpoint: the cache directory is per endpoint and bucket
            bucket,
            "--endpoint",
            proxy.endpoint,
            "--upload-delay",
            "60",
            cache_dir=m.cache_dir,
            mountpoint=m.path,
        )
        assert open_multipart(s3, bucket) == []  # aborted before the mount served
        m2.sync()  # the recovered file goes up in the background
        assert s3_body(s3, bucket, ".mpu-crash") == data
        assert (m2.path / ".mpu-crash").read_bytes() == data
        assert m2.unmount() == 0


def open_multipart(s3: Any, bucket: str) -> list[dict]:
    return s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def test_chmod_then_rename_over_a_file_survives_kill9_and_remount(
    s3: Any, bucket: str, mount: MountFactory
) -> None:
    """Crash soak, seed 3 (issue #15): fsync f2 (mode 0660), chmod f2 0664 (staged), mv f2
    over f3, fsync f3, kill -9. The rename copies f2 to f3 with mode 0664; the copy has
    f2's bytes, hence f2's ETag, so the next mount took f2's old metadata index entry
    (moved to f3 by the rename: mode 0660) for f3's and showed the chmod undone."""
    m = mount(bucket, "--upload-delay", "60", "--part-size", "5")
    root = m.path
    (root / "f3").write_bytes(b"replaced by the rename\n")
    fd = os.open(root / "f2", os.O_WRONLY | os.O_CREAT, 0o660)
    try:
        os.fchmod(fd, 0o660)
        os.write(fd, b"C" * 1000)
        os.fsync(fd)  # in S3 with mode 0660
    finally:
        os.close(fd)
    os.chmod(root / "f2", 0o664)  # staged, not due for 60 s
    os.rename(root / "f2", root / "f3")
    fd = os.open(root / "f3", os.O_RDWR)  # for writing: no HEAD (close-to-open) first
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    m.kill9()
    obj = s3.get_object(Bucket=bucket, Key="f3")
    assert obj["Body"].read() == b"C" * 1000
    assert stat.S_IMODE(int(obj["Metadata"]["mode"])) == 0o664

    m2 = mount(bucket, "--upload-delay", "60", cache_dir=m.cache_dir, mountpoint=m.path)
    assert sorted(os.listdir(m2.path)) == ["f3"]
    assert (m2.path / "f3").read_bytes() == b"C" * 1000
    assert stat.S_IMODE((m2.path / "f3").stat().st_mode) == 0o664
    assert m2.unmount() == 0


def test_a_setattr_that_changes_nothing_writes_no_journal_record(
    bucket: str, mount: MountFactory
) -> None:
    """rsync makes its temp file 0600 with mkstemp and then fchmods it to 0600: a change of
    nothing, which cost a durable journal append. Only real changes are journaled; each
    still is, and survives a kill -9."""
    m = mount(bucket, "--upload-delay", "60")
    path = m.path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"bytes")
        os.fchmod(fd, 0o600)  # the same mode
    finally:
        os.close(fd)
    (record,) = staged_records(m)
    st = os.stat(path)
    os.chmod(path, 0o600)
    os.chown(path, st.st_uid, st.st_gid)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert [r["seq"] for r in staged_records(m)] == [record["seq"]]
    os.chmod(path, 0o640)
    os.utime(path, ns=(st.st_atime_ns, 1_600_000_000 * 10**9))
    (after,) = staged_records(m)
    assert after["seq"] == record["seq"] + 2
    m.kill9()
    m2 = mount(bucket, "--upload-delay", "60", cache_dir=m.cache_dir, mountpoint=m.path)
    st2 = os.stat(m2.path / "f")
    assert stat.S_IMODE(st2.st_mode) == 0o640 and st2.st_mtime_ns == 1_600_000_000 * 10**9
    assert (m2.path / "f").read_bytes() == b"bytes"
    assert m2.unmount() == 0
