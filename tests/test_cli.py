"""The fbmount command line, run as a real process against real SeaweedFS servers.

Error paths must print ONE line starting "fbmount: ", exit 1 and leave no mount and no
process behind, in the foreground (-f) and in daemon mode (where the parent relays the
child's error). Credentials are checked against a second, module-scoped SeaweedFS that
has identities configured (the session server accepts any key).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    AUTH_KEY,
    AUTH_SECRET,
    MountFactory,
    is_mounted,
    make_s3_client,
    unique_bucket_name,
    warm_bucket,
)
from helpers import wait_gone

from fbmount import __version__
from fbmount.cli import config_from_args
from fbmount.localserver import LocalS3Server

Run = Callable[..., subprocess.CompletedProcess[str]]
MODES = ["foreground", "daemon"]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def auth_bucket(auth_server: LocalS3Server) -> str:
    """A bucket on the auth server holding hello.txt (the server is disposable)."""
    client = make_s3_client(auth_server.endpoint, AUTH_KEY, AUTH_SECRET)
    name = unique_bucket_name("cli-auth")
    client.create_bucket(Bucket=name)
    warm_bucket(client, name)
    client.put_object(Bucket=name, Key="hello.txt", Body=b"hello from auth")
    return name


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """A fresh, empty mountpoint and cache dir under this test's tmp dir."""
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    cache.mkdir()
    return mnt, cache


# --------------------------------------------------------------------------- helpers
def fbmount_pids(mountpoint: Path) -> list[int]:
    """PIDs of fbmount processes whose command line names this (unique) mountpoint."""
    want = str(mountpoint)
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if want in args and any("fbmount" in a for a in args):
            pids.append(int(entry.name))
    return pids


