"""POSIX and s3fs compatibility through real mounts (issue #13).

Special files (FIFOs, sockets, devices) stored as s3fs's mknod stores them, the file-type
cascade pjdfstest walks (create, chmod, chown, utimensat, rename over every other type,
unlink, rmdir, remount), xattr names beyond ``user.*``, names longer than 255 bytes, and
small points (rename's ctime, ENOTDIR through a file). Every check is made through the
mount and, where it matters, on the objects in S3 (boto3). Runs as root (devices).
"""

from __future__ import annotations

import errno
import os
import re
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import make_s3_client, unique_bucket_name, warm_bucket
from helpers import body, read_file, sync_path, write_file

from fbmount import format as fmt

STRICT = ("--upload-delay", "0")
CHR_DEV = os.makedev(4, 1)  # like /dev/tty1
BLK_DEV = os.makedev(259, 70000)  # a minor above 255: the split encoding of dev_t
ATIME, MTIME = 1_500_000_000_123_456_789, 1_400_000_000_987_654_321

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mknod of devices needs root")


def expect_errno(err: int, fn: Callable[..., Any], *args: Any) -> None:
    with pytest.raises(OSError) as info:
        fn(*args)
    assert info.value.errno == err, f"{fn.__name__}{args}: {info.value!r}, wanted {err}"


def meta(s3: Any, bucket: str, key: str) -> dict[str, str]:
    return s3.head_object(Bucket=bucket, Key=key)["Metadata"]


