"""Shared fixtures: a private SeaweedFS per session, boto3 clients, buckets, fbmount mounts.

Every mount a test makes is unmounted and its process stopped in teardown, pass or fail;
a session-finish hook lazily unmounts anything still mounted under pytest's temp dir.
Only processes started here are ever signalled, always by PID.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from fbmount.localserver import LocalS3Server

REPO_ROOT = Path(__file__).resolve().parent.parent
ACCESS_KEY = "testkey"
SECRET_KEY = "testsecret"
# A second identity on the auth_server (which, unlike the session server, checks keys).
AUTH_KEY = "authaccesskey"
AUTH_SECRET = "auth-secret-key-0123456789"
REGION = "us-east-1"
MOUNT_TIMEOUT = 30.0  # seconds for a mount to become live
UNMOUNT_TIMEOUT = 30.0  # seconds for fbmount to flush and exit after fusermount3 -u
FBMOUNT_CMD = [sys.executable, "-m", "fbmount"]

# Every Mount and every tmp dir handed to fbmount this session, for the session-finish
# safety net.
_ALL_MOUNTS: list[Mount] = []
_FBMOUNT_DIRS: set[Path] = set()


# --------------------------------------------------------------------------- S3 helpers
def _drop_expect_header(request: Any, **_: Any) -> None:
    """botocore sends ``Expect: 100-continue`` for file-like bodies; after an empty-body PUT
    that SeaweedFS answers without a 100, the connection's next request stalls until the read
    timeout.  The header is not signed, so dropping it is safe."""
    if "Expect" in request.headers:
        del request.headers["Expect"]


def make_s3_client(
    endpoint: str,
    access_key: str = ACCESS_KEY,
    secret_key: str = SECRET_KEY,
    *,
    verify: str | bool | None = None,
    **config: Any,
) -> Any:
    """A boto3 S3 client for ``endpoint``: path-style, us-east-1, no Expect header.

    ``verify`` is a CA bundle path (or False) for HTTPS endpoints; ``config`` goes to
    botocore ``Config`` (e.g. ``read_timeout=5``).
    """
    options: dict[str, Any] = {
        "s3": {"addressing_style": "path"},
        "retries": {"max_attempts": 2, "mode": "standard"},
        "connect_timeout": 5,
        "read_timeout": 60,
    }
    cfg = Config(**{**options, **config})
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        verify=verify,
        config=cfg,
    )
    client.meta.events.register("before-send.s3", _drop_expect_header)
    return client


def warm_bucket(client: Any, bucket: str) -> None:
    """Write one small object alone, then delete it.

    The first writes to a new SeaweedFS bucket make it grow volumes, and parallel writes
    during that growth can stall for minutes; one lone write first avoids that.
    """
    key = ".fbmount-test-warmup"
    client.put_object(Bucket=bucket, Key=key, Body=b"warm")
    client.delete_object(Bucket=bucket, Key=key)


def empty_and_delete_bucket(client: Any, bucket: str) -> None:
    """Delete every object, pending multipart upload, then the bucket (portable: real S3
    refuses to delete a non-empty bucket, SeaweedFS would not)."""
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    with contextlib.suppress(Exception):
        uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        for up in uploads:
            client.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
    client.delete_bucket(Bucket=bucket)


def unique_bucket_name(hint: str = "t") -> str:
    """A valid, unique bucket name (3-63 chars of a-z, 0-9, '-') containing ``hint``."""
    slug = re.sub(r"[^a-z0-9]+", "-", hint.lower()).strip("-")[:40].strip("-") or "t"
    return f"{slug}-{uuid.uuid4().hex[:12]}"


# --------------------------------------------------------------------------- server
@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3Server]:
    """One private SeaweedFS for the whole session (data is disposable: stop fast)."""
    with LocalS3Server(
        tmp_path_factory.mktemp("seaweedfs"), stop_timeout=2.0, die_with_parent=True
    ) as server:
        yield server


@pytest.fixture(scope="session")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3Server]:
    """A SeaweedFS that checks signatures, knowing ACCESS_KEY and AUTH_KEY. It is also the
    one that answers ListBuckets and keeps bucket ACLs (the session server does neither)."""
    with LocalS3Server(
        tmp_path_factory.mktemp("seaweedfs-auth"),
        identities={ACCESS_KEY: SECRET_KEY, AUTH_KEY: AUTH_SECRET},
        stop_timeout=2.0,
        die_with_parent=True,
    ) as server:
        yield server


@pytest.fixture(scope="session")
def s3_endpoint(s3_server: LocalS3Server) -> str:
    return s3_server.endpoint


@pytest.fixture(scope="session")
def s3(s3_endpoint: str) -> Any:
    """boto3 S3 client for the session server (keys testkey/testsecret)."""
    return make_s3_client(s3_endpoint)


@pytest.fixture
def bucket(s3: Any, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, warmed bucket for this test, emptied and deleted afterwards (best effort)."""
    name = unique_bucket_name(request.node.name)
    s3.create_bucket(Bucket=name)
    warm_bucket(s3, name)
    yield name
    try:
        empty_and_delete_bucket(s3, name)
    except Exception as exc:  # cleanup must not mask the test's own result
        print(f"warning: could not delete bucket {name}: {exc!r}", file=sys.stderr)


