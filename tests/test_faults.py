"""What fbmount does when S3 misbehaves: every fault injected by a real proxy, real mounts.

Each test puts tests/faultproxy.py between fbmount and SeaweedFS and scripts the failures
real services produce: 503 SlowDown, dropped connections, a GET body cut short, an answer
that never comes, PUTs failing for a while, a CompleteMultipartUpload whose answer is lost
after it took effect. Afterwards the bucket is read back with boto3, byte for byte: nothing
acknowledged may be lost, nothing short or wrong may reach a reader, and no multipart
upload may be left open. A syscall that could hang runs in a helper thread with a generous
bound, so a hang fails the test instead of the CI run. Also here: a full cache disk and
concurrent readers/writers.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import Mount, MountFactory
from faultproxy import FaultProxy
from helpers import (
    HANG_BOUND,
    body,
    bounded,
    journal_records,
    open_uploads,
    read_file,
    wait_for,
)

MIB = 1024 * 1024
STRICT = ("--upload-delay", "0")


# --------------------------------------------------------------------------- helpers
def data_of(size: int, seed: str) -> bytes:
    """Deterministic, incompressible-looking bytes (a shifted copy would be noticed)."""
    block = hashlib.sha256(seed.encode()).digest() * 128  # 4 KiB
    out = bytearray()
    i = 0
    while len(out) < size:
        out += hashlib.sha256(block[:64] + i.to_bytes(8, "big")).digest() + block[32:]
        i += 1
    return bytes(out[:size])


def write_file(path: Path, data: bytes) -> None:
    """open/write/close; an error from close() (strict mode upload) is raised."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[: 4 * MIB]) :]
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)


def staged_records(m: Mount) -> dict[str, dict]:
    """Journal records in the mount's staging dir, by key."""
    out = {}
    for state in m.cache_dir.iterdir():
        for record in journal_records(state / "staging").values():
            out[record["key"]] = record
    return out