# --------------------------------------------------------------------------- file types
def make_socket(path: Path) -> None:
    """bind(2) a Unix socket: the kernel asks the filesystem for an S_IFSOCK mknod."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))


MAKERS: dict[str, Callable[[Path], None]] = {
    "reg": lambda p: os.mknod(p, stat.S_IFREG | 0o644),
    "dir": lambda p: os.mkdir(p, 0o755),
    "link": lambda p: os.symlink("somewhere", p),
    "fifo": lambda p: os.mkfifo(p, 0o644),
    "sock": make_socket,
    "chr": lambda p: os.mknod(p, stat.S_IFCHR | 0o640, CHR_DEV),
    "blk": lambda p: os.mknod(p, stat.S_IFBLK | 0o604, BLK_DEV),
}
TYPE_BITS = {
    "reg": stat.S_IFREG,
    "dir": stat.S_IFDIR,
    "link": stat.S_IFLNK,
    "fifo": stat.S_IFIFO,
    "sock": stat.S_IFSOCK,
    "chr": stat.S_IFCHR,
    "blk": stat.S_IFBLK,
}
RDEV = {"chr": CHR_DEV, "blk": BLK_DEV}


def remove(path: Path) -> None:
    if stat.S_ISDIR(os.lstat(path).st_mode):
        os.rmdir(path)
    else:
        os.unlink(path)


def test_special_files_stored_as_s3fs_does(s3: Any, bucket: str, mount: Callable) -> None:
    """mkfifo, mknod (regular, char, block) and bind(2) of a Unix socket make empty objects
    whose mode carries the type (s3fs's mknod), with rdev for devices; stat and ls -l show
    them, and they survive a remount. (Before: EPERM for every one of them.)"""
    m = mount(bucket, *STRICT)
    for kind in ("reg", "fifo", "sock", "chr", "blk"):
        MAKERS[kind](m.path / kind)
    expected = {
        "reg": stat.S_IFREG | 0o644,
        "fifo": stat.S_IFIFO | 0o644,
        "sock": stat.S_IFSOCK | 0o755,  # bind: 0777 & ~umask 022
        "chr": stat.S_IFCHR | 0o640,
        "blk": stat.S_IFBLK | 0o604,
    }

    def check(root: Path) -> None:
        for kind, mode in expected.items():
            st = os.lstat(root / kind)
            assert (st.st_mode, st.st_size) == (mode, 0), kind
            assert st.st_rdev == RDEV.get(kind, 0), kind
        ls = subprocess.run(["ls", "-l", str(root)], capture_output=True, text=True, check=True)
        lines = {line.split()[-1]: line for line in ls.stdout.splitlines()[1:]}
        assert [lines[k][0] for k in ("reg", "fifo", "sock", "chr", "blk")] == list("-pscb")
        assert re.search(r" 4,\s+1 ", lines["chr"]), lines["chr"]
        assert re.search(r" 259,\s+70000 ", lines["blk"]), lines["blk"]

    check(m.path)
    for kind, mode in expected.items():
        assert body(s3, bucket, kind) == b""
        md = meta(s3, bucket, kind)
        assert md["mode"] == str(mode), kind  # decimal st_mode, as s3fs writes it
        assert md.get("rdev") == (str(RDEV[kind]) if kind in RDEV else None), kind
    assert meta(s3, bucket, "fifo")["mode"] == "4516"  # s3fs's spelling of a 0644 FIFO
    assert m.unmount() == 0
    check(mount(bucket).path)


def test_special_files_written_by_s3fs_and_rclone(s3: Any, bucket: str, mount: Callable) -> None:
    """Objects s3fs (decimal mode, no rdev) and rclone (octal mode) wrote show their type."""
    s3.put_object(Bucket=bucket, Key="s3fs-fifo", Body=b"", Metadata={"mode": "4516"})
    s3.put_object(Bucket=bucket, Key="s3fs-chr", Body=b"", Metadata={"mode": "8612"})
    s3.put_object(Bucket=bucket, Key="rclone-fifo", Body=b"", Metadata={"mode": "10600"})
    s3.put_object(Bucket=bucket, Key="sock", Body=b"", Metadata={"mode": "49645"})
    m = mount(bucket)
    assert os.lstat(m.path / "s3fs-fifo").st_mode == stat.S_IFIFO | 0o644
    st = os.lstat(m.path / "s3fs-chr")
    assert (st.st_mode, st.st_rdev) == (stat.S_IFCHR | 0o644, 0)
    assert os.lstat(m.path / "rclone-fifo").st_mode == stat.S_IFIFO | 0o600
    assert stat.S_ISSOCK(os.lstat(m.path / "sock").st_mode)


def test_fifo_on_the_mount_is_a_pipe(bucket: str, mount: Callable) -> None:
    """Opening a FIFO is the kernel's business: bytes written come out at the reader."""
    m = mount(bucket, *STRICT)
    fifo = m.path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    with open(fifo, "wb") as w:
        w.write(b"through the pipe")
    reader.join(10)
    assert got == [b"through the pipe"]
    assert os.lstat(fifo).st_size == 0


@pytest.mark.parametrize("kind", ["reg", "dir", "link", "fifo", "sock", "chr", "blk"])
def test_each_file_type_cascade(s3: Any, bucket: str, mount: Callable, kind: str) -> None:
    """What pjdfstest does with each type: create, chmod, chown, utimensat, EEXIST for
    O_CREAT|O_EXCL / symlink / mkdir / mknod over it, rename, remount, unlink or rmdir."""
    m = mount(bucket, "--upload-delay", "1")
    p = m.path / "x"
    MAKERS[kind](p)
    assert stat.S_IFMT(os.lstat(p).st_mode) == TYPE_BITS[kind]
    if kind != "link":  # Linux has no lchmod; a symlink's mode is always 0777
        os.chmod(p, 0o640)
        assert stat.S_IMODE(os.lstat(p).st_mode) == 0o640
    os.lchown(p, 1234, 5678)
    os.utime(p, ns=(ATIME, MTIME), follow_symlinks=False)
    st = os.lstat(p)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert (st.st_atime_ns, st.st_mtime_ns) == (ATIME, MTIME)
    expect_errno(errno.EEXIST, os.open, p, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    expect_errno(errno.EEXIST, os.symlink, "t", p)
    expect_errno(errno.EEXIST, os.mkdir, p)
    expect_errno(errno.EEXIST, os.mkfifo, p)
    os.rename(p, m.path / "y")
    assert not os.path.lexists(p)
    assert m.unmount() == 0

    m2 = mount(bucket)
    y = m2.path / "y"
    st = os.lstat(y)
    assert stat.S_IFMT(st.st_mode) == TYPE_BITS[kind]
    if kind not in ("link", "dir"):  # SeaweedFS drops metadata on directory markers
        assert stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_rdev == RDEV.get(kind, 0)
    if kind != "dir":
        assert (st.st_uid, st.st_gid) == (1234, 5678)
        assert st.st_mtime_ns == MTIME
    if kind == "dir":
        expect_errno(errno.EISDIR, os.unlink, y)
        os.rmdir(y)
    else:
        expect_errno(errno.ENOTDIR, os.rmdir, y)
        os.unlink(y)
    assert not os.path.lexists(y)
    assert m2.unmount() == 0
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])] == []