# --------------------------------------------------------------------------- mounts
def mounted_paths() -> set[str]:
    """Mount points from /proc/self/mountinfo.

    Reading the table never touches the FUSE filesystem itself, so unlike
    ``os.path.ismount`` it cannot hang on a stuck daemon.
    """
    out: set[str] = set()
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split(" ")
            if len(fields) > 4:
                # Octal escapes for space, tab, newline and backslash.
                out.add(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]))
    return out


def _kernel_path(path: Path | str) -> str:
    """The path as the mount table spells it, without touching ``path`` itself: resolving
    the mount point would send a request to a FUSE daemon that may be hung or dead."""
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def is_mounted(path: Path | str) -> bool:
    return _kernel_path(path) in mounted_paths()


def _fusermount(path: Path | str, lazy: bool = False) -> subprocess.CompletedProcess[str]:
    args = ["fusermount3", "-uz" if lazy else "-u", str(path)]
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=UNMOUNT_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(args, -1, "", f"timeout: {exc}")


def _ismount_bounded(path: Path, timeout: float) -> bool:
    """``os.path.ismount`` in a helper thread, so a daemon that never answers cannot hang
    the test (the stuck thread is released when teardown detaches the mount)."""
    result: list[bool] = []
    worker = threading.Thread(
        target=lambda: result.append(os.path.ismount(path)), daemon=True, name="ismount"
    )
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])


def _base_env(extra: Mapping[str, str | None] | None, tmp: Path) -> dict[str, str]:
    """Environment for fbmount children: test credentials, isolated from the host's AWS
    config and cache dir; ``extra`` overrides, and a value of ``None`` removes the variable."""
    env = dict(os.environ)
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        env.pop(var, None)
    env.update(
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        AWS_CONFIG_FILE="/nonexistent/fbmount-tests/aws-config",
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent/fbmount-tests/aws-credentials",
        AWS_EC2_METADATA_DISABLED="true",
        XDG_CACHE_HOME=str(tmp / "xdg-cache"),  # default --cache-dir lands in the test dir
        PYTHONUNBUFFERED="1",
    )
    pythonpath = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{pythonpath}" if pythonpath else str(REPO_ROOT)
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


