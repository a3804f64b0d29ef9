"""Write path through real mounts: every byte checked through the mount AND in S3 (boto3).

Nothing is mocked: each test mounts fbmount on the session SeaweedFS (through the fault
proxy where requests are counted or faults injected) and reads the result back both through
the mount and straight from the bucket. Strict mode (``--upload-delay 0``) is used where a
test checks S3 right after close(); with the default delay the checks go after fsync() or
after unmount (which flushes). The peers' bugs listed in /work/shared/FIELD-NOTES.md each
have a test here (named in the docstrings).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import random
import stat
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from faultproxy import FaultProxy
from helpers import body, exists, open_uploads, read_file, sync_path, wait_for, write_file

from fbmount import format as fmt

MiB = 1 << 20
PART = 5 * MiB  # every mount here that cares uses --part-size 5
STRICT = ("--upload-delay", "0")
FILE_644 = stat.S_IFREG | 0o644  # 33188
LINK_MODE = stat.S_IFLNK | 0o777  # 41471


# --------------------------------------------------------------------------- helpers
def data_of(n: int, seed: int | str = 0) -> bytes:
    """Deterministic pseudo-random bytes (never all-zero, so zero-fill bugs show)."""
    return random.Random(seed).randbytes(n)


def head(s3: Any, bucket: str, key: str) -> dict:
    return s3.head_object(Bucket=bucket, Key=key)


def keys_under(s3: Any, bucket: str, prefix: str) -> list[str]:
    out: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return out


def seed_many(s3: Any, bucket: str, keys: list[str], workers: int = 8) -> None:
    """PUT small objects in parallel (the bucket is already warmed by the fixture)."""
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket=bucket, Key=k, Body=k.encode()), keys))


def gen_blocks(total: int, block: int = MiB, seed: int = 7) -> Iterator[bytes]:
    """A deterministic stream of `total` bytes in `block`-sized pieces."""
    rng = random.Random(seed)
    left = total
    while left:
        n = min(block, left)
        yield rng.randbytes(n)
        left -= n


def md5_stream(chunks: Iterator[bytes]) -> tuple[str, int]:
    h = hashlib.md5(usedforsecurity=False)
    n = 0
    for c in chunks:
        h.update(c)
        n += len(c)
    return h.hexdigest(), n


def file_chunks(path: Path, block: int = 4 * MiB) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(block):
            yield chunk


def s3_chunks(s3: Any, bucket: str, key: str, block: int = 4 * MiB) -> Iterator[bytes]:
    stream = s3.get_object(Bucket=bucket, Key=key)["Body"]
    while chunk := stream.read(block):
        yield chunk


_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1


def renameat2(old: Path, new: Path, flags: int) -> None:
    """renameat2(2) via libc (glibc >= 2.28); raises OSError like os.rename."""
    rc = _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(old), None, str(new))


def expect_errno(err: int, fn: Callable[..., Any], *args: Any) -> None:
    with pytest.raises(OSError) as info:
        fn(*args)
    assert info.value.errno == err, f"{fn.__name__}{args}: {info.value!r}, wanted {err}"


# --------------------------------------------------------------------------- sizes
@pytest.mark.parametrize(
    "size",
    [0, 1, PART - 1, PART, PART + 1, 2 * PART],
    ids=["empty", "1B", "part-1", "part", "part+1", "2parts"],
)
def test_sizes_round_trip(s3: Any, bucket: str, mount: Callable, size: int) -> None:
    """Sizes around the part boundary reach S3 byte for byte at close (strict mode)."""
    m = mount(bucket, *STRICT, "--part-size", "5")
    data = data_of(size, size)
    p = m.path / "f.bin"
    write_file(p, data)
    assert os.stat(p).st_size == size
    assert read_file(p) == data
    assert head(s3, bucket, "f.bin")["ContentLength"] == size
    assert body(s3, bucket, "f.bin") == data
    assert not open_uploads(s3, bucket)


def test_multipart_200mib(s3: Any, bucket: str, mount: Callable) -> None:
    """A 200 MiB file with 5 MiB parts (40 parts): md5 equal through the mount and in S3."""
    total = 200 * MiB
    m = mount(bucket, *STRICT, "--part-size", "5")
    p = m.path / "big.bin"
    h = hashlib.md5(usedforsecurity=False)
    with open(p, "wb") as f:
        for chunk in gen_blocks(total):
            f.write(chunk)
            h.update(chunk)
    want = h.hexdigest()
    info = head(s3, bucket, "big.bin")
    assert info["ContentLength"] == total
    assert info["ETag"].strip('"').endswith("-40")  # really 40 parts of 5 MiB
    assert md5_stream(s3_chunks(s3, bucket, "big.bin")) == (want, total)
    assert os.stat(p).st_size == total
    assert md5_stream(file_chunks(p)) == (want, total)
    assert not open_uploads(s3, bucket)


# --------------------------------------------------------------------------- in-place edits
def test_overwrite_middle_of_seeded_object(s3: Any, bucket: str, mount: Callable) -> None:
    """Overwriting bytes in the middle of an object written by someone else keeps the rest."""
    original = data_of(12 * MiB, "seed")
    s3.put_object(Bucket=bucket, Key="obj", Body=original)
    m = mount(bucket, *STRICT, "--part-size", "5")
    patch = b"PATCHED!" * 5
    off = 6 * MiB - 13  # straddles a download chunk / part boundary
    with open(m.path / "obj", "r+b") as f:
        f.seek(off)
        f.write(patch)
    want = original[:off] + patch + original[off + len(patch) :]
    assert read_file(m.path / "obj") == want
    assert body(s3, bucket, "obj") == want


def test_append(s3: Any, bucket: str, mount: Callable) -> None:
    """O_APPEND writes land at the end even after a seek to 0."""
    original = data_of(1000, "append")
    s3.put_object(Bucket=bucket, Key="log.txt", Body=original)
    m = mount(bucket, *STRICT)
    p = m.path / "log.txt"
    with open(p, "ab") as f:
        f.write(b"first line\n")
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"second line\n")
    finally:
        os.close(fd)
    want = original + b"first line\nsecond line\n"
    assert read_file(p) == want
    assert body(s3, bucket, "log.txt") == want


def test_truncate_by_path(s3: Any, bucket: str, mount: Callable) -> None:
    """os.truncate down keeps the kept bytes (s3fs zeroed them), up zero-fills (both in S3)."""
    original = data_of(3 * MiB + 5, "trunc")
    s3.put_object(Bucket=bucket, Key="t.bin", Body=original)
    m = mount(bucket, *STRICT)
    p = m.path / "t.bin"

    os.truncate(p, 1000)
    assert os.stat(p).st_size == 1000
    assert read_file(p) == original[:1000]
    sync_path(p)
    assert body(s3, bucket, "t.bin") == original[:1000]

    os.truncate(p, 5000)
    want = original[:1000] + bytes(4000)
    assert os.stat(p).st_size == 5000
    assert read_file(p) == want
    sync_path(p)
    assert body(s3, bucket, "t.bin") == want

    os.truncate(p, 0)
    sync_path(p)
    assert read_file(p) == b""
    assert body(s3, bucket, "t.bin") == b""


def test_ftruncate_open_file_with_unwritten_data(s3: Any, bucket: str, mount: Callable) -> None:
    """Shrinking ftruncate on an open file with unwritten data sticks (s3fs ignored it);
    growing it afterwards zero-fills instead of resurrecting old bytes (rclone)."""
    m = mount(bucket, *STRICT)
    p = m.path / "ft.bin"
    data = data_of(100_000, "ft")
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.ftruncate(fd, 1234)
        assert os.fstat(fd).st_size == 1234
        assert os.pread(fd, 200_000, 0) == data[:1234]
    finally:
        os.close(fd)
    assert body(s3, bucket, "ft.bin") == data[:1234]

    fd = os.open(p, os.O_RDWR)
    try:
        os.pwrite(fd, b"tail", 1234)
        os.ftruncate(fd, 100)
        os.ftruncate(fd, 50_000)  # up again: bytes 100.. must be zeros, not the old data
        want = data[:100] + bytes(49_900)
        assert os.pread(fd, 100_000, 0) == want
    finally:
        os.close(fd)
    assert read_file(p) == want
    assert body(s3, bucket, "ft.bin") == want


def test_sparse_write_past_eof(s3: Any, bucket: str, mount: Callable) -> None:
    """pwrite past EOF leaves a zero-filled hole, new file and existing object alike."""
    s3.put_object(Bucket=bucket, Key="seeded.bin", Body=b"abc")  # before mounting: no caches
    m = mount(bucket, *STRICT)
    p = m.path / "sparse.bin"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"end", 3 * MiB)
    finally:
        os.close(fd)
    want = bytes(3 * MiB) + b"end"
    assert os.stat(p).st_size == 3 * MiB + 3
    assert read_file(p) == want
    assert body(s3, bucket, "sparse.bin") == want

    with open(m.path / "seeded.bin", "r+b") as f:
        f.seek(10_000)
        f.write(b"xyz")
    want = b"abc" + bytes(10_000 - 3) + b"xyz"
    assert read_file(m.path / "seeded.bin") == want
    assert body(s3, bucket, "seeded.bin") == want


def test_o_trunc(s3: Any, bucket: str, mount: Callable) -> None:
    """O_TRUNC empties an existing object, with and without a write after it."""
    s3.put_object(Bucket=bucket, Key="a", Body=data_of(5000, "a"))
    s3.put_object(Bucket=bucket, Key="b", Body=data_of(5000, "b"))
    m = mount(bucket, *STRICT)
    write_file(m.path / "a", b"short")
    assert read_file(m.path / "a") == b"short"
    assert body(s3, bucket, "a") == b"short"
    os.close(os.open(m.path / "b", os.O_WRONLY | os.O_TRUNC))
    assert os.stat(m.path / "b").st_size == 0
    assert body(s3, bucket, "b") == b""


@pytest.mark.parametrize("mode", ["strict", "delayed"])
def test_o_excl_created_and_closed_is_stored(
    s3: Any, bucket: str, mount: Callable, mode: str
) -> None:
    """O_CREAT|O_EXCL then close at once stores an empty object (s3fs never stored it)."""
    m = mount(bucket, *(STRICT if mode == "strict" else ()))
    p = m.path / "lockfile"
    os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    assert os.stat(p).st_size == 0
    expect_errno(errno.EEXIST, os.open, p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    if mode == "delayed":
        assert m.unmount() == 0
    info = head(s3, bucket, "lockfile")
    assert info["ContentLength"] == 0
    assert info["Metadata"]["mode"] == str(FILE_644)


def test_writer_sees_own_writes_before_upload(s3: Any, bucket: str, mount: Callable) -> None:
    """With write-back (default delay), stat/ls/read show new data at once; unmount uploads."""
    m = mount(bucket)  # default --upload-delay 2
    (m.path / "d").mkdir()
    p = m.path / "d" / "w.txt"
    data = data_of(300_000, "w")
    with open(p, "wb") as f:
        f.write(data[:100_000])
        f.flush()
        assert os.stat(p).st_size == 100_000
        assert "w.txt" in os.listdir(m.path / "d")
        assert read_file(p) == data[:100_000]
        f.write(data[100_000:])
        f.flush()
        assert os.stat(p).st_size == 300_000
        assert read_file(p) == data
    assert os.stat(p).st_size == 300_000
    assert read_file(p) == data
    assert m.unmount() == 0
    assert body(s3, bucket, "d/w.txt") == data


def test_fsync_uploads_in_write_back_mode(s3: Any, bucket: str, mount: Callable) -> None:
    """With a long settle window, fsync() returns only once the object is in S3 (rclone's
    fsync returned with the object still absent)."""
    m = mount(bucket, "--upload-delay", "600")
    data = data_of(PART + 3, "fsync")
    with open(m.path / "f.bin", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        assert body(s3, bucket, "f.bin") == data
        f.write(b"more")
    assert not exists(s3, bucket, "g.bin")
    write_file(m.path / "g.bin", b"later")
    sync_path(m.path / "g.bin")  # fsync through another descriptor, after close
    assert body(s3, bucket, "g.bin") == b"later"
    assert m.unmount() == 0
    assert body(s3, bucket, "f.bin") == data + b"more"


def test_unmount_flushes_everything(s3: Any, bucket: str, mount: Callable) -> None:
    """Files written just before unmount all reach S3 (rclone lost 21 of 148)."""
    m = mount(bucket, "--upload-delay", "600")  # nothing goes up before the unmount
    (m.path / "many").mkdir()
    files = {f"many/f{i:03d}.txt": data_of(100 + i, i) for i in range(150)}
    for key, data in files.items():
        write_file(m.path / key, data)
    assert m.unmount() == 0
    assert sorted(k for k in keys_under(s3, bucket, "many/") if k != "many/") == sorted(files)
    for key in ("many/f000.txt", "many/f077.txt", "many/f149.txt"):
        assert body(s3, bucket, key) == files[key]
    assert not any(m.cache_dir.rglob("*.data")), "staged data left behind after a clean flush"


def test_unlinked_while_open_still_reads(s3: Any, bucket: str, mount: Callable) -> None:
    """POSIX: a file unlinked while open stays readable for its holder (remote and staged)."""
    remote = data_of(3 * MiB, "remote")
    s3.put_object(Bucket=bucket, Key="remote.bin", Body=remote)
    m = mount(bucket, *STRICT)
    with open(m.path / "remote.bin", "rb") as f:
        assert f.read(1000) == remote[:1000]
        os.unlink(m.path / "remote.bin")
        assert not (m.path / "remote.bin").exists()
        assert not exists(s3, bucket, "remote.bin")
        assert f.read() == remote[1000:]
        f.seek(0)
        assert f.read() == remote

    local = data_of(200_000, "local")
    fd = os.open(m.path / "local.bin", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, local)
        os.unlink(m.path / "local.bin")
        assert os.pread(fd, len(local) + 1, 0) == local
        os.pwrite(fd, b"more", len(local))
        assert os.pread(fd, len(local) + 10, 0) == local + b"more"
    finally:
        os.close(fd)
    assert not (m.path / "local.bin").exists()
    assert not exists(s3, bucket, "local.bin")
    assert m.unmount() == 0
    assert not exists(s3, bucket, "local.bin")  # never resurrected by the flush


# --------------------------------------------------------------------------- renames
@pytest.fixture(params=["copy-allowed", "copy-refused"])
def copy_mode(request: pytest.FixtureRequest) -> str:
    return request.param


def test_rename_file_and_dir(
    s3: Any, bucket: str, mount: Callable, s3_endpoint: str, copy_mode: str
) -> None:
    """Renames of remote files, staged files and directories; with CopyObject refused they
    stream (s3fs: ENOTSUP, rclone: EIO), and auto mode probes CopyObject only once."""
    a = data_of(6 * MiB + 3, "a")  # bigger than a part: the streamed copy is multipart
    s3.put_object(Bucket=bucket, Key="a.bin", Body=a, Metadata={"mode": "33152"})
    s3.put_object(Bucket=bucket, Key="d/x", Body=b"x-body")
    s3.put_object(Bucket=bucket, Key="d/sub/y", Body=b"y-body")
    s3.put_object(Bucket=bucket, Key="d/sub/big", Body=a)
    with FaultProxy(s3_endpoint) as proxy:
        if copy_mode == "copy-refused":
            proxy.refuse_copy()
        m = mount(bucket, "--endpoint", proxy.endpoint, "--part-size", "5")

        os.rename(m.path / "a.bin", m.path / "b.bin")
        assert not (m.path / "a.bin").exists()
        assert read_file(m.path / "b.bin") == a
        assert stat.S_IMODE(os.stat(m.path / "b.bin").st_mode) == 0o600
        assert not exists(s3, bucket, "a.bin")
        assert body(s3, bucket, "b.bin") == a
        assert head(s3, bucket, "b.bin")["Metadata"]["mode"] == "33152"
        assert proxy.counts["CopyObject"] == 1

        # A staged (not yet uploaded) file renames locally: one upload, under the new name.
        write_file(m.path / "new.txt", b"fresh")
        os.rename(m.path / "new.txt", m.path / "renamed.txt")
        assert read_file(m.path / "renamed.txt") == b"fresh"

        assert len(read_file(m.path / "d" / "sub" / "big")) == len(a)  # known to the mount
        os.rename(m.path / "d", m.path / "e")
        assert sorted(os.listdir(m.path / "e")) == ["sub", "x"]
        assert read_file(m.path / "e" / "sub" / "y") == b"y-body"
        assert read_file(m.path / "e" / "sub" / "big") == a
        assert not (m.path / "d").exists()
        assert not keys_under(s3, bucket, "d/")
        assert body(s3, bucket, "e/x") == b"x-body"
        assert body(s3, bucket, "e/sub/y") == b"y-body"
        assert body(s3, bucket, "e/sub/big") == a

        assert m.unmount() == 0
        assert body(s3, bucket, "renamed.txt") == b"fresh"
        assert not exists(s3, bucket, "new.txt")
        if copy_mode == "copy-refused":
            assert proxy.counts["CopyObject"] + proxy.counts["UploadPartCopy"] == 1
        else:
            assert proxy.counts["CopyObject"] >= 3
        assert not open_uploads(s3, bucket)


def test_rename_dir_with_1500_children(
    s3: Any, bucket: str, mount: Callable, s3_endpoint: str, copy_mode: str
) -> None:
    """A directory of 1,500 objects moves completely; with CopyObject refused the first
    (concurrent) copies probe it once and every other object streams."""
    keys = [f"big/f{i:04d}" for i in range(1500)]
    seed_many(s3, bucket, keys)
    with FaultProxy(s3_endpoint) as proxy:
        if copy_mode == "copy-refused":
            proxy.refuse_copy()
        m = mount(bucket, "--endpoint", proxy.endpoint)
        assert len(os.listdir(m.path / "big")) == 1500
        os.rename(m.path / "big", m.path / "moved")
        assert not (m.path / "big").exists()
        names = sorted(os.listdir(m.path / "moved"))
        assert names == [k.split("/")[1] for k in keys]
        assert read_file(m.path / "moved" / "f0777") == b"big/f0777"
        copies = proxy.counts["CopyObject"]
    assert not keys_under(s3, bucket, "big/")
    moved = keys_under(s3, bucket, "moved/")
    assert sorted(k for k in moved if k != "moved/") == [f"moved/{k[4:]}" for k in keys]
    for i in (0, 1, 749, 1499):
        assert body(s3, bucket, f"moved/f{i:04d}") == keys[i].encode()
    if copy_mode == "copy-refused":
        assert copies == 1, f"auto mode should probe CopyObject once, saw {copies} attempts"
    else:
        assert copies >= 1500


def test_rename_replaces_existing_target(s3: Any, bucket: str, mount: Callable) -> None:
    """rename over an existing file replaces it; dirs follow rename(2)'s rules."""
    s3.put_object(Bucket=bucket, Key="src", Body=b"source")
    s3.put_object(Bucket=bucket, Key="dst", Body=b"destination, longer")
    s3.put_object(Bucket=bucket, Key="full/child", Body=b"c")
    m = mount(bucket, *STRICT)
    os.rename(m.path / "src", m.path / "dst")
    assert read_file(m.path / "dst") == b"source"
    assert not (m.path / "src").exists()
    assert body(s3, bucket, "dst") == b"source"
    assert not exists(s3, bucket, "src")

    write_file(m.path / "staged", b"staged bytes")
    os.rename(m.path / "staged", m.path / "dst")
    assert read_file(m.path / "dst") == b"staged bytes"
    assert body(s3, bucket, "dst") == b"staged bytes"
    assert not exists(s3, bucket, "staged")

    (m.path / "d1").mkdir()
    (m.path / "empty").mkdir()
    write_file(m.path / "d1" / "f", b"in d1")
    os.rename(m.path / "d1", m.path / "empty")  # over an empty dir: allowed
    assert read_file(m.path / "empty" / "f") == b"in d1"
    assert body(s3, bucket, "empty/f") == b"in d1"
    assert not keys_under(s3, bucket, "d1/")
    expect_errno(errno.ENOTEMPTY, os.rename, m.path / "empty", m.path / "full")
    (m.path / "e1").mkdir()
    (m.path / "e2").mkdir()
    os.rename(m.path / "e1", m.path / "e2")  # an empty dir over an empty dir: e2 stays
    assert os.listdir(m.path / "e2") == []
    assert exists(s3, bucket, "e2/")
    assert not keys_under(s3, bucket, "e1")
    expect_errno(errno.EISDIR, os.rename, m.path / "dst", m.path / "full")
    expect_errno(errno.ENOTDIR, os.rename, m.path / "full", m.path / "dst")
    assert body(s3, bucket, "full/child") == b"c"


