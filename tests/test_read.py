"""Mount a bucket and read it: real fbmount, real FUSE, real SeaweedFS, nothing mocked.

Objects are seeded with boto3 and read back through the mount byte for byte; request
counts come from tests/faultproxy.py sitting between fbmount and SeaweedFS.

SeaweedFS refuses to store keys like ``x/./y`` and folds ``a//b`` into ``a/b``, but real
S3 stores them, so fbmount must cope with them in listings. ``ListRewriteProxy`` below
lets the real server's listings carry such keys: objects are stored under placeholder
segments and the proxy rewrites only ListObjectsV2 response bodies (placeholder → ``.``,
``..``, empty). Every other request and byte goes to SeaweedFS unchanged, and the proxy
records every request so the test can prove no bad key was ever followed.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import signal
import stat
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import MountFactory, is_mounted
from faultproxy import FaultProxy
from helpers import body, read_file, wait_for
from listrewrite import ListRewriteProxy, running

MIB = 1024 * 1024
KERNEL_READ = 128 * 1024  # the largest read the kernel sends to FUSE by default


# --------------------------------------------------------------------------- helpers
def put_many(s3: Any, bucket: str, objects: dict[str, bytes], workers: int = 8) -> None:
    """Seed objects in parallel threads (boto3 clients are thread-safe)."""
    with ThreadPoolExecutor(workers) as pool:
        list(
            pool.map(
                lambda kv: s3.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), objects.items()
            )
        )


def assert_no_traceback(log: str) -> None:
    assert "Traceback" not in log, f"fbmount logged a traceback:\n{log}"


# Placeholders stored in SeaweedFS and what real-S3 key segments they stand for (longest
# first: one contains another).
_REWRITES = {b"DOTDOTSEGMENT": b"..", b"DOTSEGMENT": b".", b"EMPTYSEGMENT": b""}


@pytest.fixture
def rewrite_proxy(s3_endpoint: str) -> Iterator[ListRewriteProxy]:
    with running(s3_endpoint, _REWRITES) as proxy:
        yield proxy


# --------------------------------------------------------------------------- namespace
def test_tree_names_and_odd_keys(
    s3: Any, bucket: str, mount: MountFactory, rewrite_proxy: ListRewriteProxy
) -> None:
    """Empty/1-byte files, nested and implicit dirs, both marker styles, unicode, a key
    that is both file and prefix, and keys that cannot be names (skipped, never followed)."""
    long_segment = "L" * 300
    objects = {
        "empty": b"",
        "one": b"\x01",
        "deep/er/est/leaf.txt": b"leaf",
        "implicit/child": b"c",  # no "implicit/" marker object
        "marked/": b"",  # s3fs/console-style marker
        "marked/inside": b"i",
        "emptymarked/": b"",  # a marker alone: an empty directory
        "legacy_$folder$": b"",  # old s3fs / Hadoop style marker, empty dir
        "legacy2_$folder$": b"",
        "legacy2/f": b"f",
        "ünïcødé/日本語.txt": "héllo wörld".encode(),
        "emoji-😀 name.txt": b"smile",
        "both": b"i am the hidden object",  # "both" is a file and a prefix
        "both/b": b"inner",
        "odd/ok": b"ok",
        "odd/DOTSEGMENT/y": b"dot",  # listed as odd/./y
        "odd/DOTDOTSEGMENT/y": b"dotdot",  # listed as odd/../y
        "odd/EMPTYSEGMENT/b": b"double slash",  # listed as odd//b
        f"odd/{long_segment}": b"too long",
        f"odd/{long_segment}/z": b"too long dir",
        "DOTDOTSEGMENT": b"root dotdot",  # listed as ".." at the root
    }
    put_many(s3, bucket, objects)
    m = mount(bucket, "--endpoint", rewrite_proxy.endpoint)
    root = m.path

    assert sorted(os.listdir(root)) == sorted(
        [
            "empty",
            "one",
            "deep",
            "implicit",
            "marked",
            "emptymarked",
            "legacy",
            "legacy2",
            "ünïcødé",
            "emoji-😀 name.txt",
            "both",
            "odd",
        ]
    )
    # Files, byte for byte.
    assert read_file(root / "empty") == b""
    assert os.stat(root / "empty").st_size == 0
    assert read_file(root / "one") == b"\x01"
    assert os.stat(root / "one").st_size == 1
    assert read_file(root / "deep/er/est/leaf.txt") == b"leaf"
    assert read_file(root / "ünïcødé/日本語.txt") == "héllo wörld".encode()
    assert read_file(root / "emoji-😀 name.txt") == b"smile"
    # Directories of every kind.
    for d in (
        "deep",
        "deep/er",
        "deep/er/est",
        "implicit",
        "marked",
        "emptymarked",
        "legacy",
        "legacy2",
        "ünïcødé",
        "both",
        "odd",
    ):
        assert stat.S_ISDIR(os.stat(root / d).st_mode), d
    assert os.listdir(root / "implicit") == ["child"]
    assert os.listdir(root / "marked") == ["inside"]  # the marker itself is not an entry
    assert os.listdir(root / "emptymarked") == []
    assert os.listdir(root / "legacy") == []
    assert os.listdir(root / "legacy2") == ["f"]
    assert read_file(root / "legacy2/f") == b"f"
    # File and prefix at once: the directory wins, the object stays untouched in S3.
    assert os.listdir(root / "both") == ["b"]
    assert read_file(root / "both/b") == b"inner"
    assert s3.get_object(Bucket=bucket, Key="both")["Body"].read() == b"i am the hidden object"
    # Keys that cannot be names are skipped; a 300-byte segment is a name (up to 1,024),
    # here both an object and a prefix: the directory wins.
    assert sorted(os.listdir(root / "odd")) == sorted(["ok", long_segment])
    assert read_file(root / "odd/ok") == b"ok"
    assert os.listdir(root / "odd" / long_segment) == ["z"]
    assert read_file(root / "odd" / long_segment / "z") == b"too long dir"
    # A lookup of a name S3 has under a skipped segment finds nothing new.
    assert not os.path.exists(root / "odd" / "y")
    assert not os.path.exists(root / "odd" / "b")
    # ... and never followed: no request asked for a listing or object below them.
    followed = [
        r
        for method, r in rewrite_proxy.requests
        if "odd/./" in r or "odd/../" in r or "odd//" in r or r.split("?")[0].endswith("/..")
    ]
    assert followed == [], followed
    assert m.is_mounted()
    assert_no_traceback(m.log_text())


def test_metadata_and_symlinks_shown_by_stat(s3: Any, bucket: str, mount: MountFactory) -> None:
    """s3fs and rclone metadata forms, Last-Modified fallback, an s3fs symlink object."""
    s3.put_object(
        Bucket=bucket,
        Key="meta/s3fs-exec",
        Body=b"#!/bin/sh\n",
        Metadata={"mode": "33261", "uid": "1234", "gid": "5678", "mtime": "1700000000.123456789"},
    )
    s3.put_object(
        Bucket=bucket,
        Key="meta/rclone",
        Body=b"r",
        Metadata={"mtime": "1354040105.5", "mode": "100664"},
    )
    s3.put_object(Bucket=bucket, Key="meta/plain", Body=b"p")
    s3.put_object(
        Bucket=bucket,
        Key="meta/link",
        Body=b"../meta/plain",
        Metadata={"mode": "41471", "uid": "0", "gid": "0", "mtime": "1600000000"},
    )
    s3.put_object(Bucket=bucket, Key="solo-link", Body=b"meta/rclone", Metadata={"mode": "41471"})
    last_modified = s3.head_object(Bucket=bucket, Key="meta/plain")["LastModified"]
    m = mount(bucket)
    meta = m.path / "meta"

    st = os.stat(meta / "s3fs-exec")
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert st.st_mtime_ns == 1_700_000_000_123_456_789
    assert os.access(meta / "s3fs-exec", os.X_OK)

    st = os.stat(meta / "rclone")
    assert st.st_mode == 0o100664
    assert st.st_mtime_ns == 1_354_040_105_500_000_000

    st = os.stat(meta / "plain")
    assert stat.S_ISREG(st.st_mode)
    assert int(st.st_mtime) == int(last_modified.timestamp())

    st = os.lstat(meta / "link")
    assert stat.S_ISLNK(st.st_mode)
    assert os.readlink(meta / "link") == "../meta/plain"
    assert st.st_mtime_ns == 1_600_000_000 * 10**9
    assert read_file(meta / "link") == b"p"  # followed by the kernel through the mount
    # Looked up directly (no listing of its directory cached first).
    assert stat.S_ISLNK(os.lstat(m.path / "solo-link").st_mode)
    assert os.readlink(m.path / "solo-link") == "meta/rclone"
    assert sorted(os.listdir(meta)) == ["link", "plain", "rclone", "s3fs-exec"]
    assert_no_traceback(m.log_text())


# --------------------------------------------------------------------------- big files
def test_large_objects_sequential_random_and_read_ahead(
    s3: Any, bucket: str, s3_endpoint: str, mount: MountFactory, tmp_path: Path
) -> None:
    """20 MiB read with cat and with random preads; 40 MiB read sequentially with far
    fewer GETs than 128 KiB kernel reads; random 4 KiB reads cost at most one GET each."""
    rng = random.Random(1234)
    data20 = os.urandom(20 * MIB)
    data40 = os.urandom(40 * MIB)
    s3.put_object(Bucket=bucket, Key="big20.bin", Body=data20)
    s3.put_object(Bucket=bucket, Key="big40.bin", Body=data40)
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--endpoint", proxy.endpoint, "--attr-ttl", "60", "--dir-ttl", "60")
        assert os.path.getsize(m.path / "big20.bin") == 20 * MIB

        # Random 4 KiB preads at odd offsets of a file never read before.
        offsets = sorted(
            {rng.randrange(1, 20 * MIB - 4096) | 1 for _ in range(40)}, key=lambda _: rng.random()
        )
        fd = os.open(m.path / "big20.bin", os.O_RDONLY)
        try:
            proxy.wait_idle(5)
            before = proxy.counts
            for off in offsets:
                assert os.pread(fd, 4096, off) == data20[off : off + 4096], off
            gets = (proxy.counts - before)["GetObject"]
            assert 1 <= gets <= len(offsets), gets
            # Unaligned sizes and a read across the end of the file.
            for off, size in ((3, 1), (MIB - 1, 3), (8 * MIB - 5, 10), (20 * MIB - 7, 100)):
                assert os.pread(fd, size, off) == data20[off : off + size]
            assert os.pread(fd, 10, 20 * MIB) == b""
        finally:
            os.close(fd)

        # Sequential: cat and copyfileobj both give the exact bytes.
        copy = tmp_path / "copy20.bin"
        with open(m.path / "big20.bin", "rb") as src, open(copy, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 * MIB)
        assert hashlib.sha256(copy.read_bytes()).digest() == hashlib.sha256(data20).digest()
        copy.unlink()
        out = subprocess.run(
            ["cat", str(m.path / "big20.bin")], capture_output=True, timeout=60, check=True
        ).stdout
        assert out == data20

        # Read-ahead: 40 MiB read sequentially, GETs counted.
        proxy.wait_idle(5)
        before = proxy.counts
        h = hashlib.sha256()
        with open(m.path / "big40.bin", "rb", buffering=0) as f:
            while chunk := f.read(KERNEL_READ):
                h.update(chunk)
        assert h.digest() == hashlib.sha256(data40).digest()
        proxy.wait_idle(5)
        gets = (proxy.counts - before)["GetObject"]
        assert 1 <= gets < 40 * MIB // KERNEL_READ, gets
        assert gets <= 40, f"{gets} GETs for 40 MiB: read-ahead hardly batches"
    m.unmount()
    assert_no_traceback(m.log_text())


def test_a_file_read_at_random_all_over_is_fetched_once_to_local_disk(
    s3: Any, bucket: str, s3_endpoint: str, mount: MountFactory
) -> None:
    """On a far link (here: 20 ms added to each GET), random reads cost a GET each until
    their round trips add up to a quarter of what one whole fetch would take
    (reader.WHOLE_COPY_*); then the file is fetched once, in 8 MiB GETs, and later reads
    send nothing. The copy is never uploaded and goes at close."""
    size = 16 * MIB
    data = os.urandom(size)
    s3.put_object(Bucket=bucket, Key="rand.bin", Body=data)
    rng = random.Random(7)
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--endpoint", proxy.endpoint)
        assert os.path.getsize(m.path / "rand.bin") == size
        proxy.add_rule("GetObject", "delay", seconds=0.02)
        fd = os.open(m.path / "rand.bin", os.O_RDONLY)
        try:
            proxy.wait_idle(5)
            before = proxy.counts
            batches = []
            for _ in range(40):
                start = proxy.counts
                for _ in range(50):
                    off = rng.randrange(0, size - 4096)
                    assert os.pread(fd, 4096, off) == data[off : off + 4096], off
                proxy.wait_idle(5)
                batches.append((proxy.counts - start)["GetObject"])
                if batches[-1] == 0:
                    break
            print(f"GETs per 50 random reads: {batches}")
            assert batches[-1] == 0, f"random reads never stopped sending GETs: {batches}"
            gets = (proxy.counts - before)["GetObject"]
            assert gets < 50 * len(batches), gets
            staged = list(m.cache_dir.rglob("*.data"))
            assert len(staged) == 1 and staged[0].read_bytes() == data
        finally:
            os.close(fd)
        wait_for(lambda: not list(m.cache_dir.rglob("*.data")), "the copy removed at close")
        assert proxy.counts["PutObject"] == 0
        assert body(s3, bucket, "rand.bin") == data
    assert m.unmount() == 0
    assert_no_traceback(m.log_text())


# --------------------------------------------------------------------------- listing
def test_big_prefix_lists_without_heads(
    s3: Any, bucket: str, s3_endpoint: str, mount: MountFactory
) -> None:
    """1,100 objects in one prefix: one listing shows all, `ls -l` costs LISTs not HEADs,
    and a second listing within the TTL costs no request."""
    names = [f"f{i:05d}.txt" for i in range(1100)]
    put_many(s3, bucket, {f"many/{n}": n.encode() for n in names})
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--endpoint", proxy.endpoint, "--attr-ttl", "60", "--dir-ttl", "60")
        proxy.wait_idle(5)
        before = proxy.counts
        ls = subprocess.run(
            ["ls", "-l", str(m.path / "many")], capture_output=True, text=True, timeout=60
        )
        assert ls.returncode == 0, ls.stderr
        lines = [ln for ln in ls.stdout.splitlines() if not ln.startswith("total")]
        assert len(lines) == 1100
        assert all(ln.startswith("-") for ln in lines)
        proxy.wait_idle(5)
        first = proxy.counts - before
        assert first["ListObjects"] >= 2, first  # 1,100 keys: two pages of 1,000
        assert first["HeadObject"] < 10, first
        assert first["GetObject"] == 0, first

        before = proxy.counts
        listed = os.listdir(m.path / "many")
        assert sorted(listed) == names
        ls2 = subprocess.run(
            ["ls", "-l", str(m.path / "many")], capture_output=True, text=True, timeout=60
        )
        assert ls2.returncode == 0 and ls2.stdout == ls.stdout
        proxy.wait_idle(5)
        second = proxy.counts - before
        assert second["ListObjects"] == 0, second
        assert second["HeadObject"] < 10, second
        assert read_file(m.path / "many" / names[777]) == names[777].encode()
    m.unmount()
    assert_no_traceback(m.log_text())


# --------------------------------------------------------------------------- consistency
def test_change_behind_the_mount_is_seen_after_ttl(
    s3: Any, bucket: str, mount: MountFactory
) -> None:
    """A boto3 overwrite shows up after the TTLs; no read ever mixes old and new bytes."""
    old = b"A" * (24 * MIB)
    new = b"B" * (12 * MIB + 3)
    s3.put_object(Bucket=bucket, Key="obj", Body=old)
    s3.put_object(Bucket=bucket, Key="small", Body=b"version one")
    m = mount(bucket, "--attr-ttl", "1", "--dir-ttl", "1")
    path = m.path / "obj"
    assert read_file(m.path / "small") == b"version one"
    assert os.path.getsize(path) == len(old)

    # An open reader keeps its version: the rest reads as old bytes or fails, never mixes.
    with open(path, "rb", buffering=0) as f:
        head = f.read(KERNEL_READ)
        assert head == old[:KERNEL_READ]
        s3.put_object(Bucket=bucket, Key="obj", Body=new)
        s3.put_object(Bucket=bucket, Key="small", Body=b"v2")
        s3.put_object(Bucket=bucket, Key="appeared", Body=b"new file")
        got = bytearray(head)
        try:
            while chunk := f.read(MIB):
                got += chunk
        except OSError as e:
            assert e.errno == errno.EIO, e
        assert set(got) == {ord("A")}, "old and new bytes mixed in one open file"
        assert len(got) <= len(old)

    def shows_new() -> bool:
        return os.path.getsize(path) == len(new)

    wait_for(shows_new, "the new size after --attr-ttl 1", timeout=15)
    data = read_file(path)
    assert data == new
    wait_for(lambda: read_file(m.path / "small") == b"v2", "the small file's new bytes", timeout=15)
    wait_for(lambda: "appeared" in os.listdir(m.path), "a new key after --dir-ttl 1", timeout=15)
    assert read_file(m.path / "appeared") == b"new file"

    # Deleted behind the mount's back: gone after the TTL.
    s3.delete_object(Bucket=bucket, Key="appeared")
    wait_for(lambda: "appeared" not in os.listdir(m.path), "a deleted key to vanish", timeout=15)
    wait_for(
        lambda: not os.path.exists(m.path / "appeared"), "ENOENT for a deleted key", timeout=15
    )
    assert_no_traceback(m.log_text())


# --------------------------------------------------------------------------- misc
def test_statfs_and_read_only(s3: Any, bucket: str, mount: MountFactory) -> None:
    s3.put_object(Bucket=bucket, Key="dir/file", Body=b"content")
    m = mount(bucket, "--read-only")
    sv = os.statvfs(m.path)
    assert sv.f_bsize > 0 and sv.f_frsize > 0
    assert sv.f_blocks > 0 and 0 < sv.f_bavail <= sv.f_blocks and sv.f_bfree <= sv.f_blocks
    assert sv.f_files > 0 and sv.f_ffree <= sv.f_files
    assert sv.f_namemax == 1024  # S3 keys: 1,024 bytes; the kernel passes such names
    assert sv.f_flag & os.ST_RDONLY

    assert read_file(m.path / "dir/file") == b"content"
    attempts: list[tuple[str, Callable[[], object]]] = [
        ("open for write", lambda: open(m.path / "dir/file", "r+b")),  # noqa: SIM115
        ("create", lambda: open(m.path / "new", "wb")),  # noqa: SIM115
        ("truncate", lambda: os.truncate(m.path / "dir/file", 0)),
        ("mkdir", lambda: os.mkdir(m.path / "newdir")),
        ("unlink", lambda: os.unlink(m.path / "dir/file")),
        ("rmdir", lambda: os.rmdir(m.path / "dir")),
        ("rename", lambda: os.rename(m.path / "dir/file", m.path / "moved")),
        ("chmod", lambda: os.chmod(m.path / "dir/file", 0o600)),
        ("utime", lambda: os.utime(m.path / "dir/file", (1, 1))),
        ("symlink", lambda: os.symlink("x", m.path / "lnk")),
        ("setxattr", lambda: os.setxattr(m.path / "dir/file", "user.k", b"v")),
    ]
    for what, fn in attempts:
        with pytest.raises(OSError) as exc:
            fn()
        assert exc.value.errno == errno.EROFS, what
    assert s3.get_object(Bucket=bucket, Key="dir/file")["Body"].read() == b"content"
    assert sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]) == ["dir/file"]
    assert_no_traceback(m.log_text())


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "fusermount3"])
def test_clean_unmount(s3: Any, bucket: str, mount: MountFactory, how: str) -> None:
    s3.put_object(Bucket=bucket, Key="f", Body=b"x")
    m = mount(bucket)
    assert read_file(m.path / "f") == b"x"
    if how == "fusermount3":
        subprocess.run(["fusermount3", "-u", str(m.path)], check=True, timeout=30)
        m.proc.wait(timeout=30)
        rc = m.proc.returncode
    else:
        rc = m.terminate(getattr(signal, how))
    assert rc == 0, m.log_text()
    assert not is_mounted(m.path)
    assert not os.path.ismount(m.path)
    assert os.listdir(m.path) == []  # the plain, empty directory again
    assert_no_traceback(m.log_text())


def test_parallel_readers_of_several_and_of_the_same_file(s3: Any, bucket: str, mount: Any):
    """4 dd readers of 4 objects plus 2 of one object at once (the kernel also reads ahead
    concurrently within each file): every byte right and the mount still answers."""
    import hashlib
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    blobs = {f"par{i}.bin": os.urandom(24 * 1024 * 1024) for i in range(4)}
    for key, data in blobs.items():
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    m = mount(bucket, "--memory-limit", "32")  # a tight budget: prefetch must share it

    def read(key: str) -> str:
        out = subprocess.run(
            ["dd", f"if={m.path / key}", "bs=1M", "status=none"],
            capture_output=True,
            timeout=120,
            check=True,
        )
        return hashlib.sha256(out.stdout).hexdigest()

    keys = [*blobs, "par0.bin", "par0.bin"]
    with ThreadPoolExecutor(len(keys)) as pool:
        digests = list(pool.map(read, keys))
    assert digests == [hashlib.sha256(blobs[k]).hexdigest() for k in keys]
    assert sorted(os.listdir(m.path)) == sorted(blobs)
    assert "Traceback" not in m.log_text()