class Mount:
    """A running ``fbmount -f`` process and its mount point."""

    def __init__(
        self,
        path: Path,
        proc: subprocess.Popen[bytes],
        log_path: Path,
        cache_dir: Path,
        args: list[str],
    ) -> None:
        self.path = path
        self.proc = proc
        self.log_path = log_path
        self.cache_dir = cache_dir
        self.args = args
        self._log_file: Any = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def sync(self, timeout: float = 120.0) -> None:
        """`fbmount sync`: returns once everything this mount holds staged (files recovered
        from a crash too) is in S3; fails the test if anything could not be stored."""
        r = subprocess.run(
            [*FBMOUNT_CMD, "sync", str(self.path)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_base_env(None, self.path.parent),
            stdin=subprocess.DEVNULL,
        )
        assert r.returncode == 0, f"fbmount sync: {r.stdout}{r.stderr}\n{self.log_text()}"

    def log_text(self) -> str:
        """fbmount's stdout+stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def is_mounted(self) -> bool:
        return is_mounted(self.path)

    def unmount(self, timeout: float = UNMOUNT_TIMEOUT) -> int | None:
        """``fusermount3 -u``, then wait for fbmount to flush and exit.

        Falls back to ``fusermount3 -uz`` and SIGKILL (by PID) if it is still mounted or
        running after ``timeout``.  Returns fbmount's exit status (negative if killed).
        Idempotent; safe to call on a mount that is already gone.
        """
        try:
            # `fusermount3 -u` fails with EBUSY while anything holds the mount for a moment
            # (a path walk from another worker's `fbmount status` of every mount): retry
            # a little, and say why if it never works.
            for _ in range(20):
                if not self.is_mounted():
                    break
                r = _fusermount(self.path)
                if r.returncode == 0:
                    break
                print(f"fusermount3 -u {self.path}: {r.stderr.strip()}", file=sys.stderr)
                time.sleep(0.25)
            if self.proc.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=timeout)
        finally:
            if self.is_mounted():
                _fusermount(self.path, lazy=True)
            if self.proc.poll() is None:
                self.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=10)
            self._close_log()
        return self.proc.returncode

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = UNMOUNT_TIMEOUT) -> int | None:
        """Send ``sig`` (default SIGTERM) and wait for fbmount to exit; returns its status.

        The mount itself is cleaned up by :meth:`unmount` / teardown if fbmount left it.
        """
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)
        return self.proc.returncode

    def kill9(self, unmount: bool = True) -> None:
        """SIGKILL fbmount (a crash).  With ``unmount`` (default) the dead mount is lazily
        detached so the same mount point and cache dir can be mounted again; pass False to
        inspect the dead mount (ENOTCONN) first."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if unmount and self.is_mounted():
            _fusermount(self.path, lazy=True)
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __repr__(self) -> str:
        return f"<Mount {self.path} pid={self.proc.pid} rc={self.proc.returncode}>"


MountFactory = Callable[..., Mount]


@pytest.fixture
def mount(
    s3_endpoint: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[MountFactory]:
    """Factory: ``mount(bucket_spec, *extra_args, env=None, cache_dir=None, mountpoint=None,
    endpoint=None, timeout=30)``.

    Runs ``fbmount BUCKET_SPEC MNT -f --endpoint EP --cache-dir DIR *extra_args`` (EP is the
    session server unless ``endpoint`` is given, e.g. a fault proxy or an https URL) and waits
    until MNT is mounted and answers.  Fails the test with fbmount's log if it exits first.
    ``env`` entries override the environment (``None`` removes a variable).  Pass an earlier
    Mount's ``path``/``cache_dir`` as ``mountpoint``/``cache_dir`` to remount the same place.
    Teardown always unmounts and stops every process this factory started.
    """
    mounts: list[Mount] = []
    counter = iter(range(1_000_000))
    _FBMOUNT_DIRS.add(tmp_path)

    def factory(
        bucket_spec: str,
        *extra_args: str,
        env: Mapping[str, str | None] | None = None,
        cache_dir: Path | str | None = None,
        mountpoint: Path | str | None = None,
        endpoint: str | None = None,
        timeout: float = MOUNT_TIMEOUT,
    ) -> Mount:
        n = next(counter)
        mnt = Path(mountpoint) if mountpoint is not None else tmp_path / f"mnt{n}"
        cache = Path(cache_dir) if cache_dir is not None else tmp_path / f"cache{n}"
        mnt.mkdir(parents=True, exist_ok=True)
        cache.mkdir(parents=True, exist_ok=True)
        log_path = tmp_path / f"fbmount{n}.log"
        args = [
            *FBMOUNT_CMD,
            bucket_spec,
            str(mnt),
            "-f",
            "--endpoint",
            endpoint or s3_endpoint,
            "--cache-dir",
            str(cache),
            *extra_args,
        ]
        log_file = open(log_path, "ab")  # noqa: SIM115 - closed by Mount
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=_base_env(env, tmp_path),
            cwd=tmp_path,
            start_new_session=True,  # terminal ^C goes to pytest only; tests signal by PID
        )
        m = Mount(mnt, proc, log_path, cache, args)
        m._log_file = log_file
        mounts.append(m)
        _ALL_MOUNTS.append(m)

        deadline = time.monotonic() + timeout
        while not m.is_mounted():
            if proc.poll() is not None:
                m.unmount()
                pytest.fail(
                    f"fbmount exited with status {proc.returncode} before mounting "
                    f"{mnt}:\n{m.log_text()}",
                    pytrace=False,
                )
            if time.monotonic() > deadline:
                m.unmount(timeout=5)
                pytest.fail(f"{mnt} not mounted after {timeout:.0f} s:\n{m.log_text()}")
            time.sleep(0.05)
        # The kernel mount exists; the contract's ready signal is that it also answers.
        if not _ismount_bounded(mnt, max(1.0, deadline - time.monotonic())):
            m.unmount(timeout=5)
            pytest.fail(f"{mnt} mounted but not answering:\n{m.log_text()}")
        return m

    yield factory

    errors = []
    for m in reversed(mounts):
        try:
            m.unmount()
        except Exception as exc:
            errors.append(f"{m}: {exc!r}")
        if m.is_mounted() or m.proc.poll() is None:
            errors.append(f"{m} still mounted or running after teardown")
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for m in mounts:
            tail = "\n".join(m.log_text().splitlines()[-80:])
            print(f"--- fbmount log {m.log_path} (last 80 lines) ---\n{tail}", file=sys.stderr)
    if errors:
        pytest.fail("mount teardown: " + "; ".join(errors), pytrace=False)


@pytest.fixture
def run_fbmount(tmp_path: Path) -> Iterator[Callable[..., subprocess.CompletedProcess[str]]]:
    """``run_fbmount(*args, timeout=60, env=None, input=None)``: run the fbmount CLI to
    completion and return the CompletedProcess (text).  Nothing is added to ``args``; the
    environment carries the test credentials.  Anything the run leaves mounted under this
    test's tmp dir is lazily unmounted afterwards."""

    _FBMOUNT_DIRS.add(tmp_path)

    def run(
        *args: str,
        timeout: float = 60.0,
        env: Mapping[str, str | None] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*FBMOUNT_CMD, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_base_env(env, tmp_path),
            cwd=tmp_path,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )

    yield run
    _detach_mounts_under(tmp_path)


def _detach_mounts_under(root: Path) -> list[str]:
    """Lazily unmount every mount point at or below ``root``; returns what was detached."""
    prefix = _kernel_path(root)
    found = sorted(
        (p for p in mounted_paths() if p == prefix or p.startswith(prefix + os.sep)),
        key=len,
        reverse=True,
    )
    for path in found:
        _fusermount(path, lazy=True)
    return found


# --------------------------------------------------------------------------- hooks
@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Expose each phase's report as ``item.rep_<phase>`` so teardown can print logs on
    failure."""
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Safety net: nothing the fixtures mounted or started may outlive the session."""
    for m in _ALL_MOUNTS:
        with contextlib.suppress(Exception):
            if m.proc.poll() is None or m.is_mounted():
                m.unmount(timeout=5)
    leftover: list[str] = []
    for root in _FBMOUNT_DIRS:
        with contextlib.suppress(Exception):
            leftover += _detach_mounts_under(root)
    if leftover:
        print(f"\nfbmount tests: lazily unmounted leftovers {leftover}", file=sys.stderr)