def test_rename_noreplace(s3: Any, bucket: str, mount: Callable) -> None:
    """renameat2(RENAME_NOREPLACE) refuses an existing target and works otherwise."""
    s3.put_object(Bucket=bucket, Key="one", Body=b"1")
    s3.put_object(Bucket=bucket, Key="two", Body=b"2")
    m = mount(bucket, *STRICT)
    expect_errno(errno.EEXIST, renameat2, m.path / "one", m.path / "two", RENAME_NOREPLACE)
    assert read_file(m.path / "one") == b"1"
    assert body(s3, bucket, "two") == b"2"
    renameat2(m.path / "one", m.path / "three", RENAME_NOREPLACE)
    assert read_file(m.path / "three") == b"1"
    assert not (m.path / "one").exists()
    assert body(s3, bucket, "three") == b"1"
    assert not exists(s3, bucket, "one")


# --------------------------------------------------------------------------- metadata
def test_chmod_chown_utime_round_trip(
    s3: Any, bucket: str, mount: Callable, s3_endpoint: str, copy_mode: str
) -> None:
    """chmod/chown/utime on a remote object land in x-amz-meta-* (s3fs format), body intact,
    also when CopyObject is refused (rclone: chmod did not stick)."""
    original = data_of(6 * MiB + 1, "meta")
    s3.put_object(Bucket=bucket, Key="m.bin", Body=original)
    with FaultProxy(s3_endpoint) as proxy:
        if copy_mode == "copy-refused":
            proxy.refuse_copy()
        m = mount(bucket, "--endpoint", proxy.endpoint, "--part-size", "5")
        p = m.path / "m.bin"
        assert os.stat(p).st_size == len(original)
        assert proxy.wait_idle()
        before = proxy.counts
        os.chmod(p, 0o640)
        os.chown(p, 1234, 5678)
        os.utime(p, ns=(1_600_000_000_000_000_000, 1_500_000_000_123_456_789))
        st = os.stat(p)
        assert st.st_mode == stat.S_IFREG | 0o640
        assert (st.st_uid, st.st_gid) == (1234, 5678)
        assert st.st_mtime_ns == 1_500_000_000_123_456_789
        sync_path(p)
        # README: one CopyObject onto itself, coalesced (or, refused, one re-upload).
        assert proxy.wait_idle()
        spent = proxy.counts - before
        assert spent["CopyObject"] == 1, dict(spent)  # refused: the one probe
        assert spent["UploadPartCopy"] == 0, dict(spent)
        if copy_mode == "copy-refused":
            assert spent["CompleteMultipartUpload"] + spent["PutObject"] == 1, dict(spent)
        else:
            assert spent["PutObject"] + spent["CreateMultipartUpload"] == 0, dict(spent)
        md = head(s3, bucket, "m.bin")["Metadata"]
        assert md["mode"] == str(stat.S_IFREG | 0o640) == "33184"
        assert (md["uid"], md["gid"]) == ("1234", "5678")
        assert md["mtime"] == "1500000000.123456789"
        assert md["atime"] == "1600000000"
        assert body(s3, bucket, "m.bin") == original

        before = proxy.counts
        os.chmod(p, 0o644)
        os.utime(p, (1_700_000_000, 1_700_000_001))
        assert m.unmount() == 0  # this time the flush at unmount carries it
        spent = proxy.counts - before
        # One more coalesced copy; refused, no probe again (remembered), one re-upload.
        assert spent["CopyObject"] == (0 if copy_mode == "copy-refused" else 1), dict(spent)
    md = head(s3, bucket, "m.bin")["Metadata"]
    assert md["mode"] == str(FILE_644) == "33188"
    assert md["mtime"] == "1700000001"
    assert body(s3, bucket, "m.bin") == original
    assert not open_uploads(s3, bucket)

    m2 = mount(bucket)
    st = os.stat(m2.path / "m.bin")
    assert st.st_mode == FILE_644
    assert (st.st_uid, st.st_gid, int(st.st_mtime)) == (1234, 5678, 1_700_000_001)


