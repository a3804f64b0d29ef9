"""Security properties of real mounts: secrets, permissions, hostile keys.

- The secret key never shows: not in the --debug log, the process's cmdline or environment,
  the cache directory, `fbmount status`, a pre-signed URL, or the error of a refused login.
- A password file others can read is refused.
- Other users see nothing without `allow_other`; with it, `default_permissions` holds them
  to the modes fbmount shows.
- The cache directory is private (0700, staged files 0600).
- Keys created in S3 by other tools — `.`/`..` segments, `a//b`, a leading `/`, trailing
  spaces, control characters, 1,024 bytes, a key that is also a prefix — are listed or
  skipped by the README rule (Semantics), never followed, never crash the daemon, and can
  never make fbmount write outside its cache directory.

SeaweedFS refuses keys with `.`/`..` segments and folds `a//b` → `a/b` and `/x` → `x`, so
those objects are stored under placeholder segments and a small proxy rewrites only the
ListObjectsV2 bodies (placeholder → `..`, `.`, empty) — the keys a real S3 would list.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
from conftest import Mount, MountFactory
from faultproxy import FaultProxy
from helpers import body
from listrewrite import ListRewriteProxy, running

Run = Callable[..., subprocess.CompletedProcess[str]]
NOBODY = 65534
NO_ENV_KEYS = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}

# Placeholder segments stored in SeaweedFS → the real-S3 segment they stand for. Longest
# first: "DOTDOTSEG" contains "DOTSEG".
REWRITES = {b"DOTDOTSEG": b"..", b"DOTSEG": b".", b"EMPTYSEG": b""}


@pytest.fixture
def rewrite_proxy(s3_endpoint: str) -> Iterator[ListRewriteProxy]:
    with running(s3_endpoint, REWRITES) as proxy:
        yield proxy


# --------------------------------------------------------------------------- helpers
def all_keys(s3: Any, bucket: str) -> set[str]:
    keys: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys.update(o["Key"] for o in page.get("Contents", []))
    return keys


def tree(root: Path, skip: tuple[Path, ...] = ()) -> set[str]:
    """Every path below root (relative), not descending into `skip` (mounts, caches)."""
    out: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        for name in dirnames + filenames:
            out.add(str((here / name).relative_to(root)))
    return out


def mount_options(path: Path) -> set[str]:
    """The options /proc/mounts shows for the mount at `path`."""
    want = str(path)
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        mnt = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
        if mnt == want:
            return set(fields[3].split(","))
    raise AssertionError(f"{path} is not in /proc/mounts")


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv),
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A 0755 directory outside pytest's private (0700) tmp tree, so that another user can
    reach a mount point inside it. Only empty directories are removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="fbmount-sec-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for child in sorted(path.iterdir(), reverse=True):
            with contextlib.suppress(OSError):
                child.rmdir()  # a mount point, unmounted by the mount fixture first
        with contextlib.suppress(OSError):
            path.rmdir()


def passwd_file(tmp_path: Path, access: str, secret: str, mode: int = 0o600) -> Path:
    path = tmp_path / f"passwd-{mode:o}"
    path.write_text(f"{access}:{secret}\n")
    path.chmod(mode)
    return path


def assert_alive(m: Mount) -> None:
    assert m.proc.poll() is None, f"fbmount exited ({m.proc.returncode}):\n{m.log_text()}"
    assert "Traceback" not in m.log_text(), m.log_text()


# --------------------------------------------------------------------------- secrets
def test_secret_never_in_log_process_cache_or_status(
    s3: Any,
    bucket: str,
    mount: MountFactory,
    s3_endpoint: str,
    tmp_path: Path,
    run_fbmount: Run,
) -> None:
    """--debug logs every request and error; the secret must appear in none of it, nor in
    the daemon's cmdline/environ, its cache directory, status output or a signed URL."""
    access = "FBACCESS" + secrets.token_hex(6).upper()
    secret = "fbSecret/" + secrets.token_urlsafe(24)
    pw = passwd_file(tmp_path, access, secret)
    s3.put_object(Bucket=bucket, Key="seed.txt", Body=b"seed")
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(
            bucket,
            "--endpoint",
            proxy.endpoint,
            "--passwd-file",
            str(pw),
            "--debug",
            "--upload-delay",
            "0",
            "-o",
            "retries=2",
            env=NO_ENV_KEYS,
        )
        (m.path / "new.txt").write_bytes(b"new")
        assert (m.path / "seed.txt").read_bytes() == b"seed"
        os.rename(m.path / "new.txt", m.path / "renamed.txt")
        url = os.getxattr(m.path / "seed.txt", "user.fbmount.url").decode()
        assert "X-Amz-Signature=" in url
        # Errors are logged with the server's message: make some.
        proxy.add_rule("PutObject", "status", status=403, code="SignatureDoesNotMatch", times=1)
        with pytest.raises(OSError) as exc:
            (m.path / "denied.txt").write_bytes(b"x")
        assert exc.value.errno == errno.EACCES
        proxy.add_rule("GetObject", "status", status=500, times=8)
        with contextlib.suppress(OSError):
            (m.path / "renamed.txt").read_bytes()
        st = run_fbmount("status", str(m.path), "--json")
        assert st.returncode == 0, st.stderr

        proc = Path(f"/proc/{m.pid}")
        cmdline = (proc / "cmdline").read_bytes()
        environ = (proc / "environ").read_bytes()
        thread_names = b"".join(
            (t / "comm").read_bytes() for t in (proc / "task").iterdir() if (t / "comm").exists()
        )
        assert m.unmount() == 0
    log = m.log_text()
    assert "SignatureDoesNotMatch" in log and "GET renamed.txt" in log  # the errors were logged
    assert access in log or "seed.txt" in log  # --debug really logged requests
    leaks = {
        "log": secret in log,
        "cmdline": secret.encode() in cmdline,
        "environ": secret.encode() in environ,
        "thread names": secret.encode() in thread_names,
        "status": secret in st.stdout + st.stderr,
        "url": secret in url,
    }
    for path in m.cache_dir.rglob("*"):
        if path.is_file():
            leaks[str(path)] = secret.encode() in path.read_bytes()
    assert not any(leaks.values()), {k: v for k, v in leaks.items() if v}


