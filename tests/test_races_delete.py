"""Races around the batched deletes of unlinked keys (issue #15), each forced on purpose.

An unlink in write-back mode queues its key for the next DeleteObjects batch. `fbmount
sync` promises that a delete queued before it started has been sent once it returns 0,
and the crash soak checks that an unlink acknowledged that way never comes back after a
kill -9. These tests hold one batch (or the sync itself) with the fault proxy, so that the
name is reused exactly while its delete is still queued.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import MountFactory
from faultproxy import FaultProxy
from helpers import body, exists

MIB = 1 << 20


def data_of(n: int, seed: int) -> bytes:
    """`n` bytes that differ for each seed."""
    block = bytes((i * 13 + seed) % 251 for i in range(4096 + seed))
    return (block * (n // len(block) + 1))[:n]


def fsynced(path: Path, data: bytes) -> None:
    """Write `path` and fsync it: in S3 when this returns."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def sync(run_fbmount: Callable[..., Any], mnt: Path) -> None:
    r = run_fbmount("sync", str(mnt), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("reuse", ["create", "rename-onto"])
def test_unlink_acknowledged_by_sync_stays_gone_when_the_name_is_reused(
    s3: Any,
    bucket: str,
    mount: MountFactory,
    s3_endpoint: str,
    run_fbmount: Callable[..., Any],
    reuse: str,
) -> None:
    """`rm f1`, then `fbmount sync` starts, then a new `f1` is made (created, or another
    staged file renamed onto it) before the sync has sent f1's delete, then the new f1 is
    renamed away and the daemon is killed.

    The sync returned 0, so the unlink was acknowledged: the old f1 must be gone from S3
    when it returns, and must not come back after the crash (the crash soak saw an fsync'ed
    file back). Held here: an earlier delete batch, so f1's delete stays queued, and the
    sync in its first step (a directory marker), once it has taken stock of the queue.
    """
    old, new = data_of(2 * MIB + 5, 1), data_of(70_000, 2)
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--upload-delay", "60", endpoint=proxy.endpoint)
        (m.path / "d").mkdir()
        fsynced(m.path / "f1", old)
        fsynced(m.path / "other", b"other")
        batch = proxy.add_rule("DeleteObjects", "hold", times=1)
        os.unlink(m.path / "other")
        assert batch.wait_held(20), "the unlink of `other` sent no DeleteObjects"
        os.unlink(m.path / "f1")  # queued behind the batch in flight
        os.chmod(m.path / "d", 0o700)  # a marker for the sync to store first
        marker = proxy.add_rule("PutObject", "hold", where=lambda i: i.key == "d/", times=1)
        with ThreadPoolExecutor(1) as pool:
            syncing = pool.submit(sync, run_fbmount, m.path)
            assert marker.wait_held(30), "the sync stored no directory marker"
            # Written after the sync took stock: not uploaded before the crash.
            if reuse == "create":
                (m.path / "f1").write_bytes(new)
            else:
                (m.path / "x").write_bytes(new)
                os.rename(m.path / "x", m.path / "f1")
            batch.release()
            marker.release()
            syncing.result(timeout=120)
        assert body(s3, bucket, "f1") != old, "sync returned 0 with the unlinked f1 in S3"
        assert body(s3, bucket, "f1") is None  # the new f1 is not due before the crash
        os.rename(m.path / "f1", m.path / "moved")
        m.kill9()
        again = mount(bucket, cache_dir=m.cache_dir, mountpoint=m.path, endpoint=proxy.endpoint)
        again.sync()  # recovery uploads what was journaled
        assert body(s3, bucket, "f1") is None, "the acknowledged unlink came back"
        assert not (again.path / "f1").exists()
        assert (again.path / "moved").read_bytes() == new
        assert body(s3, bucket, "moved") == new
        assert again.unmount() == 0


def test_queued_delete_is_sent_while_more_deletes_keep_coming(
    s3: Any, bucket: str, mount: MountFactory
) -> None:
    """`rm` of many files one by one (a script, rsync --delete): each unlink queues its key
    for a DeleteObjects batch sent 0.3 s later. The first key must be deleted while the
    others keep coming, not only once they stop (each new unlink used to postpone the
    whole batch, so a crash during a long `rm` loop left every unlinked object in S3)."""
    m = mount(bucket, "--upload-delay", "60")
    names = [f"k{i:02d}" for i in range(60)]
    for name in names:
        (m.path / name).write_bytes(name.encode())
    m.sync()
    os.unlink(m.path / names[0])
    for name in names[1:]:
        if not exists(s3, bucket, names[0]):
            break
        os.unlink(m.path / name)
        # Paced below the batch delay: the next unlink comes before a batch of the last
        # one alone would be due.
        time.sleep(0.1)
    else:
        pytest.fail(f"{names[0]} still in S3 after {len(names) - 1} more unlinks")
    assert m.unmount() == 0
    assert not any(exists(s3, bucket, n) for n in names[: names.index(name)])


def test_sync_is_not_failed_by_an_unlink_of_the_same_name_made_meanwhile(
    s3: Any,
    bucket: str,
    mount: MountFactory,
    s3_endpoint: str,
    run_fbmount: Callable[..., Any],
) -> None:
    """`rm K`, `fbmount sync` starts; while it uploads, K is written again, fsync'ed and
    removed again. The delete the sync waited for was sent: it must exit 0, the second
    unlink (made after it started, still queued) is no failure of it (the crash soak saw
    "1 deletion(s): not sent in time" from a sync with the daemon alive)."""
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--upload-delay", "60", endpoint=proxy.endpoint)
        (m.path / "d").mkdir()
        fsynced(m.path / "K", b"first")
        first = proxy.add_rule("DeleteObjects", "hold", times=1)
        second = proxy.add_rule("DeleteObjects", "hold", after=1, times=1)
        os.unlink(m.path / "K")
        assert first.wait_held(20), "the unlink of K sent no DeleteObjects"
        (m.path / "X").write_bytes(b"dirty when the sync starts")
        os.chmod(m.path / "d", 0o700)
        marker = proxy.add_rule("PutObject", "hold", where=lambda i: i.key == "d/", times=1)
        put_x = proxy.add_rule("PutObject", "hold", where=lambda i: i.key == "X", times=1)
        with ThreadPoolExecutor(1) as pool:
            syncing = pool.submit(run_fbmount, "sync", str(m.path), timeout=120)
            assert marker.wait_held(30), "the sync stored no directory marker"
            first.release()  # K's delete, which the sync waits for, is done
            marker.release()
            assert put_x.wait_held(30), "the sync did not upload X"
            fsynced(m.path / "K", b"second")
            os.unlink(m.path / "K")  # queued again; its batch is held
            put_x.release()
            r = syncing.result(timeout=120)
        second.release()
        assert r.returncode == 0, r.stdout + r.stderr
        assert m.unmount() == 0
    assert not exists(s3, bucket, "K")
    assert body(s3, bucket, "X") == b"dirty when the sync starts"


def test_listing_answered_before_a_delete_does_not_bring_the_name_back(
    s3: Any,
    bucket: str,
    mount: MountFactory,
    s3_endpoint: str,
    run_fbmount: Callable[..., Any],
) -> None:
    """`rm d/gone`; a listing of `d` that the server answered while the delete was still
    queued reaches the mount only after the DeleteObjects is done. The name must not come
    back (the random-operations soak saw an unlinked file listed again): by the time the
    listing is read, nothing says the key is being deleted any more."""
    s3.put_object(Bucket=bucket, Key="d/gone", Body=b"x")
    s3.put_object(Bucket=bucket, Key="d/kept", Body=b"y")
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--upload-delay", "60", "--dir-ttl", "0", endpoint=proxy.endpoint)
        assert sorted(os.listdir(m.path / "d")) == ["gone", "kept"]
        os.unlink(m.path / "d" / "gone")  # queued for a batch
        held = proxy.add_rule("ListObjects", "hold", phase="response", times=1)
        with ThreadPoolExecutor(1) as pool:
            listing = pool.submit(os.listdir, m.path / "d")
            assert held.wait_held(20), "listing d sent no LIST"
            sync(run_fbmount, m.path)  # the DeleteObjects is sent and answered
            assert not exists(s3, bucket, "d/gone")
            held.release()
            names = listing.result(timeout=60)
        assert sorted(names) == ["kept"]
        assert not (m.path / "d" / "gone").exists()
        assert m.unmount() == 0


@pytest.mark.parametrize("history", ["new", "unlinked-then-recreated"])
def test_listing_answered_before_an_upload_landed_does_not_hide_the_file(
    s3: Any,
    bucket: str,
    mount: MountFactory,
    s3_endpoint: str,
    run_fbmount: Callable[..., Any],
    history: str,
) -> None:
    """A listing of `d` that the server answered before `d/f`'s upload landed reaches
    the mount after it. `f` must stay listed: the random-operations soak saw a file whose
    upload had just finished vanish from its directory until the listing expired (the
    listing, older than the upload, was taken as proof that the key was gone; with an
    unlink and re-create, the delete sent before the PUT made it drop the name too)."""
    s3.put_object(Bucket=bucket, Key="d/kept", Body=b"y")
    if history != "new":
        s3.put_object(Bucket=bucket, Key="d/f", Body=b"old")
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--upload-delay", "60", "--dir-ttl", "0", endpoint=proxy.endpoint)
        if history != "new":
            assert sorted(os.listdir(m.path / "d")) == ["f", "kept"]
            os.unlink(m.path / "d" / "f")  # queued for a batch
        (m.path / "d" / "f").write_bytes(b"new")  # staged; its upload waits for the sync
        held = proxy.add_rule("ListObjects", "hold", phase="response", times=1)
        with ThreadPoolExecutor(1) as pool:
            listing = pool.submit(os.listdir, m.path / "d")
            assert held.wait_held(20), "listing d sent no LIST"
            sync(run_fbmount, m.path)  # the delete (if any) and the PUT are done
            assert body(s3, bucket, "d/f") == b"new"
            held.release()
            names = listing.result(timeout=60)
        assert sorted(names) == ["f", "kept"]
        assert (m.path / "d" / "f").read_bytes() == b"new"
        assert sorted(os.listdir(m.path / "d")) == ["f", "kept"]
        assert m.unmount() == 0