def test_new_file_metadata_and_content_type(s3: Any, bucket: str, mount: Callable) -> None:
    """A new file carries mode/uid/gid/mtime; Content-Type comes from its name."""
    m = mount(bucket, *STRICT)
    for name in ("x.html", "y.txt", "z.json", "w.png", "noext", "v.weird-ext"):
        fd = os.open(m.path / name, os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"<p>hi</p>")
        os.fchmod(fd, 0o644)
        os.close(fd)
    types = {n: head(s3, bucket, n)["ContentType"] for n in os.listdir(m.path)}
    assert types == {
        "x.html": "text/html",
        "y.txt": "text/plain",
        "z.json": "application/json",
        "w.png": "image/png",
        "noext": "application/octet-stream",
        "v.weird-ext": "application/octet-stream",
    }
    md = head(s3, bucket, "x.html")["Metadata"]
    assert md["mode"] == "33188"
    assert (md["uid"], md["gid"]) == (str(os.getuid()), str(os.getgid()))
    mtime = int(float(md["mtime"]))
    assert mtime == int(os.stat(m.path / "x.html").st_mtime)


def test_rename_takes_the_content_type_of_the_new_name(
    s3: Any, bucket: str, mount: Callable
) -> None:
    """A Content-Type that came from the old name follows the new name (as s3fs sets it);
    one another tool chose, not what the old name gives, is kept. Both a stored file
    (CopyObject) and a staged one (uploaded later under the new name)."""
    s3.put_object(Bucket=bucket, Key="chosen.txt", Body=b"c", ContentType="text/x-chosen")
    m = mount(bucket, *STRICT)
    write_file(m.path / "stored.txt", b"s")
    os.rename(m.path / "stored.txt", m.path / "stored.png")
    os.rename(m.path / "chosen.txt", m.path / "chosen.bin")
    assert head(s3, bucket, "stored.png")["ContentType"] == "image/png"
    assert head(s3, bucket, "chosen.bin")["ContentType"] == "text/x-chosen"
    assert m.unmount() == 0
    m = mount(bucket)  # default mode: renamed while staged
    write_file(m.path / "staged.txt", b"t")
    os.rename(m.path / "staged.txt", m.path / "staged.txt-copy")
    assert m.unmount() == 0
    assert head(s3, bucket, "staged.txt-copy")["ContentType"] == "application/octet-stream"