def test_refused_login_error_does_not_show_the_secret(
    bucket: str, s3_endpoint: str, tmp_path: Path, run_fbmount: Run
) -> None:
    """A server refusing the signature: one error line, naming the credentials problem,
    never the secret — with and without --debug."""
    secret = "fbSecret-" + secrets.token_hex(16)
    pw = passwd_file(tmp_path, "FBACCESSBAD", secret)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with FaultProxy(s3_endpoint) as proxy:
        proxy.add_rule(None, "status", status=403, code="SignatureDoesNotMatch")
        for extra in ((), ("--debug",)):
            proc = run_fbmount(
                bucket,
                str(mnt),
                "-f",
                "--endpoint",
                proxy.endpoint,
                "--passwd-file",
                str(pw),
                "--cache-dir",
                str(tmp_path / "cache"),
                *extra,
                env=NO_ENV_KEYS,
                timeout=60,
            )
            assert proc.returncode == 1, proc.stderr
            last = proc.stderr.strip().splitlines()[-1]
            assert last.startswith("fbmount: ") and "credential" in last, last
            if not extra:
                assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
            assert secret not in proc.stdout + proc.stderr
            assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604], ids=lambda m: f"{m:04o}")
def test_password_file_readable_by_others_is_refused(
    bucket: str, s3_endpoint: str, tmp_path: Path, run_fbmount: Run, mode: int
) -> None:
    secret = "fbSecret-" + secrets.token_hex(16)
    pw = passwd_file(tmp_path, "FBACCESS", secret, mode)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for how in (("--passwd-file", str(pw)), ("-o", f"passwd_file={pw}")):
        proc = run_fbmount(
            bucket,
            str(mnt),
            "-f",
            "--endpoint",
            s3_endpoint,
            *how,
            "--cache-dir",
            str(tmp_path / "cache"),
            env=NO_ENV_KEYS,
            timeout=60,
        )
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fbmount: "), proc.stderr
        assert str(pw) in lines[0] and "600" in lines[0], lines[0]
        assert secret not in proc.stderr + proc.stdout
        assert not os.path.ismount(mnt)


# --------------------------------------------------------------------------- permissions
def test_other_users_kept_out_without_allow_other(
    bucket: str, mount: MountFactory, public_dir: Path
) -> None:
    m = mount(bucket, mountpoint=public_dir / "mnt")
    (m.path / "open.txt").write_bytes(b"hello")
    os.chmod(m.path / "open.txt", 0o644)
    opts = mount_options(m.path)
    assert "allow_other" not in opts, opts
    r = as_nobody("cat", str(m.path / "open.txt"))
    assert r.returncode != 0 and "ermission denied" in r.stderr, r
    assert m.unmount() == 0


