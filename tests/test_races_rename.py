"""Races around rename and open readers (issue #15), each forced into its bad interleaving.

The fault proxy's `hold` action keeps one chosen request (or its answer) until the test
lets it go, so the mount is caught exactly between two steps: parts of a stream in flight
while the file is renamed and its old name reused; the old key's DELETE of a rename in
flight when the daemon is killed; a reader half-way through an object that changes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import Mount, MountFactory
from faultproxy import FaultProxy, Rule
from helpers import body, exists, open_uploads, wait_for, write_file

MIB = 1 << 20
PART = ("--part-size", "5")


def data_of(n: int, seed: int) -> bytes:
    """`n` bytes that differ for each seed (and from one MiB to the next)."""
    block = bytes((i * 7 + seed) % 251 for i in range(65536 + seed))
    return (block * (n // len(block) + 1))[:n]


def kill9_during_rename(m: Mount, src: Path, dst: Path, held: Rule, what: str) -> None:
    """Rename `src` to `dst` in a thread, wait until the proxy holds `held` (sent by the
    rename), SIGKILL the daemon there, and make sure the rename's caller returned (with
    an error: its mount died under it)."""

    def rename() -> None:
        with contextlib.suppress(OSError):
            os.rename(src, dst)

    mover = threading.Thread(target=rename, daemon=True)
    mover.start()
    assert held.wait_held(30), f"the rename sent no {what}"
    m.kill9()
    mover.join(10)
    assert not mover.is_alive()


def sync(run_fbmount: Callable[..., Any], mnt: Path) -> None:
    """`fbmount sync`: returns once everything written so far is in S3."""
    r = run_fbmount("sync", str(mnt), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# --------------------------------------------------------------------------- race 2
@pytest.mark.parametrize(
    ("old", "new"), [("a", "b"), ("d/a", "e/a")], ids=["file-renamed", "dir-renamed"]
)
def test_streamed_file_renamed_while_parts_fly_and_old_name_reused(
    s3: Any,
    bucket: str,
    mount: MountFactory,
    s3_endpoint: str,
    run_fbmount: Callable,
    old: str,
    new: str,
) -> None:
    """dd into `a` (streamed), `mv a b`, `echo hi > a`: both files must survive.

    A stream is a multipart upload bound to the key it began under. Held here: one part
    (so parts are in flight during the mv and the new write) and any completion under the
    old name until the new `a` is stored, the order in which a stream completing under
    its old name would overwrite (and its cleanup delete) the new file. The same holds
    when the file moves with its directory (`mv d e; mkdir d; echo hi > d/a`).
    """
    data = data_of(16 * MIB, 1)
    with FaultProxy(s3_endpoint) as proxy:
        part = proxy.add_rule(kind="UploadPart", action="hold", times=1)
        old_name_done = proxy.add_rule(
            kind="CompleteMultipartUpload",
            action="hold",
            where=lambda info: info.key == old,
        )
        m = mount(bucket, *PART, "--upload-delay", "60", endpoint=proxy.endpoint)
        if "/" in old:
            (m.path / old).parent.mkdir()
        write_file(m.path / old, data)
        assert part.wait_held(), "no part of the stream was sent"
        if "/" in old:
            os.rename((m.path / old).parent, (m.path / new).parent)
            (m.path / old).parent.mkdir()
        else:
            os.rename(m.path / old, m.path / new)
        (m.path / old).write_bytes(b"hi\n")
        part.release()

        with ThreadPoolExecutor(1) as pool:
            syncing = pool.submit(sync, run_fbmount, m.path)
            wait_for(
                lambda: f"/{bucket}/{old}" in proxy.paths("PutObject") or syncing.done(),
                f"the new `{old}` to be stored",
                timeout=60,
            )
            old_name_done.release()
            syncing.result(timeout=120)
        assert (m.path / new).read_bytes() == data
        assert m.unmount() == 0
    assert body(s3, bucket, old) == b"hi\n"
    assert body(s3, bucket, new) == data
    assert open_uploads(s3, bucket) == []


# --------------------------------------------------------------------------- race 9
@pytest.mark.parametrize(
    ("case", "phase"),
    [("dirty", "request"), ("clean-open", "response")],
    ids=["dirty-delete-unsent", "clean-open-delete-done"],
)
def test_kill9_during_rename_of_staged_file_already_in_s3(
    s3: Any, bucket: str, mount: MountFactory, s3_endpoint: str, case: str, phase: str
) -> None:
    """A staged file whose object is in S3 is renamed; the daemon dies while the old key's
    DELETE is held. The file must come back under the new name after a remount.

    dirty: changed since its upload, DELETE not yet forwarded. clean-open: uploaded and
    still open (so its journal record was retired), DELETE done by the server, answer
    held. The old name may keep an older copy, but the file is never lost.
    """
    first, second = data_of(3 * MIB, 2), data_of(2 * MIB + 7, 3)
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--upload-delay", "60", endpoint=proxy.endpoint)
        fd = os.open(m.path / "a", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.write(fd, first)
            os.fsync(fd)  # in S3 now: the rename must delete the old key
            if case == "dirty":
                os.ftruncate(fd, 0)
                os.pwrite(fd, second, 0)
                os.close(fd)  # journaled on local disk, upload not yet due
                fd = -1
            assert body(s3, bucket, "a") == first
            delete = proxy.add_rule(
                kind=("DeleteObject", "DeleteObjects"), action="hold", phase=phase, times=1
            )
            kill9_during_rename(m, m.path / "a", m.path / "b", delete, "a delete of the old key")
        finally:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass  # its mount died with the daemon
        # At the crash the old name still held the first upload where the DELETE was not
        # forwarded yet, and nothing where the server had done it.
        assert body(s3, bucket, "a") == (first if phase == "request" else None)
        proxy.clear_rules()
        delete.release()  # the dead daemon's request goes on (and may delete the old key)
        # Same endpoint, same cache dir: the staging directory of that mount.
        again = mount(bucket, cache_dir=m.cache_dir, mountpoint=m.path, endpoint=proxy.endpoint)
        expected = second if case == "dirty" else first
        assert (again.path / "b").read_bytes() == expected
        again.sync()  # recovery serves the staged copy and uploads it in the background
        assert body(s3, bucket, "b") == expected
        assert body(s3, bucket, "a") in (None, first)  # never a copy that is not the file's
        assert again.unmount() == 0
    assert body(s3, bucket, "b") == expected


# --------------------------------------------------------------------------- race 5
KERNEL_READ = 128 * 1024


@pytest.mark.parametrize("learn", ["second-open", "ls-l"])
def test_open_reader_never_mixes_versions(
    s3: Any, bucket: str, mount: MountFactory, learn: str
) -> None:
    """An object changes behind the mount while a reader is half-way through it, and the
    mount learns the new ETag (a second open that reads it, or `ls -l` after the TTLs).
    The first reader keeps its version: every read gives the old bytes or EIO, never
    bytes of the new version.

    --read-ahead 8 keeps at most two 8 MiB chunks fetched ahead, so the last of three
    is fetched after the change: its If-Match must fail.
    """
    old, new = os.urandom(24 * MIB), os.urandom(24 * MIB)
    s3.put_object(Bucket=bucket, Key="obj", Body=old)
    m = mount(bucket, "--attr-ttl", "1", "--dir-ttl", "1", "--read-ahead", "8")
    path = m.path / "obj"
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, KERNEL_READ, 0) == old[:KERNEL_READ]
        new_etag = s3.put_object(Bucket=bucket, Key="obj", Body=new)["ETag"].strip('"')

        def mount_learnt() -> bool:
            if learn == "second-open":
                with open(path, "rb", buffering=0) as f:  # open after --attr-ttl: HEAD
                    return f.read(KERNEL_READ) == new[:KERNEL_READ]
            os.listdir(m.path)  # ls -l: a fresh listing once --dir-ttl has passed
            os.stat(path)
            return os.getxattr(path, "user.fbmount.etag").decode() == new_etag

        wait_for(mount_learnt, "the mount to learn the new ETag")
        eio = 0
        for off in range(KERNEL_READ, len(old), KERNEL_READ):
            try:
                got = os.pread(fd, KERNEL_READ, off)
            except OSError as e:
                assert e.errno == errno.EIO, e
                eio += 1
                continue
            assert got == old[off : off + KERNEL_READ], f"bytes of another version at {off}"
        assert eio > 0, "every chunk was fetched before the change: If-Match never tested"
    finally:
        os.close(fd)
    assert path.read_bytes() == new  # a new open reads the new version whole
    assert m.unmount() == 0


def test_open_reader_follows_renames_made_through_the_mount(
    s3: Any, bucket: str, mount: MountFactory
) -> None:
    """The mount's own renames (of the file, of its directory) move the object under an
    open reader: it goes on reading the same bytes under the new key."""
    data = os.urandom(24 * MIB)
    s3.put_object(Bucket=bucket, Key="d/obj", Body=data)
    m = mount(bucket, "--read-ahead", "8")
    fd = os.open(m.path / "d" / "obj", os.O_RDONLY)
    try:
        assert os.pread(fd, KERNEL_READ, 0) == data[:KERNEL_READ]
        os.rename(m.path / "d" / "obj", m.path / "d" / "moved")
        assert os.pread(fd, KERNEL_READ, 12 * MIB) == data[12 * MIB : 12 * MIB + KERNEL_READ]
        os.rename(m.path / "d", m.path / "e")
        rest = os.pread(fd, len(data), 20 * MIB)
        assert rest == data[20 * MIB :]
    finally:
        os.close(fd)
    assert body(s3, bucket, "e/moved") == data
    assert m.unmount() == 0


# --------------------------------------------------------------------------- race 11
def test_kill9_during_directory_rename_loses_nothing(
    s3: Any, bucket: str, mount: MountFactory, s3_endpoint: str
) -> None:
    """`mv d e` copies every stored key below d and deletes the old ones; the daemon dies
    once the server has done that delete (its answer held). Staged files below d keep
    their bytes only on local disk: their journal records must name the new keys before
    the old keys go, or a crash loses them.

    open: uploaded and still open (its record was retired, its bytes are not copied: the
    local copy goes up under the new key). dirty: changed since its upload. meta: a chmod
    of a stored file, not yet applied in S3. After the remount each is under e with its
    last content and mode; the old names may keep older copies, never newer ones.
    """
    stored, changed, opened = data_of(1 * MIB + 3, 4), data_of(200_000, 5), data_of(70_000, 6)
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--upload-delay", "60", endpoint=proxy.endpoint)
        d = m.path / "d"
        d.mkdir()
        for name in ("dirty", "meta"):
            with open(d / name, "wb") as f:
                f.write(stored)
                os.fsync(f.fileno())
        (d / "dirty").write_bytes(changed)  # journaled at close, not uploaded (delay 60)
        os.chmod(d / "meta", 0o600)  # journaled, not applied in S3 yet
        fd = os.open(d / "open", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.write(fd, opened)
            os.fsync(fd)  # in S3, clean; held open, so still staged
            delete = proxy.add_rule("DeleteObjects", "hold", phase="response", times=1)
            kill9_during_rename(m, d, m.path / "e", delete, "a DeleteObjects")
        finally:
            try:
                os.close(fd)
            except OSError:
                pass  # its mount died with the daemon
        proxy.clear_rules()
        delete.release()
        again = mount(bucket, cache_dir=m.cache_dir, mountpoint=m.path, endpoint=proxy.endpoint)
        again.sync()  # recovery uploads what was journaled
        e = again.path / "e"
        assert (e / "open").read_bytes() == opened
        assert (e / "dirty").read_bytes() == changed
        assert (e / "meta").read_bytes() == stored
        assert stat.S_IMODE(os.stat(e / "meta").st_mode) == 0o600
        assert body(s3, bucket, "e/open") == opened
        assert body(s3, bucket, "e/dirty") == changed
        assert s3.head_object(Bucket=bucket, Key="e/meta")["Metadata"].get("mode") == str(
            stat.S_IFREG | 0o600
        )
        for name, older in (("open", (opened,)), ("dirty", (stored, changed)), ("meta", (stored,))):
            assert body(s3, bucket, f"d/{name}") in (None, *older)
        assert again.unmount() == 0


# --------------------------------------------------------------------------- race 11
def test_chmod_renamed_while_a_sync_waits_to_upload_it(
    s3: Any,
    bucket: str,
    mount: MountFactory,
    s3_endpoint: str,
    run_fbmount: Callable[..., Any],
) -> None:
    """`chmod 700 a` (a file only in S3: a metadata-only change), `mv a b` and a `fbmount
    sync` that started while the rename's copy was in flight. The rename carries the new
    mode to `b` in its copy and deletes `a`; the sync, waiting for the change's lock
    meanwhile, must not then copy `a` onto itself (the crash soak saw "COPY w0/f4 → w0/f4:
    NoSuchKey" fail a sync with the daemon alive). Held: the rename's CopyObject, until the
    sync is uploading another dirty file (so it has taken the chmod as a target too)."""
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--upload-delay", "60", endpoint=proxy.endpoint)
        write_file(m.path / "a", b"only in S3")
        m.sync()  # uploaded and closed: `a` is no longer staged
        os.chmod(m.path / "a", 0o700)  # staged: a metadata-only change, not yet uploaded
        (m.path / "y").write_bytes(b"another dirty file")
        copy = proxy.add_rule("CopyObject", "hold", where=lambda i: i.key == "b", times=1)
        put_y = proxy.add_rule("PutObject", "hold", where=lambda i: i.key == "y", times=1)
        with ThreadPoolExecutor(2) as pool:
            moving = pool.submit(os.rename, m.path / "a", m.path / "b")
            assert copy.wait_held(20), "the rename sent no CopyObject"
            syncing = pool.submit(run_fbmount, "sync", str(m.path), timeout=120)
            assert put_y.wait_held(30), "the sync did not upload y"
            copy.release()
            moving.result(timeout=30)
            put_y.release()
            r = syncing.result(timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr + m.log_text()
        assert stat.S_IMODE(os.stat(m.path / "b").st_mode) == 0o700
        assert m.unmount() == 0
    assert not exists(s3, bucket, "a")
    assert body(s3, bucket, "b") == b"only in S3"
    assert s3.head_object(Bucket=bucket, Key="b")["Metadata"].get("mode") == str(
        stat.S_IFREG | 0o700
    )


@pytest.mark.parametrize("first", ["a", "b"])
def test_directory_rename_while_its_files_uploads_end(
    s3: Any,
    bucket: str,
    mount: MountFactory,
    s3_endpoint: str,
    run_fbmount: Callable[..., Any],
    first: str,
) -> None:
    """`mv d e` while the uploads of d/a and d/b are in flight: the rename waits for each
    file's lock, and one upload ends (retiring its staged copy) while it waits for the
    other. The random-operations soak saw that rename fail with EIO (the staged copy it
    was about to lock was gone). Both orders of the uploads' ends are driven here."""
    data = {"a": b"alpha" * 1000, "b": b"beta" * 1000}
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--upload-delay", "60", endpoint=proxy.endpoint)
        m_path = m.path
        d = m_path / "d"
        d.mkdir()
        for name, body_ in data.items():
            write_file(d / name, body_)
        holds = {n: proxy.add_rule("PutObject", "hold", key=f"/d/{n}", times=1) for n in data}
        with ThreadPoolExecutor(2) as pool:
            syncing = pool.submit(run_fbmount, "sync", str(m_path), timeout=120)
            for n, rule in holds.items():
                assert rule.wait_held(20), f"the sync sent no PUT of d/{n}"
            moving = pool.submit(os.rename, d, m_path / "e")
            time.sleep(0.5)  # the rename reaches the daemon and waits for a file's lock
            holds[first].release()
            wait_for(lambda: exists(s3, bucket, f"d/{first}"), f"d/{first} stored")
            time.sleep(0.5)  # its staged copy is retired
            holds["b" if first == "a" else "a"].release()
            moving.result(timeout=60)  # EIO before the fix
            assert syncing.result(timeout=120).returncode == 0
        assert sorted(os.listdir(m_path / "e")) == ["a", "b"]
        for name, body_ in data.items():
            assert (m_path / "e" / name).read_bytes() == body_
        sync(run_fbmount, m_path)
        for name, body_ in data.items():
            assert body(s3, bucket, f"e/{name}") == body_
            assert not exists(s3, bucket, f"d/{name}")
        assert m.unmount() == 0