def test_symlink_round_trip(s3: Any, bucket: str, mount: Callable) -> None:
    """A symlink is an object whose body is the target and whose mode is 41471."""
    m = mount(bucket, *STRICT)
    write_file(m.path / "target.txt", b"pointed at")
    os.symlink("target.txt", m.path / "link")
    os.symlink("../nowhere/at all", m.path / "dangling")
    assert os.readlink(m.path / "link") == "target.txt"
    assert read_file(m.path / "link") == b"pointed at"
    assert os.lstat(m.path / "link").st_mode == LINK_MODE
    assert body(s3, bucket, "link") == b"target.txt"
    assert head(s3, bucket, "link")["Metadata"]["mode"] == str(LINK_MODE) == "41471"
    assert body(s3, bucket, "dangling") == b"../nowhere/at all"
    expect_errno(errno.EEXIST, os.symlink, "x", m.path / "link")
    assert m.unmount() == 0
    m2 = mount(bucket)
    assert os.readlink(m2.path / "link") == "target.txt"
    assert os.readlink(m2.path / "dangling") == "../nowhere/at all"
    assert stat.S_ISLNK(os.lstat(m2.path / "link").st_mode)
    assert read_file(m2.path / "link") == b"pointed at"


def test_hard_link_is_not_supported(bucket: str, mount: Callable) -> None:
    """EOPNOTSUPP, as s3fs answers: `ln` says "Operation not supported", not a
    permission problem the user could fix."""
    m = mount(bucket, *STRICT)
    write_file(m.path / "f", b"x")
    expect_errno(errno.EOPNOTSUPP, os.link, m.path / "f", m.path / "g")
    assert not (m.path / "g").exists()