def test_rename_between_all_file_types(bucket: str, mount: Callable) -> None:
    """rename(2) of each type over each type gives the POSIX answer: a non-directory over
    a directory EISDIR, a directory over a non-directory ENOTDIR, over a non-empty
    directory ENOTEMPTY; otherwise the target is replaced and the source keeps its type."""
    m = mount(bucket, *STRICT)
    kinds = list(MAKERS)
    for src_kind in kinds:
        for dst_kind in kinds:
            d = m.path / f"{src_kind}-over-{dst_kind}"
            d.mkdir()
            src, dst = d / "src", d / "dst"
            MAKERS[src_kind](src)
            MAKERS[dst_kind](dst)
            if src_kind != "dir" and dst_kind == "dir":
                expect_errno(errno.EISDIR, os.rename, src, dst)
            elif src_kind == "dir" and dst_kind != "dir":
                expect_errno(errno.ENOTDIR, os.rename, src, dst)
            else:
                os.rename(src, dst)
                assert not os.path.lexists(src)
                assert stat.S_IFMT(os.lstat(dst).st_mode) == TYPE_BITS[src_kind]
                assert os.lstat(dst).st_rdev == RDEV.get(src_kind, 0)
                assert sorted(os.listdir(d)) == ["dst"]
    full = m.path / "full"
    full.mkdir()
    (full / "f").write_bytes(b"x")
    (m.path / "empty").mkdir()
    expect_errno(errno.ENOTEMPTY, os.rename, m.path / "empty", full)
    assert m.unmount() == 0
    m2 = mount(bucket)
    for src_kind in kinds:
        for dst_kind in kinds:
            d = m2.path / f"{src_kind}-over-{dst_kind}"
            if (src_kind == "dir") == (dst_kind == "dir"):
                assert sorted(os.listdir(d)) == ["dst"], d
                assert stat.S_IFMT(os.lstat(d / "dst").st_mode) == TYPE_BITS[src_kind], d
            else:
                assert sorted(os.listdir(d)) == ["dst", "src"], d