def status(run_fbmount: Callable[..., Any], m: Mount) -> dict:
    r = run_fbmount("status", str(m.path), "--json", timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def assert_healthy(m: Mount) -> None:
    """The daemon still runs, the mount answers, and nothing crashed along the way."""
    assert m.proc.poll() is None, f"fbmount exited ({m.proc.returncode}):\n{m.log_text()}"
    assert bounded(os.listdir, m.path, timeout=30) is not None
    assert "Traceback" not in m.log_text(), m.log_text()


# --------------------------------------------------------------------------- transient faults
def test_slowdown_on_every_kind_of_request_is_retried(
    s3: Any, bucket: str, mount: MountFactory, s3_endpoint: str
) -> None:
    """503 SlowDown twice on PUT, UploadPart, GET, HEAD and LIST: every operation still
    succeeds (botocore's standard retries), every fault was actually hit."""
    seed = {f"seed/f{i}.bin": data_of(200_000 + i, f"seed{i}") for i in range(3)}
    for key, data in seed.items():
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    small = data_of(300_000, "small")
    big = data_of(11 * MIB + 5, "big")
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--endpoint", proxy.endpoint, *STRICT, "--part-size", "5")
        rules = {
            kind: proxy.add_rule(kind, "status", status=503, times=2)
            for kind in ("ListObjects", "HeadObject", "GetObject", "PutObject", "UploadPart")
        }
        assert sorted(bounded(os.listdir, m.path / "seed")) == ["f0.bin", "f1.bin", "f2.bin"]
        for key, data in seed.items():
            assert bounded(read_file, m.path / key) == data, key
        assert bounded(write_file, m.path / "small.bin", small) is None
        assert bounded(write_file, m.path / "big.bin", big) is None
        fired = {kind: rule.fired for kind, rule in rules.items()}
        assert fired == dict.fromkeys(rules, 2), fired
        assert body(s3, bucket, "small.bin") == small  # strict: in S3 once close() returned
        assert body(s3, bucket, "big.bin") == big
        assert_healthy(m)
        assert m.unmount() == 0
    assert not open_uploads(s3, bucket)


def test_dropped_connections_are_retried(
    s3: Any, bucket: str, mount: MountFactory, s3_endpoint: str
) -> None:
    """Connections closed without an answer, before the server saw the request (GET,
    UploadPart, PUT) and after it acted (UploadPart, PUT): retried, data intact."""
    seed = data_of(3 * MIB + 11, "seed")
    s3.put_object(Bucket=bucket, Key="seed.bin", Body=seed)
    big = data_of(16 * MIB - 3, "big")
    small = data_of(77_777, "small")
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--endpoint", proxy.endpoint, *STRICT, "--part-size", "5")
        rules = [
            proxy.add_rule("GetObject", "drop", times=2),
            proxy.add_rule("UploadPart", "drop", times=1),
            proxy.add_rule("UploadPart", "drop", phase="response", times=1),
            proxy.add_rule("PutObject", "drop", times=1),
            proxy.add_rule("PutObject", "drop", phase="response", times=1),
        ]
        assert bounded(read_file, m.path / "seed.bin") == seed
        assert bounded(write_file, m.path / "big.bin", big) is None
        assert bounded(write_file, m.path / "small.bin", small) is None
        assert [r.fired for r in rules] == [2, 1, 1, 1, 1]
        assert body(s3, bucket, "big.bin") == big
        assert body(s3, bucket, "small.bin") == small
        assert_healthy(m)
        assert m.unmount() == 0
    assert not open_uploads(s3, bucket)


def test_cut_get_body_never_reaches_the_reader(
    s3: Any, bucket: str, mount: MountFactory, s3_endpoint: str
) -> None:
    """A GET body closed before its Content-Length: retried (twice → the read still
    succeeds); forever → EIO. Never short or wrong bytes, whatever the read pattern."""
    a = data_of(2 * MIB + 3, "a")
    b = data_of(2 * MIB + 5, "b")
    s3.put_object(Bucket=bucket, Key="a.bin", Body=a)
    s3.put_object(Bucket=bucket, Key="b.bin", Body=b)
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--endpoint", proxy.endpoint, "-o", "retries=2")
        assert sorted(os.listdir(m.path)) == ["a.bin", "b.bin"]
        # Cut twice after 100 kB: fbmount's own body retries must
        # absorb all of it, so no error ever reaches the kernel (whose read-ahead would
        # otherwise hide it by retrying with smaller reads).
        twice = proxy.add_rule("GetObject", "cut", key="/a.bin", at_byte=100_000, times=2)
        assert bounded(read_file, m.path / "a.bin") == a
        assert twice.fired == 2
        assert "read: GET a.bin" not in m.log_text(), m.log_text()

        forever = proxy.add_rule("GetObject", "cut", key="/b.bin", at_byte=0)

        def read_all_checking(path: Path) -> int:
            """Read sequentially; every byte handed over must be right. Returns bytes read."""
            got = 0
            with open(path, "rb", buffering=0) as f:
                while chunk := f.read(128 * 1024):
                    assert chunk == b[got : got + len(chunk)], f"wrong bytes at {got}"
                    got += len(chunk)
            return got

        result = bounded(read_all_checking, m.path / "b.bin")
        assert isinstance(result, OSError), f"read {result} bytes of a file whose GETs all fail"
        assert result.errno == errno.EIO, result

        # A random read in the middle fails the same way rather than returning a short read.
        def pread_middle(path: Path) -> bytes:
            fd = os.open(path, os.O_RDONLY)
            try:
                return os.pread(fd, 4096, MIB)
            finally:
                os.close(fd)

        result = bounded(pread_middle, m.path / "b.bin")
        assert isinstance(result, OSError) and result.errno == errno.EIO, result
        assert forever.fired >= 3
        proxy.remove_rule(forever)
        assert bounded(read_file, m.path / "b.bin") == b  # healthy again: nothing remembered
        assert_healthy(m)
        assert m.unmount() == 0


def test_answer_that_never_comes_fails_within_the_deadline(
    s3: Any, bucket: str, mount: MountFactory, s3_endpoint: str
) -> None:
    """A server that accepts a request and then says nothing: with -o timeout=2 the read
    and the strict-mode close() fail (EIO/ETIMEDOUT) instead of hanging; the written data
    stays staged and goes up once the server answers again."""
    seed = data_of(500_000, "seed")
    s3.put_object(Bucket=bucket, Key="seed.bin", Body=seed)
    new = data_of(123_456, "new")
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--endpoint", proxy.endpoint, *STRICT, "-o", "timeout=2,retries=2")
        assert os.stat(m.path / "seed.bin").st_size == len(seed)
        stall_get = proxy.add_rule("GetObject", "delay", seconds=120)
        stall_put = proxy.add_rule("PutObject", "delay", seconds=120)

        result = bounded(read_file, m.path / "seed.bin")
        assert isinstance(result, OSError), "a read whose GET never answers returned data"
        assert result.errno in (errno.EIO, errno.ETIMEDOUT), result
        result = bounded(write_file, m.path / "new.bin", new)
        assert isinstance(result, OSError), "close() returned although the PUT never answered"
        assert result.errno in (errno.EIO, errno.ETIMEDOUT), result
        assert stall_get.fired >= 1 and stall_put.fired >= 1
        assert staged_records(m)["new.bin"]["key"] == "new.bin"

        proxy.remove_rule(stall_get)
        proxy.remove_rule(stall_put)
        assert bounded(read_file, m.path / "seed.bin") == seed
        assert bounded(read_file, m.path / "new.bin") == new  # the local copy meanwhile
        assert_healthy(m)
        assert m.unmount() == 0  # the flush uploads new.bin
    assert body(s3, bucket, "new.bin") == new
    assert body(s3, bucket, "seed.bin") == seed


# --------------------------------------------------------------------------- persistent faults
def test_strict_put_failure_keeps_data_staged_until_sync_or_unmount(
    s3: Any, bucket: str, mount: MountFactory, s3_endpoint: str, run_fbmount: Callable[..., Any]
) -> None:
    """PUT and UploadPart failing persistently with --upload-delay 0: close() reports EIO,
    the bytes stay staged (journal + data) and readable, no multipart upload stays open;
    once the fault is gone `fbmount sync` uploads one file and the unmount flush another."""
    a = data_of(150_000, "a")
    big = data_of(11 * MIB + 1, "big")
    c = data_of(99_999, "c")
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(
            bucket, "--endpoint", proxy.endpoint, *STRICT, "--part-size", "5", "-o", "retries=2"
        )
        failing = [
            proxy.add_rule("PutObject", "status", status=500),
            proxy.add_rule("UploadPart", "status", status=500),
        ]
        for name, data in (("a.bin", a), ("big.bin", big)):
            result = bounded(write_file, m.path / name, data)
            assert isinstance(result, OSError), f"close() of {name} succeeded"
            assert result.errno == errno.EIO, result
            assert bounded(read_file, m.path / name) == data  # still there, locally
        records = staged_records(m)
        assert {"a.bin", "big.bin"} <= set(records), records
        st = status(run_fbmount, m)
        assert st["pending_files"] >= 2, st
        assert body(s3, bucket, "a.bin") is None
        # Failed multipart uploads are aborted (background retries may run one right now).
        wait_for(
            lambda: not open_uploads(s3, bucket), "failed multipart uploads aborted", timeout=30
        )

        for rule in failing:
            proxy.remove_rule(rule)
        r = run_fbmount("sync", str(m.path), timeout=120)
        assert r.returncode == 0, r.stderr
        assert body(s3, bucket, "a.bin") == a
        assert body(s3, bucket, "big.bin") == big

        rule = proxy.add_rule("PutObject", "status", status=500)
        result = bounded(write_file, m.path / "c.bin", c)
        assert isinstance(result, OSError) and result.errno == errno.EIO, result
        proxy.remove_rule(rule)
        assert_healthy(m)
        assert m.unmount() == 0
    assert body(s3, bucket, "c.bin") == c
    assert not open_uploads(s3, bucket)


def test_strict_close_under_persistent_slowdown_reports_eio(
    s3: Any, bucket: str, mount: MountFactory, s3_endpoint: str
) -> None:
    """README: strict-mode close() reports a failed upload as EIO. A server that keeps
    answering 503 SlowDown must not turn that into EAGAIN ("try again"), which close()
    callers cannot act on."""
    data = data_of(10_000, "slow")
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--endpoint", proxy.endpoint, *STRICT, "-o", "retries=2")
        rule = proxy.add_rule("PutObject", "status", status=503)
        result = bounded(write_file, m.path / "slow.bin", data)
        assert isinstance(result, OSError), "close() succeeded"
        assert result.errno == errno.EIO, result
        proxy.remove_rule(rule)
        assert m.unmount() == 0
    assert body(s3, bucket, "slow.bin") == data


def test_writeback_failure_is_shown_then_retried(
    s3: Any, bucket: str, mount: MountFactory, s3_endpoint: str, run_fbmount: Callable[..., Any]
) -> None:
    """Default write-back: close() succeeds, the upload keeps failing; `fbmount status
    --json` lists the file under "failed" with the error; once the fault is cleared the
    backoff retry uploads it without any help."""
    data = data_of(64_000, "wb")
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--endpoint", proxy.endpoint, "--upload-delay", "0.5", "-o", "retries=1")
        rule = proxy.add_rule("PutObject", "status", status=500, message="disk on fire")
        write_file(m.path / "wb.bin", data)  # acknowledged: on local disk

        def failed_entry() -> dict | None:
            entries = [f for f in status(run_fbmount, m)["failed"] if f["key"] == "wb.bin"]
            return entries[0] if entries else None

        entry = wait_for(failed_entry, "wb.bin under 'failed' in fbmount status", timeout=30)
        assert entry["error"] and ("500" in entry["error"] or "disk on fire" in entry["error"])
        assert entry["failures"] >= 1
        assert "wb.bin" in staged_records(m)
        assert body(s3, bucket, "wb.bin") is None

        proxy.remove_rule(rule)
        wait_for(
            lambda: body(s3, bucket, "wb.bin") == data, "the retry to upload wb.bin", timeout=70
        )
        st = wait_for(
            lambda: (s := status(run_fbmount, m))["pending_files"] == 0 and s, "nothing pending"
        )
        assert st["failed"] == []
        assert_healthy(m)
        assert m.unmount() == 0
    assert body(s3, bucket, "wb.bin") == data


def test_complete_multipart_answered_with_error_after_success(
    s3: Any, bucket: str, mount: MountFactory, s3_endpoint: str
) -> None:
    """CompleteMultipartUpload takes effect, but the client gets a 500 (lost answer): the
    retry must not corrupt the object or leave an upload open."""
    big = data_of(13 * MIB + 17, "cmu")
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--endpoint", proxy.endpoint, *STRICT, "--part-size", "5")
        rule = proxy.add_rule(
            "CompleteMultipartUpload", "status", status=500, phase="response", times=1
        )
        result = bounded(write_file, m.path / "big.bin", big)
        assert rule.fired == 1
        # Either close() succeeded, or it said EIO and the data stays staged for a retry;
        # in both cases the object must end up whole.
        if isinstance(result, OSError):
            assert result.errno == errno.EIO, result
        assert bounded(read_file, m.path / "big.bin") == big
        assert m.unmount() == 0
    assert body(s3, bucket, "big.bin") == big
    assert not open_uploads(s3, bucket)
    assert result is None, f"close() failed although the object is in S3: {result}"


# --------------------------------------------------------------------------- full cache disk
@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Any:
    """An 8 MiB tmpfs to use as --cache-dir; always unmounted afterwards."""
    path = tmp_path / "tinycache"
    path.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(path)],
        check=True,
        timeout=30,
    )
    try:
        yield path
    finally:
        r = subprocess.run(["umount", str(path)], capture_output=True, timeout=30)
        if r.returncode:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def test_full_cache_disk_gives_enospc_not_corruption(
    s3: Any, bucket: str, mount: MountFactory, tiny_tmpfs: Path
) -> None:
    """Writing more than the cache disk holds: the writer gets ENOSPC, the file holds
    exactly the bytes acknowledged before it (locally and, once uploaded, in S3), the
    daemon survives an upload finishing while its disk is full (the metadata index cannot
    be written then), and smaller files work again once the space is freed."""
    m = mount(bucket, "--upload-delay", "0.5", cache_dir=tiny_tmpfs)
    big = data_of(12 * MIB, "big")
    written = 0
    error: OSError | None = None
    fd = os.open(m.path / "big.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while written < len(big):
            written += os.write(fd, big[written : written + MIB])
    except OSError as e:
        error = e
    try:
        os.close(fd)
    except OSError as e:  # the journal may not fit either: close() may say so too
        error = error or e
    assert error is not None, "12 MiB fitted into an 8 MiB cache"
    assert error.errno == errno.ENOSPC, error
    assert 0 < written < len(big)
    assert_healthy(m)
    got = bounded(read_file, m.path / "big.bin")
    assert got == big[:written], (len(got), written)  # exactly what was acknowledged

    # The write-back uploads what the file holds; the disk is full while it finishes.
    wait_for(lambda: body(s3, bucket, "big.bin") is not None, "big.bin uploaded", timeout=60)
    assert body(s3, bucket, "big.bin") == big[:written]
    wait_for(lambda: not staged_records(m), "the staged copy released", timeout=30)
    assert_healthy(m)

    small = {f"s{i}.bin": data_of(200_000 + i, f"s{i}") for i in range(5)}
    for name, data in small.items():
        write_file(m.path / name, data)
    for name, data in small.items():
        assert read_file(m.path / name) == data
    assert bounded(read_file, m.path / "big.bin") == big[:written]
    assert_healthy(m)
    assert m.unmount() == 0
    for name, data in small.items():
        assert body(s3, bucket, name) == data, name


# --------------------------------------------------------------------------- concurrency
def test_sixteen_parallel_writers_and_readers(s3: Any, bucket: str, mount: MountFactory) -> None:
    """16 threads write different files while 16 others read seeded objects; all verified
    through the mount, then in S3 after the unmount flush."""
    seeded = {f"in/r{i:02d}.bin": data_of(300_000 + 4099 * i, f"r{i}") for i in range(16)}
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(lambda kv: s3.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), seeded.items())
        )
    m = mount(bucket)
    (m.path / "out").mkdir()
    written = {f"out/w{i:02d}.bin": data_of(500_000 + 7919 * i, f"w{i}") for i in range(16)}

    def writer(item: tuple[str, bytes]) -> None:
        name, data = item
        path = m.path / name
        with open(path, "wb") as f:
            for off in range(0, len(data), 65536):
                f.write(data[off : off + 65536])
        assert read_file(path) == data, name

    def reader(item: tuple[str, bytes]) -> None:
        name, data = item
        assert read_file(m.path / name) == data, name

    def run_all() -> None:
        with ThreadPoolExecutor(32) as pool:
            futures = [pool.submit(writer, kv) for kv in written.items()]
            futures += [pool.submit(reader, kv) for kv in seeded.items()]
            for f in futures:
                f.result()

    assert bounded(run_all, timeout=120) is None
    assert sorted(os.listdir(m.path / "out")) == sorted(n.split("/")[1] for n in written)
    assert_healthy(m)
    assert m.unmount() == 0
    for name, data in written.items():
        assert body(s3, bucket, name) == data, name