def test_xattrs(s3: Any, bucket: str, mount: Callable) -> None:
    """user.* xattrs round-trip as metadata; user.fbmount.* expose etag/type/url."""
    m = mount(bucket, *STRICT)
    p = m.path / "page.html"
    data = b"<html>xattr</html>"
    write_file(p, data)
    os.setxattr(p, "user.color", b"blue")
    os.setxattr(p, "user.bin", b'\x00\xff,:"{}')
    assert os.getxattr(p, "user.color") == b"blue"
    assert os.getxattr(p, "user.bin") == b'\x00\xff,:"{}'
    assert {"user.color", "user.bin"} <= set(os.listxattr(p))
    sync_path(p)
    info = head(s3, bucket, "page.html")
    stored = fmt.decode_xattrs(info["Metadata"]["xattr"])
    assert stored == {"user.color": b"blue", "user.bin": b'\x00\xff,:"{}'}
    assert body(s3, bucket, "page.html") == data

    assert os.getxattr(p, "user.fbmount.etag").decode() == info["ETag"].strip('"')
    assert os.getxattr(p, "user.fbmount.content_type") == b"text/html"
    url = os.getxattr(p, "user.fbmount.url").decode()
    with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - our own loopback URL
        assert r.read() == data
    expect_errno(errno.EPERM, os.setxattr, p, "user.fbmount.etag", b"forged")

    os.removexattr(p, "user.bin")
    expect_errno(errno.ENODATA, os.getxattr, p, "user.bin")
    assert m.unmount() == 0
    assert fmt.decode_xattrs(head(s3, bucket, "page.html")["Metadata"]["xattr"]) == {
        "user.color": b"blue"
    }
    m2 = mount(bucket)
    assert os.getxattr(m2.path / "page.html", "user.color") == b"blue"
    expect_errno(errno.ENODATA, os.getxattr, m2.path / "page.html", "user.bin")