# --------------------------------------------------------------------------- xattr names
def getfattr(*args: str) -> subprocess.CompletedProcess[str]:
    """getfattr, silent about the absolute paths it is given: stderr holds only errors."""
    cmd = ["getfattr", "--absolute-names", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_xattr_names_without_namespace(s3: Any, bucket: str, mount: Callable) -> None:
    """Linux passes FUSE every xattr name (its FUSE handler has an empty prefix), so names
    without a namespace, like the "key1" s3fs's tests set through its API, are stored and
    shown verbatim; security.*, system.* and trusted.* are never stored nor shown, and a
    header another tool wrote keeps them. (Before: ENOTSUP for "key1", and a bucket
    written by s3fs showed none of its names outside user.*.)"""
    header = fmt.encode_xattrs(
        {"key1": b"value1", "user.a": b"A", "security.selinux": b"ctx", "trusted.t": b"T"}
    )
    s3.put_object(Bucket=bucket, Key="from-s3fs", Body=b"x", Metadata={"xattr": header})
    m = mount(bucket, *STRICT)
    old = m.path / "from-s3fs"
    assert sorted(os.listxattr(old)) == sorted(
        ["key1", "user.a", "user.fbmount.etag", "user.fbmount.content_type"]
        + ["user.fbmount.storage_class", "user.fbmount.url"]
    )
    assert os.getxattr(old, "key1") == b"value1"
    # Not supported here (setxattr refuses them too), even where the header has them.
    expect_errno(errno.ENOTSUP, os.getxattr, old, "security.selinux")
    expect_errno(errno.ENOTSUP, os.getxattr, old, "trusted.t")
    os.setxattr(old, "key2", b"two")
    sync_path(old)
    stored = fmt.decode_xattrs(meta(s3, bucket, "from-s3fs")["xattr"])
    assert stored == {
        "key1": b"value1",
        "key2": b"two",
        "user.a": b"A",
        "security.selinux": b"ctx",  # kept as the other tool wrote it
        "trusted.t": b"T",
    }

    f = m.path / "new"
    write_file(f, b"y")
    subprocess.run(["setfattr", "-n", "key1", "-v", "v1", str(f)], check=True)
    subprocess.run(["setfattr", "-n", "os2.name", "-v", "v2", str(f)], check=True)
    assert os.getxattr(f, "key1") == b"v1"
    assert {"key1", "os2.name"} <= set(os.listxattr(f))
    for refused in ("security.x", "trusted.x", "system.x"):
        expect_errno(errno.ENOTSUP, os.setxattr, f, refused, b"v")
    expect_errno(errno.EPERM, os.setxattr, f, "user.fbmount.etag", b"forged")
    expect_errno(errno.EPERM, os.removexattr, f, "user.fbmount.etag")
    os.removexattr(f, "os2.name")
    expect_errno(errno.ENODATA, os.getxattr, f, "os2.name")
    sync_path(f)
    assert fmt.decode_xattrs(meta(s3, bucket, "new")["xattr"]) == {"key1": b"v1"}

    fifo = m.path / "fifo"
    os.mkfifo(fifo)
    os.setxattr(fifo, "key1", b"on a fifo")  # user.* is refused by the kernel there
    expect_errno(errno.EPERM, os.setxattr, fifo, "user.x", b"v")
    assert os.listxattr(fifo) == ["key1"]
    assert m.unmount() == 0
    m2 = mount(bucket)
    assert os.getxattr(m2.path / "new", "key1") == b"v1"
    assert os.getxattr(m2.path / "fifo", "key1") == b"on a fifo"


def test_getfattr_dump_prints_no_error(s3: Any, bucket: str, mount: Callable) -> None:
    """listxattr names only what getxattr answers: `getfattr -d` (user.*) and
    `getfattr -d -m -` (every name) of a file, a directory and the bucket root print no
    error. (Before: user.fbmount.url was listed for directories and the root, then
    refused.)"""
    s3.put_object(Bucket=bucket, Key="dir/file.txt", Body=b"x")
    m = mount(bucket, *STRICT)
    (m.path / "made").mkdir()
    os.setxattr(m.path / "made", "user.color", b"red")
    for path in (m.path, m.path / "dir", m.path / "made", m.path / "dir" / "file.txt"):
        for args in (("-d",), ("-d", "-m", "-")):
            r = getfattr(*args, str(path))
            assert (r.returncode, r.stderr) == (0, ""), (path, args, r)
    assert 'user.color="red"' in getfattr("-d", str(m.path / "made")).stdout
    assert "user.fbmount.etag=" in getfattr("-d", str(m.path / "dir" / "file.txt")).stdout


def test_getfattr_dump_on_an_account_mount(auth_server: Any, mount: Callable) -> None:
    """The bucket root of an account mount lists user.fbmount.acl and friends, and answers
    each of them."""
    s3 = make_s3_client(auth_server.endpoint)
    name = unique_bucket_name("posix-acct")
    s3.create_bucket(Bucket=name)
    try:
        warm_bucket(s3, name)
        m = mount("--all-buckets", endpoint=auth_server.endpoint)
        for path in (m.path, m.path / name):
            r = getfattr("-d", "-m", "-", str(path))
            assert (r.returncode, r.stderr) == (0, ""), (path, r)
        assert "user.fbmount.acl=" in getfattr("-d", str(m.path / name)).stdout
    finally:
        s3.delete_bucket(Bucket=name)


# --------------------------------------------------------------------------- long names
def test_names_longer_than_255_bytes(s3: Any, bucket: str, mount: Callable) -> None:
    """Linux passes FUSE names up to PATH_MAX, so keys with segments over 255 bytes are
    shown (not hidden) and made, up to S3's 1,024-byte key; statvfs says 1,024; past the
    key limit ENAMETOOLONG. (Before: hidden, and ENAMETOOLONG from 256 bytes.)"""
    long_key = "d/" + "k" * 300
    s3.put_object(Bucket=bucket, Key=long_key, Body=b"written by another tool")
    m = mount(bucket, *STRICT)
    assert os.statvfs(m.path).f_namemax == 1024
    assert os.listdir(m.path / "d") == ["k" * 300]
    assert read_file(m.path / long_key) == b"written by another tool"
    ls = subprocess.run(["ls", "-l", str(m.path / "d")], capture_output=True, text=True)
    assert ls.returncode == 0 and "k" * 300 in ls.stdout, ls

    name300 = "é" * 150  # 300 bytes of UTF-8
    write_file(m.path / name300, b"made through the mount")
    assert body(s3, bucket, name300) == b"made through the mount"
    (m.path / ("D" * 400)).mkdir()
    write_file(m.path / ("D" * 400) / ("f" * 500), b"deep")
    assert body(s3, bucket, "D" * 400 + "/" + "f" * 500) == b"deep"
    # The whole key counts: 1,024 bytes at most ('/' of a directory marker included).
    write_file(m.path / ("a" * 1024), b"max")
    expect_errno(errno.ENAMETOOLONG, write_file, m.path / ("b" * 1025), b"")
    write_file(m.path / "d" / ("c" * 1022), b"max in d")
    expect_errno(errno.ENAMETOOLONG, write_file, m.path / "d" / ("c" * 1023), b"")
    (m.path / ("e" * 1023)).mkdir()
    expect_errno(errno.ENAMETOOLONG, os.mkdir, m.path / ("e" * 1024))
    expect_errno(errno.ENAMETOOLONG, os.rename, m.path / name300, m.path / "d" / ("g" * 1023))
    expect_errno(errno.ENAMETOOLONG, os.stat, m.path / ("z" * 1500))
    assert body(s3, bucket, "a" * 1024) == b"max"
    assert body(s3, bucket, "d/" + "c" * 1022) == b"max in d"
    assert m.unmount() == 0
    m2 = mount(bucket)
    names = set(os.listdir(m2.path))
    assert {name300, "D" * 400, "a" * 1024, "e" * 1023} <= names
    assert sorted(os.listdir(m2.path / "d")) == ["c" * 1022, "k" * 300]
    assert read_file(m2.path / ("D" * 400) / ("f" * 500)) == b"deep"


# --------------------------------------------------------------------------- small points
def test_rename_updates_ctime(bucket: str, mount: Callable) -> None:
    """rename(2) changes the moved inode's ctime (not its mtime): a staged file, a stored
    file and a directory. (Before: ctime kept.)"""
    m = mount(bucket, "--upload-delay", "30")
    staged, stored, d = m.path / "staged", m.path / "stored", m.path / "dir"
    write_file(staged, b"s")
    write_file(stored, b"t")
    sync_path(stored)
    d.mkdir()
    for p in (staged, stored, d):
        os.utime(p, ns=(1_000_000_000 * 10**9, 1_000_000_000 * 10**9))
    sync_path(stored)  # its metadata too: a stored file with nothing staged
    before = {p.name: os.lstat(p) for p in (staged, stored, d)}
    time.sleep(0.05)
    start = time.time_ns()
    for p in (staged, stored, d):
        os.rename(p, p.with_name(p.name + "-moved"))
    for name, old in before.items():
        new = os.lstat(m.path / f"{name}-moved")
        assert new.st_ctime_ns >= start > old.st_ctime_ns, name
        assert new.st_mtime_ns == old.st_mtime_ns == 1_000_000_000 * 10**9, name
    assert m.unmount() == 0  # the staged file's upload carries the new ctime
    assert os.lstat(mount(bucket).path / "staged-moved").st_ctime_ns >= start


def test_path_through_a_file_is_enotdir(s3: Any, bucket: str, mount: Callable) -> None:
    """open/stat/mkdir of "file/x" give ENOTDIR (a fresh mount, nothing cached)."""
    s3.put_object(Bucket=bucket, Key="file", Body=b"x")
    m = mount(bucket, *STRICT)
    os.mkfifo(m.path / "fifo")
    os.symlink("file", m.path / "link")
    for base in ("file", "fifo", "link"):
        p = m.path / base / "x"
        expect_errno(errno.ENOTDIR, os.stat, p)
        expect_errno(errno.ENOTDIR, os.open, p, os.O_RDONLY)
        expect_errno(errno.ENOTDIR, os.open, p, os.O_CREAT | os.O_WRONLY)
        expect_errno(errno.ENOTDIR, os.mkdir, p)
        expect_errno(errno.ENOTDIR, os.rename, m.path / "file", p)
    expect_errno(errno.ENOENT, os.stat, m.path / "missing" / "x")


def test_mkdir_where_a_stored_file_was_just_unlinked(s3: Any, bucket: str, mount: Callable) -> None:
    """unlink of a stored file queues its DeleteObject (write-back mode); a mkdir of the
    same name right after, or a rename of a directory to it, must not fail. SeaweedFS and
    MinIO refuse the marker `x/` while the object `x` exists, so the queued delete goes
    first. (Before: EIO; pjdfstest's chown/00.t, chmod/00.t and rename/09.t lost about
    150 cases to it.)"""
    s3.put_object(Bucket=bucket, Key="x", Body=b"file")
    s3.put_object(Bucket=bucket, Key="y", Body=b"file")
    s3.put_object(Bucket=bucket, Key="z", Body=b"file")  # a directory is renamed onto it
    m = mount(bucket)
    os.unlink(m.path / "x")
    os.mkdir(m.path / "x")
    os.mkfifo(m.path / "y2")
    os.unlink(m.path / "y")
    os.mkdir(m.path / "y", 0o700)
    assert stat.S_ISDIR(os.lstat(m.path / "x").st_mode)
    assert stat.S_IMODE(os.lstat(m.path / "y").st_mode) == 0o700
    os.mkdir(m.path / "d")
    write_file(m.path / "d" / "f", b"in d")
    os.unlink(m.path / "z")
    os.rename(m.path / "d", m.path / "z")
    assert read_file(m.path / "z" / "f") == b"in d"
    sync_path(m.path / "z" / "f")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}
    assert {"x/", "y/", "z/", "z/f"} <= keys and not {"x", "y", "z"} & keys