@contextlib.contextmanager
def reap_daemons(mountpoint: Path) -> Iterator[None]:
    """Whatever happens in the block, leave no mount and no fbmount daemon of
    `mountpoint` behind (unmount, then SIGKILL only the PIDs found for this path)."""
    try:
        yield
    finally:
        if is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, timeout=30)
        alive = wait_gone(fbmount_pids(mountpoint), 15)
        if is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True, timeout=30)
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def run_mode(
    run: Run, mode: str, source: str, mnt: Path, cache: Path, *args: str, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """Run `fbmount SOURCE MNT --cache-dir CACHE ARGS`, with -f in the foreground mode.

    The child of a daemon-mode run is reaped even if the test fails."""
    extra = ["-f"] if mode == "foreground" else []
    with reap_daemons(mnt):
        return run(source, str(mnt), *extra, "--cache-dir", str(cache), *args, timeout=60, **kw)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], mnt: Path) -> str:
    """Exit 1, exactly one stderr line starting "fbmount: ", nothing mounted or running."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fbmount: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not is_mounted(mnt)
    assert wait_gone(fbmount_pids(mnt), 10) == []
    return lines[0]


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- info
@pytest.mark.parametrize(
    ("extra", "provider", "max_rps"),
    [
        ([], "seaweedfs", 0.0),
        (["--max-rps", "50"], "seaweedfs", 50.0),
        (["--provider", "filebase"], "filebase", 100.0),
    ],
)
def test_local_is_seaweedfs_without_a_rate_limit(
    extra: list[str], provider: str, max_rps: float
) -> None:
    """--local is our own SeaweedFS, not the Filebase default endpoint it starts out with."""
    cfg = config_from_args(["--local", "/d", "/m", *extra])
    assert (cfg.provider, cfg.max_rps) == (provider, max_rps)


def test_version(run_fbmount: Run) -> None:
    proc = run_fbmount("--version", timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"fbmount {__version__}"


def test_help(run_fbmount: Run) -> None:
    proc = run_fbmount("--help", timeout=30)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("usage: fbmount")
    for option in (
        "--endpoint",
        "--passwd-file",
        "--read-only",
        "--attr-ttl",
        "--dir-ttl",
        "--foreground",
        "-o OPTS",
        "--version",
    ):
        assert option in out, option


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("mode", MODES)
def test_bad_credentials(
    run_fbmount: Run,
    auth_server: LocalS3Server,
    auth_bucket: str,
    dirs: tuple[Path, Path],
    mode: str,
) -> None:
    mnt, cache = dirs
    for key, secret in ((AUTH_KEY, "wrong-secret"), ("unknownkey", AUTH_SECRET)):
        proc = run_mode(
            run_fbmount,
            mode,
            auth_bucket,
            mnt,
            cache,
            "--endpoint",
            auth_server.endpoint,
            env={"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret},
        )
        line = assert_one_line_error(proc, mnt)
        assert "credential" in line.lower() or "denied" in line.lower(), line
        assert "wrong-secret" not in line and AUTH_SECRET not in line  # never print secrets


@pytest.mark.parametrize("mode", MODES)
def test_missing_bucket(
    run_fbmount: Run, s3_endpoint: str, dirs: tuple[Path, Path], mode: str
) -> None:
    mnt, cache = dirs
    name = unique_bucket_name("no-such-bucket")
    proc = run_mode(run_fbmount, mode, name, mnt, cache, "--endpoint", s3_endpoint)
    line = assert_one_line_error(proc, mnt)
    assert name in line and "not exist" in line, line


def test_refused_endpoint(run_fbmount: Run, dirs: tuple[Path, Path]) -> None:
    mnt, cache = dirs
    endpoint = f"http://127.0.0.1:{closed_port()}"
    proc = run_mode(run_fbmount, "foreground", "somebucket", mnt, cache, "--endpoint", endpoint)
    line = assert_one_line_error(proc, mnt)
    assert "connect" in line.lower(), line


@pytest.mark.parametrize("mode", MODES)
def test_missing_mountpoint(
    run_fbmount: Run, s3_endpoint: str, bucket: str, dirs: tuple[Path, Path], mode: str
) -> None:
    mnt, cache = dirs
    missing = mnt.parent / "does-not-exist"
    proc = run_mode(run_fbmount, mode, bucket, missing, cache, "--endpoint", s3_endpoint)
    line = assert_one_line_error(proc, missing)
    assert str(missing) in line, line
    assert not missing.exists()


@pytest.mark.parametrize("mode", MODES)
def test_password_file_readable_by_others_is_refused(
    run_fbmount: Run,
    auth_server: LocalS3Server,
    auth_bucket: str,
    dirs: tuple[Path, Path],
    tmp_path: Path,
    mode: str,
) -> None:
    mnt, cache = dirs
    pw = tmp_path / "passwd"
    pw.write_text(f"{AUTH_KEY}:{AUTH_SECRET}\n")
    pw.chmod(0o644)
    proc = run_mode(
        run_fbmount,
        mode,
        auth_bucket,
        mnt,
        cache,
        "--endpoint",
        auth_server.endpoint,
        "--passwd-file",
        str(pw),
        env={"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None},
    )
    line = assert_one_line_error(proc, mnt)
    assert str(pw) in line and "600" in line, line
    assert AUTH_SECRET not in proc.stderr


@pytest.mark.parametrize("option", ["bogus_option", "bogus=1", "uid=abc"])
def test_bad_o_option_is_refused(
    run_fbmount: Run, s3_endpoint: str, bucket: str, dirs: tuple[Path, Path], option: str
) -> None:
    mnt, cache = dirs
    proc = run_mode(
        run_fbmount,
        "foreground",
        bucket,
        mnt,
        cache,
        "--endpoint",
        s3_endpoint,
        "-o",
        f"ro,{option}",
    )
    line = assert_one_line_error(proc, mnt)
    assert option.split("=")[0] in line or "abc" in line, line


def test_unknown_command_line_option_is_one_line(
    run_fbmount: Run, s3_endpoint: str, bucket: str, dirs: tuple[Path, Path]
) -> None:
    mnt, cache = dirs
    proc = run_mode(
        run_fbmount, "foreground", bucket, mnt, cache, "--endpoint", s3_endpoint, "--no-such-option"
    )
    assert_one_line_error(proc, mnt)


# --------------------------------------------------------------------------- working mounts
def test_password_file_0600_works(
    mount: MountFactory, auth_server: LocalS3Server, auth_bucket: str, tmp_path: Path
) -> None:
    """Keys from an s3fs-style file (no env keys at all) are accepted by a checking server;
    the bucket-specific line of s3fs's multi-bucket format wins over the plain one."""
    pw = tmp_path / "passwd-fbmount"
    pw.write_text(
        "# s3fs format\n"
        f"otherbucket:nokey:nosecret\n"
        f"{auth_bucket}:{AUTH_KEY}:{AUTH_SECRET}\n"
        "fallbackkey:fallbacksecret\n"
    )
    pw.chmod(0o600)
    m = mount(
        auth_bucket,
        "--endpoint",
        auth_server.endpoint,
        "--passwd-file",
        str(pw),
        env={"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None},
    )
    assert (m.path / "hello.txt").read_bytes() == b"hello from auth"
    assert AUTH_SECRET not in m.log_text()
    assert m.unmount() == 0


def test_o_options_take_effect(s3: Any, bucket: str, mount: MountFactory) -> None:
    s3.put_object(Bucket=bucket, Key="dir/file", Body=b"data")
    m = mount(
        bucket,
        "-o",
        "ro,uid=1234,gid=4321,umask=077",
        "-o",
        "_netdev,nofail,noatime,x-systemd.automount,attr_ttl=1,dir_ttl=1",
    )
    root = os.stat(m.path)
    assert (root.st_uid, root.st_gid) == (1234, 4321)
    assert stat.S_IMODE(root.st_mode) == 0o700
    d = os.stat(m.path / "dir")
    assert stat.S_ISDIR(d.st_mode) and stat.S_IMODE(d.st_mode) == 0o700
    assert (d.st_uid, d.st_gid) == (1234, 4321)
    f = os.stat(m.path / "dir/file")
    assert stat.S_ISREG(f.st_mode) and stat.S_IMODE(f.st_mode) == 0o600
    assert (f.st_uid, f.st_gid) == (1234, 4321)
    assert (m.path / "dir/file").read_bytes() == b"data"
    assert os.statvfs(m.path).f_flag & os.ST_RDONLY
    with pytest.raises(OSError) as exc:
        (m.path / "dir/new").write_bytes(b"x")
    assert exc.value.errno == errno.EROFS
    # attr_ttl=1 came through -o: a change behind the mount shows within seconds.
    s3.put_object(Bucket=bucket, Key="dir/file", Body=b"longer data")
    deadline = time.monotonic() + 15
    while os.stat(m.path / "dir/file").st_size != len(b"longer data"):
        assert time.monotonic() < deadline, "-o attr_ttl=1 had no effect"
        time.sleep(0.2)
    assert m.unmount() == 0


def test_daemon_mode(
    run_fbmount: Run, s3: Any, s3_endpoint: str, bucket: str, dirs: tuple[Path, Path]
) -> None:
    """Without -f the command returns 0 once the mount answers; fusermount3 -u ends it."""
    s3.put_object(Bucket=bucket, Key="greeting", Body=b"hi from the daemon")
    mnt, cache = dirs
    with reap_daemons(mnt):
        proc = run_fbmount(
            bucket, str(mnt), "--endpoint", s3_endpoint, "--cache-dir", str(cache), timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr and "fbmount: " not in proc.stderr, proc.stderr
        assert is_mounted(mnt)  # mounted by the time the command returned
        pids = fbmount_pids(mnt)
        assert len(pids) == 1, pids
        assert (mnt / "greeting").read_bytes() == b"hi from the daemon"
        assert os.listdir(mnt) == ["greeting"]
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True, timeout=30)
        assert wait_gone(pids, 30) == [], "the daemon did not exit after fusermount3 -u"
        assert not is_mounted(mnt)