# --------------------------------------------------------------------------- directories
def test_mkdir_rmdir_unlink_errors(s3: Any, bucket: str, mount: Callable) -> None:
    """mkdir writes a `dir/` marker (application/x-directory); errno for each misuse."""
    s3.put_object(Bucket=bucket, Key="implicit/child", Body=b"c")  # no marker: a prefix only
    m = mount(bucket, *STRICT)
    (m.path / "d").mkdir()
    info = head(s3, bucket, "d/")
    assert info["ContentLength"] == 0
    assert info["ContentType"] == "application/x-directory"
    assert stat.S_ISDIR(os.stat(m.path / "d").st_mode)
    expect_errno(errno.EEXIST, os.mkdir, m.path / "d")
    write_file(m.path / "d" / "f", b"x")
    expect_errno(errno.EEXIST, os.mkdir, m.path / "d" / "f")
    expect_errno(errno.ENOTEMPTY, os.rmdir, m.path / "d")
    expect_errno(errno.ENOENT, os.rmdir, m.path / "missing")
    expect_errno(errno.ENOTDIR, os.rmdir, m.path / "d" / "f")
    expect_errno(errno.EISDIR, os.unlink, m.path / "d")
    expect_errno(errno.ENOENT, os.unlink, m.path / "missing")
    os.unlink(m.path / "d" / "f")
    os.rmdir(m.path / "d")
    assert not (m.path / "d").exists()
    assert not keys_under(s3, bucket, "d")
    expect_errno(errno.ENOTEMPTY, os.rmdir, m.path / "implicit")