def test_entry_changes_update_the_directory_times(bucket: str, mount: Callable) -> None:
    """POSIX: creating, removing or renaming an entry marks the directory's mtime and ctime
    (pjdfstest checks it after every create, mkdir, mknod, symlink, unlink, rmdir and
    rename). Kept in this mount's view; an open of an existing name changes nothing.
    (Before: the directory kept the time it was first seen with.)"""
    m = mount(bucket)
    d, other = m.path / "d", m.path / "other"
    d.mkdir()
    other.mkdir()
    write_file(d / "existing", b"x")
    steps: list[tuple[str, Callable[[], Any], list[Path]]] = [
        ("create", lambda: os.close(os.open(d / "f", os.O_CREAT | os.O_WRONLY, 0o644)), [d]),
        ("mkdir", lambda: os.mkdir(d / "sub"), [d]),
        ("mkfifo", lambda: os.mkfifo(d / "fifo"), [d]),
        ("symlink", lambda: os.symlink("f", d / "link"), [d]),
        ("rename", lambda: os.rename(d / "f", other / "f"), [d, other]),
        ("unlink", lambda: os.unlink(d / "fifo"), [d]),
        ("rmdir", lambda: os.rmdir(d / "sub"), [d]),
    ]
    for what, step, dirs in steps:
        before = {p: os.stat(p) for p in dirs}
        time.sleep(0.01)  # the clock moves on (ns resolution): not a wait for fbmount
        step()
        for p, old in before.items():
            new = os.stat(p)
            assert new.st_mtime_ns > old.st_mtime_ns, (what, p.name)
            assert new.st_ctime_ns > old.st_ctime_ns, (what, p.name)
    before = os.stat(d)
    os.close(os.open(d / "existing", os.O_CREAT | os.O_RDONLY))
    assert os.stat(d).st_mtime_ns == before.st_mtime_ns