def test_cp_r_while_walking(s3: Any, bucket: str, mount: MountFactory, tmp_path: Path) -> None:
    """`cp -r` of a tree into the mount while another thread walks the mount over and
    over: the walker never crashes the daemon, the copy is complete and exact."""
    rng = random.Random(20241125)
    src = tmp_path / "src"
    files: dict[str, bytes] = {}
    for d in range(6):
        for sub in range(3):
            folder = src / f"d{d}" / f"s{sub}"
            folder.mkdir(parents=True)
            for f in range(6):
                rel = f"d{d}/s{sub}/f{f}.txt"
                data = data_of(rng.randrange(0, 40_000), rel)
                (src / rel).write_bytes(data)
                files[rel] = data
    m = mount(bucket, "--dir-ttl", "1", "--attr-ttl", "1")
    stop = threading.Event()
    walk_errors: list[BaseException] = []
    walks = 0

    def walker() -> None:
        nonlocal walks
        while not stop.is_set() or walks == 0:  # at least one whole walk
            try:
                for root, _dirs, names in os.walk(m.path):
                    for n in names:
                        os.lstat(os.path.join(root, n))
                subprocess.run(["ls", "-R", str(m.path)], capture_output=True, timeout=60)
                walks += 1
            except FileNotFoundError:
                pass  # a name seen in a listing may be mid-copy: fine
            except BaseException as e:  # noqa: BLE001 - reported below
                walk_errors.append(e)
                return

    thread = threading.Thread(target=walker, daemon=True)
    thread.start()
    try:
        r = subprocess.run(
            ["cp", "-r", str(src), str(m.path / "tree")],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        stop.set()
        thread.join(HANG_BOUND)
    assert not thread.is_alive(), "the walker hung"
    assert r.returncode == 0, r.stderr
    assert not walk_errors, walk_errors
    assert walks >= 1
    r = subprocess.run(
        ["diff", "-r", str(src), str(m.path / "tree")], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert_healthy(m)
    assert m.unmount() == 0
    for rel, data in files.items():
        assert body(s3, bucket, f"tree/{rel}") == data, rel
    shutil.rmtree(src)


# --------------------------------------------------------------------------- bugs, not S3 errors
def test_bug_in_an_upload_keeps_the_mount_and_the_data(
    s3: Any, bucket: str, mount: MountFactory, run_fbmount: Callable[..., Any], tmp_path: Path
) -> None:
    """An unexpected exception (a RuntimeError injected before the request, not an S3 error)
    in a PutObject, a multipart upload and a delete batch: the mount keeps serving, status
    names each file as failed with the reason, and once the bug is gone everything lands."""
    faults = tmp_path / "faults"
    faults.write_text("PutObject CreateMultipartUpload DeleteObjects DeleteObject\n")
    small, big = data_of(100_000, "bug-small"), data_of(12 * MIB, "bug-big")
    s3.put_object(Bucket=bucket, Key="bug-doomed", Body=b"old")
    m = mount(
        bucket,
        "--upload-delay",
        "0.2",
        "--part-size",
        "5",
        env={"FBMOUNT_TEST_FAULT_FILE": str(faults)},
    )
    write_file(m.path / "bug-small", small)
    write_file(m.path / "bug-big", big)
    os.unlink(m.path / "bug-doomed")

    def both_failed() -> bool:
        failed = {f["key"]: f["error"] for f in status(run_fbmount, m)["failed"]}
        return all("injected fault" in (failed.get(k) or "") for k in ("bug-small", "bug-big"))

    wait_for(both_failed, "both files under 'failed' with the injected fault", timeout=30)
    assert m.proc.poll() is None, m.log_text()
    assert bounded(os.listdir, m.path, timeout=30) is not None
    assert (m.path / "bug-big").read_bytes() == big  # still served from the staged copy
    assert body(s3, bucket, "bug-small") is None
    assert open_uploads(s3, bucket) == []

    faults.unlink()  # the bug is fixed: the backoff retries store everything
    r = run_fbmount("sync", str(m.path), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert body(s3, bucket, "bug-small") == small
    assert body(s3, bucket, "bug-big") == big
    assert body(s3, bucket, "bug-doomed") is None
    assert m.unmount() == 0


def test_bug_during_crash_recovery_mounts_anyway_and_retries(
    s3: Any, bucket: str, mount: MountFactory, run_fbmount: Callable[..., Any], tmp_path: Path
) -> None:
    """kill -9 with a file staged; the next mount's upload of the recovered file hits a
    bug: the mount comes up anyway (no crash loop), the file stays visible with its staged
    bytes and shows as failed in status, and the retry uploads it once the bug is gone."""
    data = data_of(200_000, "bug-recover")
    m = mount(bucket, "--upload-delay", "3600")
    write_file(m.path / "bug-recovered", data)
    m.kill9()
    faults = tmp_path / "faults"
    faults.write_text("PutObject\n")
    m2 = mount(
        bucket,
        "--upload-delay",
        "0.2",
        cache_dir=m.cache_dir,
        mountpoint=m.path,
        env={"FBMOUNT_TEST_FAULT_FILE": str(faults)},
    )
    assert (m2.path / "bug-recovered").read_bytes() == data  # served from the staged copy

    def failed() -> bool:
        return any(
            f["key"] == "bug-recovered" and "injected fault" in (f["error"] or "")
            for f in status(run_fbmount, m2)["failed"]
        )

    wait_for(failed, "the recovered file under 'failed' with the injected fault", timeout=30)
    assert body(s3, bucket, "bug-recovered") is None
    assert "bug-recovered" in staged_records(m2)
    faults.unlink()  # the bug is fixed: the backoff retry uploads it
    m2.sync()
    assert body(s3, bucket, "bug-recovered") == data
    assert m2.unmount() == 0


def test_aborted_fuse_connection_stores_what_was_staged_and_says_so(
    s3: Any, bucket: str, mount: MountFactory
) -> None:
    """Someone writes to /sys/fs/fuse/connections/N/abort (CI saw it happen mid-test):
    the mount is cut off, which is not a bug of fbmount's. The daemon stores the files
    staged before and exits; it never reports the abort as a crash of its own."""
    m = mount(bucket, "--upload-delay", "60")
    data = data_of(300_000, "abort")
    write_file(m.path / "staged.bin", data)
    assert body(s3, bucket, "staged.bin") is None  # waits for its upload delay
    connections = Path("/sys/fs/fuse/connections")
    mounted_fusectl = not os.path.ismount(connections)
    if mounted_fusectl:  # systemd mounts it at boot; a bare container may not have
        subprocess.run(["mount", "-t", "fusectl", "none", str(connections)], check=True)
    try:
        (connections / str(os.minor(os.stat(m.path).st_dev)) / "abort").write_text("1")
    finally:
        if mounted_fusectl:
            subprocess.run(["umount", str(connections)], check=True)
    m.proc.wait(timeout=60)
    log = m.log_text()
    # The kernel reports an abort as ENODEV (then the daemon cannot tell it from an
    # unmount: exit 0) or, when the connection asked for abort errors, ECONNABORTED
    # (exit 1, and the log says so). Either way nothing staged is left behind.
    if m.proc.returncode == 1:
        assert "the kernel aborted the FUSE connection" in log, log
    else:
        assert m.proc.returncode == 0, log
    assert "a bug" not in log, log
    assert body(s3, bucket, "staged.bin") == data
