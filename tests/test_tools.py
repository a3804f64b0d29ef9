"""`fbmount --local`, `status`, `sync`, `umount` and `doctor`, against real mounts.

Nothing is mocked: every test mounts through FUSE and talks to SeaweedFS, with the fault
proxy in between where a failure has to be scripted. Waits are bounded ("does not hang"),
never timed. Every process a test starts is stopped by PID in a finally block.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from conftest import (
    AUTH_KEY,
    AUTH_SECRET,
    MountFactory,
    is_mounted,
    make_s3_client,
    unique_bucket_name,
    warm_bucket,
)
from faultproxy import FaultProxy
from helpers import (
    body,
    fail_lines,
    journal_records,
    pid_alive,
    status_json,
    wait_for,
    wait_gone,
    write_file,
)

from fbmount import control
from fbmount.localserver import LocalS3Server

MIB = 1024 * 1024
Run = Callable[..., subprocess.CompletedProcess[str]]


# --------------------------------------------------------------------------- helpers
def data_of(size: int, seed: str) -> bytes:
    """Deterministic, incompressible-looking bytes (cheap to make, easy to compare)."""
    block = hashlib.sha256(seed.encode()).digest() * (64 * 1024 // 32)
    return (block * (size // len(block) + 1))[:size]


def pids_naming(fragment: str) -> dict[int, list[str]]:
    """Live processes (not this one) with an argument containing `fragment`: pid → argv."""
    out: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(fragment in a for a in args) and pid_alive(int(entry.name)):
            out[int(entry.name)] = args
    return out


def split_local_pids(fragment: str) -> tuple[list[int], list[int]]:
    """(fbmount daemon PIDs, weed PIDs) whose command line names the unique `fragment`."""
    daemons, weeds = [], []
    for pid, args in pids_naming(fragment).items():
        if os.path.basename(args[0]) == "weed":
            weeds.append(pid)
        elif any("fbmount" in a for a in args):
            daemons.append(pid)
    return daemons, weeds


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fix_after(out: str, fail_prefix: str) -> str:
    """The `fix:` line that follows the FAIL line starting with `fail_prefix`."""
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(fail_prefix):
            assert i + 1 < len(lines) and lines[i + 1].strip().startswith("fix: "), out
            return lines[i + 1].strip()
    pytest.fail(f"no line starting {fail_prefix!r} in:\n{out}")


# --------------------------------------------------------------------------- --local
@contextlib.contextmanager
def reap_local(mnt: Path, fragment: str) -> Iterator[None]:
    """Whatever happens, leave no mount, no daemon and no weed of this --local DIR behind."""
    try:
        yield
    finally:
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=30)
        daemons, weeds = split_local_pids(fragment)
        alive = wait_gone(daemons + weeds, 15)
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, timeout=30)
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_gone(alive, 10)


def local_log(local_dir: Path) -> str:
    """The daemon's log (no syslog here: it goes to CACHE/STATE/fbmount.log)."""
    return "\n".join(p.read_text(errors="replace") for p in local_dir.glob("cache/*/fbmount.log"))