def test_rename_of_a_stored_file_stores_the_new_ctime(
    s3: Any, bucket: str, mount: Callable
) -> None:
    """A stored file with nothing staged is renamed by CopyObject: the copy carries the new
    ctime (and keeps mode, owner, mtime and xattrs). (Before: the copy kept the old
    x-amz-meta-ctime, so the next mount showed the ctime from before the rename.)"""
    s3.put_object(
        Bucket=bucket,
        Key="stored",
        Body=b"t",
        Metadata={"mode": str(stat.S_IFREG | 0o640), "mtime": "1000000000", "uid": "7"},
    )
    m = mount(bucket)
    os.setxattr(m.path / "stored", "user.k", b"v")
    sync_path(m.path / "stored")
    start = time.time_ns()
    os.rename(m.path / "stored", m.path / "moved")
    stored = meta(s3, bucket, "moved")
    assert float(stored["ctime"]) * 1e9 >= start - 1e6  # float: 9-digit fraction
    assert stored["mode"] == str(stat.S_IFREG | 0o640) and stored["uid"] == "7"
    assert int(float(stored["mtime"])) == 1_000_000_000
    assert m.unmount() == 0
    m2 = mount(bucket)
    assert os.lstat(m2.path / "moved").st_ctime_ns >= start - 1_000_000
    assert os.getxattr(m2.path / "moved", "user.k") == b"v"