def test_allow_other_always_brings_default_permissions(
    s3: Any, bucket: str, mount: MountFactory, public_dir: Path
) -> None:
    m = mount(bucket, "-o", "allow_other", "--upload-delay", "0", mountpoint=public_dir / "mnt")
    opts = mount_options(m.path)
    assert {"allow_other", "default_permissions"} <= opts, opts
    (m.path / "public.txt").write_bytes(b"for everyone")
    (m.path / "private.txt").write_bytes(b"root only")
    os.chmod(m.path / "public.txt", 0o644)
    os.chmod(m.path / "private.txt", 0o600)
    os.chmod(m.path, 0o755)
    r = as_nobody("cat", str(m.path / "public.txt"))
    assert r.returncode == 0 and r.stdout == "for everyone", r
    r = as_nobody("cat", str(m.path / "private.txt"))
    assert r.returncode != 0 and "ermission denied" in r.stderr, r
    r = as_nobody("touch", str(m.path / "intruder.txt"))
    assert r.returncode != 0 and "ermission denied" in r.stderr, r
    r = as_nobody("rm", "-f", str(m.path / "public.txt"))
    assert r.returncode != 0, r
    assert m.unmount() == 0
    assert body(s3, bucket, "public.txt") == b"for everyone"
    assert body(s3, bucket, "intruder.txt") is None


def test_cache_directory_is_private(tmp_path: Path, bucket: str, mount: MountFactory) -> None:
    """A --cache-dir fbmount creates is 0700 like everything below it; staged data and
    journal records are 0600; the control socket is 0600 in a 0700 directory."""
    cache = tmp_path / "fresh" / "cache"  # does not exist yet: fbmount creates it
    # (A second --cache-dir overrides the fixture's, which the fixture creates itself.)
    m = mount(bucket, "--upload-delay", "60", "--cache-dir", str(cache))
    assert m.cache_dir != cache
    (m.path / "staged.txt").write_bytes(b"private bytes")
    states = [p for p in cache.iterdir() if p.is_dir()]
    assert len(states) == 1, states
    staging = states[0] / "staging"
    for d in (cache, states[0], staging):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, (d, oct(d.stat().st_mode))
    staged = list(staging.iterdir())
    assert {".data", ".log"} <= {p.suffix for p in staged} <= {".data", ".log", ".spare"}, staged
    for p in staged:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, (p, oct(p.stat().st_mode))
    from fbmount.control import socket_path

    sock = socket_path(m.path)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    assert m.unmount() == 0


# --------------------------------------------------------------------------- hostile keys
def _followed(requests: list[tuple[str, str]], bucket: str) -> list[str]:
    """Requests whose key or listing prefix has an empty, '.' or '..' segment."""
    bad = []
    for method, raw in requests:
        path, _, query = raw.partition("?")
        key = path[len(f"/{bucket}/") :] if path.startswith(f"/{bucket}/") else ""
        prefix = parse_qs(query).get("prefix", [""])[0]
        for name in (key, prefix):
            segments = name.rstrip("/").split("/") if name else []
            if any(s in ("", ".", "..") for s in segments):
                bad.append(f"{method} {raw}")
    return bad


def test_hostile_keys_listed_or_skipped_never_followed(
    s3: Any, bucket: str, mount: MountFactory, rewrite_proxy: ListRewriteProxy
) -> None:
    long_multi = "hk/" + ("y" * 200 + "/") * 5 + "z" * 16  # 1,024 bytes, segments ≤ 255
    long_single = "hk/" + "x" * 1021  # 1,024 bytes, one segment: a name (FUSE passes 1,024)
    assert len(long_multi.encode()) == len(long_single.encode()) == 1024
    listed = {
        "hk/ok.txt": b"ok",
        "hk/trail  ": b"trailing spaces",
        "hk/\x01ctl": b"control char",
        "hk/new\nline": b"newline",
        "hk/tab\tname": b"tab",
        "hk/both": b"hidden object: the prefix wins",
        "hk/both/inner": b"inner",
        long_multi: b"deep and long",
        long_single: b"a long name",
    }
    skipped = {
        "hk/DOTDOTSEG": b"a file called ..",
        "hk/DOTSEG": b"a file called .",
        "hk/DOTDOTSEG/DOTDOTSEG/etc/fbmount-escape": b"../../etc/fbmount-escape",
        "hk/a/EMPTYSEG/b": b"a//b",
        "EMPTYSEG/lead": b"leading slash",
        "hk/EMPTYSEG": b"trailing slash oddity",
    }
    try:
        for key, data in {**listed, **skipped}.items():
            s3.put_object(Bucket=bucket, Key=key, Body=data)
        _check_hostile_keys(s3, bucket, mount, rewrite_proxy, listed)
    finally:
        # One by one: DeleteObjects' XML cannot carry control characters (MalformedXML).
        for key in {**listed, **skipped}:
            s3.delete_object(Bucket=bucket, Key=key)