def test_local_daemon_round_trip(run_fbmount: Run, tmp_path: Path) -> None:
    """`fbmount --local DIR MNT` from a clean directory: mounts, keeps the data across a
    umount + mount, its server checks keys, and umount leaves no process behind."""
    name = f"fbm-local-{uuid.uuid4().hex[:10]}"  # unique: finds our processes in /proc
    local_dir, mnt = tmp_path / name, tmp_path / "mnt"
    mnt.mkdir()
    assert not local_dir.exists()
    files = {"hello.txt": b"hello from --local\n", "sub/data.bin": data_of(300_000, "local")}
    with reap_local(mnt, name):
        # First run: relative paths, as a user would type them in a clean directory.
        r = run_fbmount("--local", name, "mnt", timeout=120)
        assert r.returncode == 0, r.stderr + local_log(local_dir)
        assert "Traceback" not in r.stderr, r.stderr
        assert is_mounted(mnt)
        daemons, weeds = split_local_pids(name)
        assert len(daemons) == 1 and len(weeds) == 1, (daemons, weeds)

        creds = local_dir / "credentials"
        assert stat.S_IMODE(creds.stat().st_mode) == 0o600
        assert stat.S_IMODE(local_dir.stat().st_mode) & 0o077 == 0
        access, secret = creds.read_text().strip().split(":", 1)

        (mnt / "sub").mkdir()
        for rel, data in files.items():
            write_file(mnt / rel, data)

        st = status_json(run_fbmount, mnt)
        assert st["source"] == "local" and st["pid"] == daemons[0], st
        endpoint = st["endpoint"]
        assert endpoint.startswith("http://127.0.0.1:"), endpoint
        good = make_s3_client(endpoint, access, secret)
        good.list_objects_v2(Bucket="local")  # the right keys work...
        with pytest.raises(ClientError) as err:  # ...and wrong ones do not
            make_s3_client(endpoint, access, "not-the-secret").list_objects_v2(Bucket="local")
        assert err.value.response["Error"]["Code"] in (
            "SignatureDoesNotMatch",
            "AccessDenied",
            "InvalidAccessKeyId",
            "403",
        ), err.value.response
        with pytest.raises(ClientError):
            make_s3_client(endpoint, "nobody", "nothing").list_objects_v2(Bucket="local")

        r = run_fbmount("umount", str(mnt), timeout=120)
        assert r.returncode == 0, r.stderr
        assert "uploaded" in r.stdout, r.stdout
        assert wait_gone(daemons, 30) == [], "the daemon did not exit after umount"
        assert wait_gone(weeds, 30) == [], "the daemon left its weed server running"
        assert not is_mounted(mnt)
        assert split_local_pids(name) == ([], []), pids_naming(name)
        assert "Traceback" not in local_log(local_dir), local_log(local_dir)
        # The umount uploaded everything: the objects are in the (stopped) server's data.

        # Second run, absolute paths: same data dir, same keys, files still there.
        r = run_fbmount("--local", str(local_dir), str(mnt), timeout=120)
        assert r.returncode == 0, r.stderr + local_log(local_dir)
        daemons, weeds = split_local_pids(name)
        assert len(daemons) == 1 and len(weeds) == 1, (daemons, weeds)
        assert creds.read_text().strip() == f"{access}:{secret}"  # keys kept, not regenerated
        for rel, data in files.items():
            assert (mnt / rel).read_bytes() == data, rel

        subprocess.run(["fusermount3", "-u", str(mnt)], check=True, timeout=30)
        assert wait_gone(daemons, 30) == [], "the daemon did not exit after fusermount3 -u"
        assert wait_gone(weeds, 30) == [], "the daemon left its weed server running"
        assert not is_mounted(mnt)


def test_local_daemon_killed_leaves_no_server_and_next_mount_recovers(
    run_fbmount: Run, tmp_path: Path
) -> None:
    """kill -9 of a `--local` daemon with a staged file: its weed dies with it, and the
    next `--local` mount of DIR uploads the file, even when the old S3 port is taken now
    (the local endpoint's port is not part of the data's identity)."""
    name = f"fbm-local-{uuid.uuid4().hex[:10]}"
    local_dir, mnt = tmp_path / name, tmp_path / "mnt"
    mnt.mkdir()
    data = data_of(123_456, "crash")
    with reap_local(mnt, name):
        r = run_fbmount("--local", str(local_dir), str(mnt), "--upload-delay", "60", timeout=120)
        assert r.returncode == 0, r.stderr + local_log(local_dir)
        daemons, weeds = split_local_pids(name)
        assert len(daemons) == 1 and len(weeds) == 1, (daemons, weeds)
        old_endpoint = status_json(run_fbmount, mnt)["endpoint"]
        write_file(mnt / "staged.bin", data)  # acknowledged, staged for 60 s

        os.kill(daemons[0], signal.SIGKILL)
        assert wait_gone(daemons, 10) == []
        assert wait_gone(weeds, 15) == [], "weed outlived its kill -9'd fbmount --local"
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, timeout=30)

        # Someone else took the old S3 port meanwhile (e.g. after a reboot). If the dead
        # weed's sockets still hold it, it is not free either: fresh ports all the same.
        squatted = False
        with socket.socket() as squatter:
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with contextlib.suppress(OSError):
                squatter.bind(("127.0.0.1", int(old_endpoint.rsplit(":", 1)[1])))
                squatter.listen(1)
                squatted = True
            r = run_fbmount("--local", str(local_dir), str(mnt), timeout=120)
        assert r.returncode == 0, r.stderr + local_log(local_dir)
        if squatted:  # the old port was really taken: the server had to move
            assert status_json(run_fbmount, mnt)["endpoint"] != old_endpoint
        assert (mnt / "staged.bin").read_bytes() == data
        r = run_fbmount("sync", str(mnt), timeout=120)  # recovered: uploaded in the background
        assert r.returncode == 0, r.stdout + r.stderr
        access, secret = (local_dir / "credentials").read_text().strip().split(":", 1)
        client = make_s3_client(status_json(run_fbmount, mnt)["endpoint"], access, secret)
        assert body(client, "local", "staged.bin") == data  # uploaded, not just staged
        daemons, weeds = split_local_pids(name)
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True, timeout=30)
        assert wait_gone(daemons + weeds, 30) == []