def test_bucket_root_setxattr_is_refused_and_chmod_kept_in_view(
    bucket: str, mount: Callable
) -> None:
    """The bucket root of a one-bucket mount has no object to carry metadata. setxattr
    fails with EPERM instead of reporting a success the next mount forgets. chmod, chown
    and utime are kept in this mount's view (rsync -a and cp -a into the mount root must
    not fail) and logged once as not stored; the next mount shows -o umask/uid/gid again.
    (Before: setxattr reported success and stored nothing, and nothing said so.)"""
    m = mount(bucket, "-o", "umask=022")
    root = m.path
    expect_errno(errno.EPERM, os.setxattr, root, "user.k", b"v")
    assert "user.k" not in os.listxattr(root)
    os.chmod(root, 0o700)
    os.chown(root, 1234, 1234)
    os.utime(root, ns=(ATIME, MTIME))
    st = os.stat(root)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_mtime_ns) == (0o700, 1234, MTIME)
    os.mkdir(root / "d")  # a directory below has a marker to carry xattrs
    os.setxattr(root / "d", "user.k", b"v")
    assert os.getxattr(root / "d", "user.k") == b"v"
    assert m.unmount() == 0
    assert "not stored in S3" in m.log_text()
    m2 = mount(bucket, "-o", "umask=022")
    st = os.stat(m2.path)
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o755, 0)


def test_other_tools_metadata_survives_rename_chmod_and_rewrite(
    s3: Any, bucket: str, mount: Callable
) -> None:
    """x-amz-meta-* keys fbmount does not interpret (rclone's md5chksum and btime, other
    tools' own keys) are kept by a rename and a chmod (same bytes); a rewrite of the data
    drops md5chksum, which described the old bytes. (Before: a chmod dropped them all,
    and so would the rename that now replaces the metadata to store the new ctime.)"""
    extra = {"md5chksum": "abc=", "btime": "2020-01-01T00:00:00Z", "owner-tool": "x"}
    s3.put_object(Bucket=bucket, Key="f", Body=b"data", Metadata=extra)
    m = mount(bucket)
    os.rename(m.path / "f", m.path / "g")
    assert extra.items() <= meta(s3, bucket, "g").items()
    os.chmod(m.path / "g", 0o600)
    sync_path(m.path / "g")
    stored = meta(s3, bucket, "g")
    assert extra.items() <= stored.items() and stat.S_IMODE(int(stored["mode"])) == 0o600
    write_file(m.path / "g", b"new data")
    sync_path(m.path / "g")
    stored = meta(s3, bucket, "g")
    assert "md5chksum" not in stored
    assert stored["btime"] == extra["btime"] and stored["owner-tool"] == "x"
    os.chmod(m.path / "g", 0o640)  # a later metadata-only update does not bring it back
    sync_path(m.path / "g")
    assert "md5chksum" not in meta(s3, bucket, "g")