def test_empty_dir_survives_last_file_delete(s3: Any, bucket: str, mount: Callable) -> None:
    """A mkdir'ed dir stays after its last file goes, also across a remount."""
    m = mount(bucket, *STRICT)
    (m.path / "keep").mkdir()
    (m.path / "keep" / "nested").mkdir()
    write_file(m.path / "keep" / "only", b"x")
    write_file(m.path / "keep" / "nested" / "n", b"y")
    os.unlink(m.path / "keep" / "only")
    os.unlink(m.path / "keep" / "nested" / "n")
    assert sorted(os.listdir(m.path / "keep")) == ["nested"]
    assert os.listdir(m.path / "keep" / "nested") == []
    assert sorted(keys_under(s3, bucket, "keep")) == ["keep/", "keep/nested/"]
    assert m.unmount() == 0
    m2 = mount(bucket)
    assert os.listdir(m2.path) == ["keep"]
    assert os.listdir(m2.path / "keep") == ["nested"]
    assert os.listdir(m2.path / "keep" / "nested") == []


def test_rm_rf_2000_files(s3: Any, bucket: str, mount: Callable, s3_endpoint: str) -> None:
    """`rm -rf` of a tree of 2,000 objects removes every key (and the markers)."""
    keys = [f"tree/{sub}/f{i:04d}" for sub in ("a", "b") for i in range(1000)]
    seed_many(s3, bucket, keys)
    s3.put_object(Bucket=bucket, Key="tree/a/", Body=b"", ContentType="application/x-directory")
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--endpoint", proxy.endpoint)
        r = subprocess.run(["rm", "-rf", str(m.path / "tree")], capture_output=True, timeout=180)
        assert r.returncode == 0, r.stderr
        assert not (m.path / "tree").exists()
        counts = proxy.counts
    assert not keys_under(s3, bucket, "tree")
    print(
        f"rm -rf of 2000 files: DeleteObject={counts['DeleteObject']} "
        f"DeleteObjects={counts['DeleteObjects']} total={sum(counts.values())}"
    )


def test_rm_rf_batches_deletes(s3: Any, bucket: str, mount: Callable, s3_endpoint: str) -> None:
    """rm -rf of N files should cost far fewer than N delete requests (DeleteObjects)."""
    keys = [f"tree/f{i:04d}" for i in range(300)]
    seed_many(s3, bucket, keys)
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--endpoint", proxy.endpoint)
        subprocess.run(["rm", "-rf", str(m.path / "tree")], check=True, timeout=120)
        assert m.unmount() == 0
        deletes = proxy.counts["DeleteObject"] + proxy.counts["DeleteObjects"]
    assert not keys_under(s3, bucket, "tree")
    assert deletes <= len(keys) // 10, f"{deletes} delete requests for {len(keys)} files"


def fbmount_sync(run_fbmount: Callable, mnt: Path) -> None:
    r = run_fbmount("sync", str(mnt), timeout=60)
    assert r.returncode == 0, r.stderr


def test_rmdir_sends_its_marker_with_the_files_deletes(
    s3: Any, bucket: str, mount: Callable, s3_endpoint: str
) -> None:
    """rm -rf: each rmdir is one LIST (the unlinked files count as gone) and one
    DeleteObjects carrying the directory's marker with its files' queued deletes; no
    DeleteObject. A batch of the files' deletes held in flight while rmdir lists does not
    make it ENOTEMPTY."""
    keys = [f"tree/d{i % 3}/f{i:02d}" for i in range(30)]
    seed_many(s3, bucket, keys)
    for marker in ["tree/", *(f"tree/d{i}/" for i in range(3))]:
        s3.put_object(Bucket=bucket, Key=marker, Body=b"", ContentType="application/x-directory")
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--endpoint", proxy.endpoint)
        assert sorted(os.listdir(m.path / "tree")) == ["d0", "d1", "d2"]
        proxy.wait_idle()
        proxy.reset()
        subprocess.run(["rm", "-rf", str(m.path / "tree" / "d0")], check=True, timeout=60)
        proxy.wait_idle()
        assert proxy.counts["DeleteObject"] == 0, dict(proxy.counts)
        assert proxy.counts["DeleteObjects"] == 1, dict(proxy.counts)
        assert not keys_under(s3, bucket, "tree/d0")

        held = proxy.add_rule("DeleteObjects", "hold", times=1)
        for name in os.listdir(m.path / "tree" / "d1"):
            os.unlink(m.path / "tree" / "d1" / name)
        assert held.wait_held(10), "the files' batch was not sent"
        lists = proxy.counts["ListObjects"]
        with ThreadPoolExecutor(1) as pool:
            done = pool.submit(os.rmdir, m.path / "tree" / "d1")
            wait_for(lambda: proxy.counts["ListObjects"] > lists, "rmdir's LIST")
            held.release()
            done.result(timeout=60)
        assert not keys_under(s3, bucket, "tree/d1")

        subprocess.run(["rm", "-rf", str(m.path / "tree")], check=True, timeout=60)
        proxy.wait_idle()
        assert proxy.counts["DeleteObject"] == 0, dict(proxy.counts)
    assert not keys_under(s3, bucket, "tree")