def test_local_is_seaweedfs_and_umount_waits_for_its_server(
    run_fbmount: Run, tmp_path: Path
) -> None:
    """A --local mount gets the seaweedfs profile and no rate limit (not Filebase's 100/s,
    picked from the default endpoint before the local one is known) unless --max-rps says
    so; a second --local of the same DIR is refused; `fbmount umount` returns only once
    the daemon and its weed have exited, so the same DIR mounts again at once."""
    name = f"fbm-local-{uuid.uuid4().hex[:10]}"
    local_dir, mnt, other = tmp_path / name, tmp_path / "mnt", tmp_path / "other"
    mnt.mkdir()
    other.mkdir()
    with reap_local(mnt, name), reap_local(other, name):
        r = run_fbmount("--local", str(local_dir), str(mnt), timeout=120)
        assert r.returncode == 0, r.stderr + local_log(local_dir)
        st = status_json(run_fbmount, mnt)
        assert (st["provider"], st["max_rps"]) == ("seaweedfs", 0), st
        # Two mounts of one bucket each get a cache dir, but a --local DIR is also its
        # server's data: a second `--local DIR` is refused in one line, before any weed.
        daemons, weeds = split_local_pids(name)
        r = run_fbmount("--local", str(local_dir), str(other), timeout=120)
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert r.stderr == (
            f"fbmount: {local_dir} is in use by another fbmount --local; unmount that first "
            "(fbmount umount MOUNTPOINT)\n"
        ), r.stderr
        assert not is_mounted(other)
        assert split_local_pids(name) == (daemons, weeds), pids_naming(name)
        write_file(mnt / "first.txt", b"first run\n")
        r = run_fbmount("umount", str(mnt), timeout=120)
        assert r.returncode == 0, r.stderr
        assert split_local_pids(name) == ([], []), pids_naming(name)  # no waiting needed

        r = run_fbmount("--local", str(local_dir), str(mnt), "--max-rps", "50", timeout=120)
        assert r.returncode == 0, r.stderr + local_log(local_dir)
        st = status_json(run_fbmount, mnt)
        assert (st["provider"], st["max_rps"]) == ("seaweedfs", 50), st
        data = data_of(200_000, "again")
        write_file(mnt / "again.bin", data)
        assert (mnt / "again.bin").read_bytes() == data
        assert (mnt / "first.txt").read_bytes() == b"first run\n"
        r = run_fbmount("umount", str(mnt), timeout=120)
        assert r.returncode == 0, r.stderr
        assert split_local_pids(name) == ([], []), pids_naming(name)
        assert not is_mounted(mnt)