def _check_hostile_keys(
    s3: Any,
    bucket: str,
    mount: MountFactory,
    rewrite_proxy: ListRewriteProxy,
    listed: dict[str, bytes],
) -> None:
    assert not Path("/etc/fbmount-escape").exists()
    m = mount(bucket, "--endpoint", rewrite_proxy.endpoint)
    hk = m.path / "hk"

    assert os.listdir(m.path) == ["hk"]  # "/lead" has an empty first segment: skipped
    assert sorted(os.listdir(hk)) == sorted(
        [
            "ok.txt",
            "trail  ",
            "\x01ctl",
            "new\nline",
            "tab\tname",
            "both",
            "a",
            "y" * 200,
            "x" * 1021,
        ]
    )
    for key, data in listed.items():
        if key != "hk/both":
            assert (m.path / key).read_bytes() == data, repr(key)
    assert os.listdir(hk / "both") == ["inner"]
    assert stat.S_ISDIR(os.stat(hk / "both").st_mode)
    assert s3.get_object(Bucket=bucket, Key="hk/both")["Body"].read() == listed["hk/both"]
    assert os.listdir(hk / "a") == []  # only "a//b" below it: skipped
    for name in ("..", "."):  # the kernel's own . and .. — never the objects
        assert os.path.samefile(hk / name, hk if name == "." else m.path)
    walked = [os.path.join(d, f) for d, _, files in os.walk(m.path) for f in files]
    assert len(walked) == len(listed) - 1, walked  # every listed file but the hidden "both"
    assert not Path("/etc/fbmount-escape").exists()
    assert _followed(rewrite_proxy.requests, bucket) == []
    assert os.listdir(m.path) == ["hk"]  # still answering
    assert_alive(m)
    assert m.unmount() == 0


def test_dotty_names_never_write_outside_the_cache_dir(
    s3: Any, bucket: str, mount: MountFactory, rewrite_proxy: ListRewriteProxy, tmp_path: Path
) -> None:
    """Keys with '..' segments in S3, and names full of dots and backslashes written through
    the mount: staged files get random names inside the staging dir, nothing appears
    anywhere else, and S3 ends with exactly the keys written."""
    s3.put_object(Bucket=bucket, Key="DOTDOTSEG/DOTDOTSEG/etc/fbmount-x", Body=b"evil")
    s3.put_object(Bucket=bucket, Key="d/DOTDOTSEG/DOTDOTSEG/cache-x", Body=b"evil")
    s3.put_object(Bucket=bucket, Key="d/...", Body=b"three dots")
    sandbox = tmp_path / "sandbox"
    cache = sandbox / "cache"
    mnt = sandbox / "mnt"
    before = tree(tmp_path, skip=(mnt, cache))
    m = mount(
        bucket,
        "--endpoint",
        rewrite_proxy.endpoint,
        "--upload-delay",
        "60",
        cache_dir=cache,
        mountpoint=mnt,
    )
    # (No backslashes: SeaweedFS reads a backslash as "/" and refuses such a key; S3 would not.)
    names = ["...", "..x", "x..", "a..b", "%2e%2e%2fescape", "-rf", "~", " .. "]
    d = m.path / "d"
    assert sorted(os.listdir(d)) == ["..."]  # the '..' keys are skipped
    with open(d / "...", "ab") as f:  # a remote file brought into staging
        f.write(b" and more")
    for name in names[1:]:
        (d / name).write_bytes(name.encode())
    (d / "..sub").mkdir()
    assert os.path.samefile(d / "..sub" / "..", d)
    (d / "..sub" / "...inner").write_bytes(b"inner")
    os.rename(d / "x..", d / "..sub" / "..renamed")
    os.chmod(d / "a..b", 0o600)

    staging = next(p for p in cache.iterdir() if p.is_dir()) / "staging"
    staged = os.listdir(staging)
    names_we_make = r"[0-9a-f]{16}\.(data|spare)|journal-\d+\.log"
    assert staged and all(re.fullmatch(names_we_make, n) for n in staged), staged
    after = tree(tmp_path, skip=(mnt, cache))
    assert after - before <= {"sandbox", "sandbox/cache", "sandbox/mnt"} | {
        p for p in after if re.fullmatch(r"fbmount\d+\.log", p)
    }, after - before
    assert not Path("/etc/fbmount-x").exists() and not Path("/etc/x").exists()
    assert not (sandbox / "cache-x").exists() and not (tmp_path / "cache-x").exists()
    assert_alive(m)
    assert m.unmount() == 0

    expected = {
        "d/...": b"three dots and more",
        "d/..x": b"..x",
        "d/a..b": b"a..b",
        "d/ .. ": b" .. ",
        "d/%2e%2e%2fescape": b"%2e%2e%2fescape",
        "d/-rf": b"-rf",
        "d/~": b"~",
        "d/..sub/...inner": b"inner",
        "d/..sub/..renamed": b"x..",
    }
    for key, data in expected.items():
        assert body(s3, bucket, key) == data, key
    keys = all_keys(s3, bucket) - {
        "DOTDOTSEG/DOTDOTSEG/etc/fbmount-x",
        "d/DOTDOTSEG/DOTDOTSEG/cache-x",
    }
    assert keys == set(expected) | {"d/..sub/"}, keys
    assert _followed(rewrite_proxy.requests, bucket) == []