def test_rmdir_that_fails_keeps_the_directory(
    s3: Any, bucket: str, mount: Callable, s3_endpoint: str, run_fbmount: Callable
) -> None:
    """A file added by another client after the unlinks: ENOTEMPTY, the marker stays and
    the unlinked files still go. A refused DeleteObjects: rmdir fails, the directory and
    its marker stay, and the file's delete goes out once the server takes it."""
    seed_many(s3, bucket, ["d/a", "d/b", "e/a"])
    for marker in ("d/", "e/"):
        s3.put_object(Bucket=bucket, Key=marker, Body=b"", ContentType="application/x-directory")
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--endpoint", proxy.endpoint)
        for name in ("a", "b"):
            os.unlink(m.path / "d" / name)
        s3.put_object(Bucket=bucket, Key="d/other", Body=b"o")
        expect_errno(errno.ENOTEMPTY, os.rmdir, m.path / "d")
        fbmount_sync(run_fbmount, m.path)
        assert sorted(keys_under(s3, bucket, "d")) == ["d/", "d/other"]

        refusal = proxy.add_rule("DeleteObjects", "status", status=403, code="AccessDenied")
        os.unlink(m.path / "e" / "a")
        with pytest.raises(OSError):
            os.rmdir(m.path / "e")
        assert refusal.fired >= 1
        assert (m.path / "e").is_dir()
        proxy.remove_rule(refusal)  # the server takes deletes again
        fbmount_sync(run_fbmount, m.path)
        assert (m.path / "e").is_dir()
    assert keys_under(s3, bucket, "e") == ["e/"]


# --------------------------------------------------------------------------- failures
def test_upload_failure_reports_eio_and_recovers(
    s3: Any, bucket: str, mount: Callable, s3_endpoint: str
) -> None:
    """UploadPart failing beyond the retries: close() and fsync() report EIO, no multipart
    upload is left open, and the staged bytes go up once the server is healthy again."""
    a = data_of(12 * MiB + 7, "fail-a")
    b = data_of(11 * MiB + 3, "fail-b")
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(
            bucket, "--endpoint", proxy.endpoint, *STRICT, "--part-size", "5", "-o", "retries=2"
        )
        rule = proxy.add_rule(kind="UploadPart", action="status", status=500)

        fd = os.open(m.path / "a.bin", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, a)
        expect_errno(errno.EIO, os.close, fd)
        assert rule.fired >= 1
        # close() failed, but the written bytes stay visible locally.
        assert read_file(m.path / "a.bin") == a

        fd = os.open(m.path / "b.bin", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b)
        expect_errno(errno.EIO, os.fsync, fd)
        with pytest.raises(OSError):
            os.close(fd)

        fd = os.open(m.path / "a.bin", os.O_RDONLY)
        try:
            expect_errno(errno.EIO, os.fsync, fd)
            # Background retries may have an upload in flight right now; each one seen must
            # be aborted soon (a leaked one would stay listed forever).
            seen = {u["UploadId"] for u in open_uploads(s3, bucket)}
            wait_for(
                lambda: not seen & {u["UploadId"] for u in open_uploads(s3, bucket)},
                "failed multipart uploads aborted",
            )
            assert not exists(s3, bucket, "a.bin")

            proxy.remove_rule(rule)
            os.fsync(fd)  # the fault is gone: this fsync uploads a.bin
        finally:
            os.close(fd)
        assert body(s3, bucket, "a.bin") == a
        assert m.unmount() == 0  # and the unmount flush (or a background retry) uploads b.bin
    assert body(s3, bucket, "b.bin") == b
    assert not open_uploads(s3, bucket)


def test_multipart_parts_are_read_as_they_are_sent(s3: Any, bucket: str, mount: Callable) -> None:
    """A part is read from the staged file as it is sent, not held whole: a 5 TB file's
    parts are 525 MiB, and (parallel + 2) of them in memory would be gigabytes. Here two
    48 MiB parts must raise the daemon's peak memory by far less than one part."""
    data = data_of(96 * MiB, "parts-streamed")
    m = mount(bucket, "--part-size", "48", "--upload-delay", "3600")
    before = _peak_rss(m.pid)
    write_file(m.path / ".big-parts", data)  # a dot-file: never streamed while written
    sync_path(m.path / ".big-parts")  # the whole-file multipart upload, now
    grown = _peak_rss(m.pid) - before
    assert body(s3, bucket, ".big-parts") == data
    assert grown < 24 * MiB, f"peak RSS grew by {grown / MiB:.0f} MiB for two 48 MiB parts"
    assert m.unmount() == 0


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")