# --------------------------------------------------------------------------- status
def test_status_shows_upload_progress(
    s3: Any,
    bucket: str,
    mount: MountFactory,
    s3_endpoint: str,
    run_fbmount: Run,
    tmp_path: Path,
) -> None:
    """While a 64 MiB multipart upload crawls (every UploadPart delayed), `fbmount status`
    shows it waiting/uploading with partial progress and request counts; afterwards
    nothing is pending and the upload is counted."""
    data = data_of(64 * MIB, "status")
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(
            bucket,
            "--endpoint",
            proxy.endpoint,
            "--part-size",
            "5",
            "--upload-delay",
            "1",
            "--parallel",
            "2",
        )
        proxy.add_rule("UploadPart", "delay", seconds=1.0)
        write_file(m.path / "big.bin", data)

        st = status_json(run_fbmount, m.path)
        assert st["mountpoint"] == str(m.path)
        assert st["pending_files"] >= 1 or st["uploads_done"] >= 1, st

        snapshot = None
        progress_seen = False
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            st = status_json(run_fbmount, m.path)
            if st["pending_files"] == 0:
                break
            assert st["pending_bytes"] > 0, st
            assert isinstance(st["requests"], dict)
            ups = [u for u in st["uploading"] if u["key"] == "big.bin"]
            if ups and 0 < ups[0]["sent"] < ups[0]["bytes"]:
                assert ups[0]["bytes"] == len(data), ups
                assert st["requests"].get("CreateMultipartUpload", 0) >= 1, st
                assert st["requests"].get("UploadPart", 0) >= 1, st
                progress_seen = True
                if snapshot is None:
                    r = run_fbmount("status", str(m.path), timeout=30)
                    assert r.returncode == 0, r.stderr
                    if "  uploading big.bin: " in r.stdout and "(100%)" not in r.stdout:
                        snapshot = r.stdout
            time.sleep(0.2)
        assert progress_seen, "never saw the upload in progress (sent < bytes)"
        assert snapshot is not None, "no human status taken mid-upload"
        assert str(m.path) in snapshot and "waiting to upload: 1 file(s), 64.0 MiB" in snapshot
        print(f"\n--- fbmount status, mid-upload ---\n{snapshot}")
        (tmp_path / "status-snapshot.txt").write_text(snapshot)

        st = wait_for(
            lambda: (s := status_json(run_fbmount, m.path))["pending_files"] == 0 and s,
            "the upload to finish",
            timeout=60,
        )
        assert st["pending_bytes"] == 0 and st["uploading"] == [] and st["failed"] == [], st
        assert st["uploads_done"] >= 1, st
        assert st["requests"]["UploadPart"] >= 13, st  # 64 MiB in 5 MiB parts
        assert st["errors"] == {}, st
        r = run_fbmount("status", str(m.path), timeout=30)
        assert r.returncode == 0, r.stderr
        assert str(m.path) in r.stdout and "waiting to upload: 0 file(s)" in r.stdout, r.stdout
        assert m.unmount() == 0
    obj = s3.get_object(Bucket=bucket, Key="big.bin")["Body"].read()
    assert hashlib.sha256(obj).digest() == hashlib.sha256(data).digest()


def stderr_line(r: subprocess.CompletedProcess[str], start: str) -> str:
    """The one stderr line of `r` that starts with `start`."""
    found = [line for line in r.stderr.splitlines() if line.startswith(start)]
    assert len(found) == 1, (start, r.stderr)
    return found[0]


def test_dead_daemon_says_why_crash_then_kill(
    run_fbmount: Run, s3_endpoint: str, bucket: str, tmp_path: Path
) -> None:
    """A background daemon that dies of an unexpected exception logs the traceback and
    leaves a last-exit note; `fbmount status MNT` names the dead daemon and the error.
    The next mount there works; SIGKILLed, status says it left no reason (not the old
    crash's) and gives the fix, and the fix works."""
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    args = [bucket, str(mnt), "--endpoint", s3_endpoint, "--cache-dir", str(cache)]
    with reap_local(mnt, str(mnt)):
        r = run_fbmount(*args, env={"FBMOUNT_TEST_CRASH_AFTER_MOUNT": "1"}, timeout=60)
        assert r.returncode == 0, r.stderr  # the crash comes once the mount was ready
        record = control.read_record(mnt)
        assert record is not None
        pid, state_dir = record["pid"], Path(record["state_dir"])
        assert wait_gone([pid], 30) == [], "the daemon did not die of the injected error"

        log_text = (state_dir / "fbmount.log").read_text()
        assert "Traceback (most recent call last)" in log_text, log_text
        assert "RuntimeError: FBMOUNT_TEST_CRASH_AFTER_MOUNT" in log_text, log_text
        note = json.loads((state_dir / "last-exit").read_text())
        assert note["pid"] == pid and note["mountpoint"] == str(mnt), note
        assert note["error"].startswith("RuntimeError: FBMOUNT_TEST_CRASH_AFTER_MOUNT"), note

        r = run_fbmount("status", str(mnt), timeout=30)
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
        gone = stderr_line(r, f"fbmount: {mnt}: its fbmount daemon (pid {pid}) is gone; it died")
        assert "RuntimeError: FBMOUNT_TEST_CRASH_AFTER_MOUNT" in gone, gone
        assert not is_mounted(mnt)  # it unmounted on its way out
        assert (
            stderr_line(r, "fbmount: fix: ")
            == "fbmount: fix: mount it again (it is no longer mounted)"
        )
        r = run_fbmount("status", str(mnt), "--json", timeout=30)
        assert r.returncode == 1, (r.stdout, r.stderr)
        dead = json.loads(r.stdout)
        assert dead["running"] is False and dead["pid"] == pid, dead
        assert dead["reason"].startswith("RuntimeError: FBMOUNT_TEST_CRASH_AFTER_MOUNT"), dead

        # Mounted again, then killed: no last words this time, and not the old ones.
        r = run_fbmount(*args, timeout=60)
        assert r.returncode == 0, r.stderr
        pid = status_json(run_fbmount, mnt)["pid"]
        os.kill(pid, signal.SIGKILL)
        assert wait_gone([pid], 10) == []
        assert is_mounted(mnt)  # dead: every access is ENOTCONN until detached
        r = run_fbmount("status", str(mnt), timeout=30)
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
        gone = stderr_line(r, f"fbmount: {mnt}: its fbmount daemon (pid {pid}) is gone; it ")
        assert "left no reason" in gone and "RuntimeError" not in gone, gone
        assert stderr_line(r, "fbmount: last log line: ").endswith(
            f"at {mnt} (endpoint {s3_endpoint})"
        )
        fix = stderr_line(r, "fbmount: fix: ")
        assert fix == f"fbmount: fix: fusermount3 -uz {mnt}, then mount it again", fix
        r = run_fbmount("status", timeout=30)  # all mounts: the dead one needs a hand
        assert r.returncode == 1 and str(mnt) in r.stderr, (r.stdout, r.stderr)

        subprocess.run(["fusermount3", "-uz", str(mnt)], check=True, timeout=30)
        r = run_fbmount(*args, timeout=60)
        assert r.returncode == 0, r.stderr
        assert status_json(run_fbmount, mnt)["pid"] != pid
        r = run_fbmount("umount", str(mnt), timeout=60)
        assert r.returncode == 0, r.stderr


def test_status_of_a_path_that_is_not_mounted(run_fbmount: Run, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    for extra in ((), ("--json",)):
        r = run_fbmount("status", str(plain), *extra, timeout=30)
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert "Traceback" not in r.stderr
        assert r.stderr.startswith("fbmount: ") and str(plain) in r.stderr, r.stderr
        assert "not an fbmount mount" in r.stderr, r.stderr


# --------------------------------------------------------------------------- sync
def test_sync_whose_daemon_dies_says_so(
    run_fbmount: Run, s3_endpoint: str, bucket: str, mount: MountFactory
) -> None:
    """A `fbmount sync` in flight when the daemon is killed exits 1 naming the dead
    daemon. It used to print "0 file(s) not in S3 yet" (the crash soak saw it), which
    says nothing of what happened."""
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--upload-delay", "60", endpoint=proxy.endpoint)
        write_file(m.path / "f", b"x")
        held = proxy.add_rule("PutObject", "hold", times=1)
        with ThreadPoolExecutor(1) as pool:
            sync = pool.submit(run_fbmount, "sync", str(m.path), timeout=60)
            assert held.wait_held(20), "the sync sent no PUT"
            m.kill9(unmount=False)
            held.release()
            r = sync.result(timeout=60)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert f"its fbmount daemon (pid {m.proc.pid}) is gone" in r.stderr, r.stderr
    assert "0 file(s)" not in r.stderr, r.stderr


def test_sync_waits_for_s3_and_reports_refusals(
    s3: Any, bucket: str, mount: MountFactory, s3_endpoint: str, run_fbmount: Run
) -> None:
    """`fbmount sync` returns once the object is in S3; a refused upload makes it exit 1
    naming the file and the error, the file stays staged (status: failed), and a sync
    after the fault is gone uploads it."""
    a, b = data_of(70_000, "a"), data_of(80_000, "b")
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--endpoint", proxy.endpoint, "--upload-delay", "30")
        write_file(m.path / "a.txt", a)
        assert body(s3, bucket, "a.txt") is None  # 30 s settle window: not yet
        r = run_fbmount("sync", str(m.path), timeout=60)
        assert body(s3, bucket, "a.txt") == a  # checked right after sync returned
        assert r.returncode == 0, r.stderr
        assert "uploaded" in r.stdout, r.stdout

        refuse = proxy.add_rule("PutObject", "status", status=403)  # AccessDenied, forever
        write_file(m.path / "b.txt", b)
        r = run_fbmount("sync", str(m.path), timeout=60)
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert "Traceback" not in r.stderr
        named = [line for line in r.stderr.splitlines() if "b.txt" in line]
        assert named and any("AccessDenied" in line for line in named), r.stderr
        assert body(s3, bucket, "b.txt") is None

        st = status_json(run_fbmount, m.path)
        failed = [f for f in st["failed"] if f["key"] == "b.txt"]
        assert failed and "AccessDenied" in failed[0]["error"], st
        assert st["pending_files"] >= 1, st
        journal = [
            record["key"]
            for staging in m.cache_dir.glob("*/staging")
            for record in journal_records(staging).values()
        ]
        assert "b.txt" in journal, journal
        human = run_fbmount("status", str(m.path), timeout=30).stdout
        assert "FAILED b.txt" in human and "AccessDenied" in human, human
        assert (m.path / "b.txt").read_bytes() == b  # still readable from the stage

        proxy.remove_rule(refuse)
        r = run_fbmount("sync", str(m.path), timeout=60)
        assert body(s3, bucket, "b.txt") == b
        assert r.returncode == 0, r.stderr
        assert "uploaded" in r.stdout, r.stdout
        st = status_json(run_fbmount, m.path)
        assert st["pending_files"] == 0 and st["failed"] == [], st
        assert m.unmount() == 0


# --------------------------------------------------------------------------- SIGTERM
def test_sigterm_flush_timeout_keeps_files_staged_for_next_mount(
    s3: Any, bucket: str, mount: MountFactory, s3_endpoint: str
) -> None:
    """SIGTERM while uploads are refused (503 SlowDown, and one PUT held for a minute) with
    --flush-timeout 2: the process still exits promptly, says loudly the files stay staged,
    and the next mount with the same cache dir uploads them before serving."""
    files = {"slow.bin": data_of(50_000, "slow"), "refused.bin": data_of(60_000, "refused")}
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(
            bucket, "--endpoint", proxy.endpoint, "--upload-delay", "30", "--flush-timeout", "2"
        )
        rules = [
            proxy.add_rule("PutObject", "delay", key="slow.bin", seconds=60),
            proxy.add_rule("PutObject", "status", status=503),
        ]
        for name, data in files.items():
            write_file(m.path / name, data)

        m.proc.send_signal(signal.SIGTERM)
        try:
            rc = m.proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            pytest.fail(f"fbmount still running 45 s after SIGTERM:\n{m.log_text()}")
        log = m.log_text()
        assert rc != 0, log  # files were not uploaded: not a clean exit
        assert "Traceback" not in log, log
        assert "2 item(s) could not be stored in S3" in log, log
        assert "next mount" in log, log
        for name in files:  # each file left behind is named
            assert f"not stored: {name}" in log, log
        assert not is_mounted(m.path)
        for name in files:
            assert body(s3, bucket, name) is None
        assert sum(len(journal_records(s)) for s in m.cache_dir.glob("*/staging")) >= 2
        m.unmount()  # closes the log; nothing left to stop

        for rule in rules:
            proxy.remove_rule(rule)
        m2 = mount(bucket, "--endpoint", proxy.endpoint, cache_dir=m.cache_dir, mountpoint=m.path)
        for name, data in files.items():  # served from the staged copies at once
            assert (m2.path / name).read_bytes() == data
        m2.sync()  # and uploaded in the background
        for name, data in files.items():
            assert body(s3, bucket, name) == data, name
        assert "recovering 2 staged file(s)" in m2.log_text(), m2.log_text()
        assert m2.unmount() == 0


# --------------------------------------------------------------------------- doctor
def test_doctor_good_setup(run_fbmount: Run, s3_endpoint: str, bucket: str, tmp_path: Path) -> None:
    r = run_fbmount("doctor", bucket, "--endpoint", s3_endpoint, timeout=60)
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    assert fail_lines(r.stdout, tmp_path) == [], r.stdout
    for check in (
        "/dev/fuse",
        "fusermount3",
        "credentials",
        "endpoint",
        "clock",
        "bucket",
        "multipart uploads",
    ):
        assert f"ok    {check}" in r.stdout, r.stdout
    if "FAIL" not in r.stdout:  # else: only other test runs' stale mounts failed
        assert r.returncode == 0, r.stdout
        assert "all checks passed" in r.stdout, r.stdout


def test_doctor_wrong_secret(run_fbmount: Run, auth_server: LocalS3Server, tmp_path: Path) -> None:
    client = make_s3_client(auth_server.endpoint, AUTH_KEY, AUTH_SECRET)
    name = unique_bucket_name("tools-auth")
    client.create_bucket(Bucket=name)
    warm_bucket(client, name)
    env = {"AWS_ACCESS_KEY_ID": AUTH_KEY, "AWS_SECRET_ACCESS_KEY": "wrong-secret-0123456789"}
    r = run_fbmount("doctor", name, "--endpoint", auth_server.endpoint, env=env, timeout=60)
    assert r.returncode == 1, r.stdout
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    assert "wrong-secret" not in r.stdout + r.stderr  # never print a secret
    assert "ok    endpoint" in r.stdout, r.stdout
    assert fix_after(r.stdout, "FAIL  bucket: ") == "fix: check the access key and secret"
    assert "all checks passed" not in r.stdout
    # The right secret passes the same checks.
    env["AWS_SECRET_ACCESS_KEY"] = AUTH_SECRET
    ok = run_fbmount("doctor", name, "--endpoint", auth_server.endpoint, env=env, timeout=60)
    assert fail_lines(ok.stdout, tmp_path) == [], ok.stdout
    assert f"ok    bucket: {name} is listable" in ok.stdout, ok.stdout


def test_doctor_clock_skew(run_fbmount: Run, s3_endpoint: str, bucket: str, tmp_path: Path) -> None:
    with FaultProxy(s3_endpoint) as proxy:
        proxy.add_rule(None, "date", skew=3600)
        r = run_fbmount("doctor", bucket, "--endpoint", proxy.endpoint, timeout=60)
    assert r.returncode == 1, r.stdout
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    fails = fail_lines(r.stdout, tmp_path)
    assert len(fails) == 1 and fails[0].startswith("FAIL  clock: "), r.stdout
    assert "+3600s" in fails[0] or "+3599s" in fails[0] or "+3601s" in fails[0], fails
    assert "timedatectl set-ntp true" in fix_after(r.stdout, "FAIL  clock: ")


def test_doctor_refused_endpoint(run_fbmount: Run, bucket: str, tmp_path: Path) -> None:
    port = closed_port()
    r = run_fbmount("doctor", bucket, "--endpoint", f"http://127.0.0.1:{port}", timeout=60)
    assert r.returncode == 1, r.stdout
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    fails = fail_lines(r.stdout, tmp_path)
    assert len(fails) == 1 and fails[0].startswith(f"FAIL  endpoint: 127.0.0.1:{port}"), r.stdout
    assert "--endpoint" in fix_after(r.stdout, "FAIL  endpoint: ")
    assert "ok    bucket" not in r.stdout  # not attempted without an endpoint


def test_doctor_reports_stale_mount(
    run_fbmount: Run, mount: MountFactory, s3_endpoint: str, bucket: str
) -> None:
    """A daemon killed with -9 leaves "Transport endpoint is not connected": doctor names
    the mount and the command that clears it; `status` of it is a clean exit 1."""
    m = mount(bucket)
    try:
        m.kill9(unmount=False)
        assert is_mounted(m.path)
        r = run_fbmount("doctor", bucket, "--endpoint", s3_endpoint, timeout=60)
        assert r.returncode == 1, r.stdout
        assert "Traceback" not in r.stderr + r.stdout, r.stderr
        prefix = f"FAIL  stale mount: {m.path}: "
        assert any(line.startswith(prefix) for line in r.stdout.splitlines()), r.stdout
        assert fix_after(r.stdout, prefix) == f"fix: fusermount3 -uz {m.path}, then mount it again"
        assert "ok    bucket" in r.stdout, r.stdout  # the other checks still ran

        st = run_fbmount("status", str(m.path), timeout=30)
        assert st.returncode == 1, (st.stdout, st.stderr)
        assert "Traceback" not in st.stderr, st.stderr
    finally:
        if is_mounted(m.path):
            subprocess.run(["fusermount3", "-uz", str(m.path)], capture_output=True, timeout=30)
    assert not is_mounted(m.path)
