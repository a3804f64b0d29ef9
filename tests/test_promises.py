"""README promises that had no test of their own (issue #15), each on a real mount.

Every test mounts SeaweedFS for real, most through tests/faultproxy.py so that the S3
requests a file-system action causes are counted, inspected (headers through a rule's
``where=`` predicate that never fires) or faulted. Waits are on events with a bound
(``fbmount sync``, ``proxy.wait_idle``, a held request arriving), never on wall-clock
thresholds of the test's own timing.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    AUTH_KEY,
    AUTH_SECRET,
    MountFactory,
    _base_env,
    make_s3_client,
    unique_bucket_name,
    warm_bucket,
)
from faultproxy import FaultProxy, RequestInfo
from helpers import HANG_BOUND, body, bounded, exists, open_uploads, read_file, write_file

MIB = 1024 * 1024
STRICT = ("--upload-delay", "0")
Run = Callable[..., subprocess.CompletedProcess[str]]


# --------------------------------------------------------------------------- helpers
def data_of(size: int, seed: str) -> bytes:
    """Deterministic bytes that differ everywhere between seeds."""
    out = bytearray()
    i = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{i}".encode()).digest() * 128
        i += 1
    return bytes(out[:size])


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


def sync(run_fbmount: Run, mnt: Path) -> None:
    """`fbmount sync`: returns once everything written before it is in S3."""
    r = run_fbmount("sync", str(mnt), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def watch_headers(proxy: FaultProxy, kinds: set[str], names: tuple[str, ...]) -> list[dict]:
    """Record, for each request of `kinds`, its kind, key, query and the headers `names`
    (FaultProxy keeps no headers; a rule whose predicate never matches sees them all)."""
    seen: list[dict] = []

    def look(info: RequestInfo) -> bool:
        if info.kind in kinds:
            entry = {"kind": info.kind, "key": info.key, "query": dict(info.query)}
            entry.update({n: info.header(n) for n in names})
            seen.append(entry)
        return False

    proxy.add_rule(None, "delay", where=look)
    return seen


def keys_in(s3: Any, bucket: str, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out.update(o["Key"] for o in page.get("Contents", []))
    return out


# --------------------------------------------------------------------------- BUCKET:PREFIX
def test_prefix_mount_shows_and_changes_only_keys_below_prefix(
    s3: Any, bucket: str, mount: MountFactory, s3_endpoint: str, run_fbmount: Run
) -> None:
    """`fbmount BUCKET:some/prefix`: only keys below `some/prefix/` show; writes, mkdir,
    renames (file and directory) and deletes land below it; keys outside it (a sibling
    that merely starts with the same letters included) are never listed, read or touched;
    every object request the mount sends names a key below the prefix."""
    outside = {
        "outside.txt": b"not mine",
        "some/other.txt": b"neighbour",
        "some/prefixed-sibling": b"same letters, other prefix",
        "some/prefixed-dir/x": b"also outside",
    }
    inside = {"some/prefix/a.txt": b"alpha", "some/prefix/d/b.txt": b"bravo"}
    for key, data in {**outside, **inside}.items():
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(f"{bucket}:some/prefix", "--endpoint", proxy.endpoint)
        assert sorted(os.listdir(m.path)) == ["a.txt", "d"]
        assert os.listdir(m.path / "d") == ["b.txt"]
        assert read_file(m.path / "a.txt") == b"alpha"
        assert not (m.path / "outside.txt").exists()
        assert not (m.path / "prefixed-sibling").exists()

        write_file(m.path / "new.txt", b"written through the prefix mount")
        (m.path / "newdir").mkdir()
        write_file(m.path / "newdir" / "n.txt", b"in a new dir")
        sync(run_fbmount, m.path)
        assert body(s3, bucket, "some/prefix/new.txt") == b"written through the prefix mount"
        assert body(s3, bucket, "some/prefix/newdir/n.txt") == b"in a new dir"

        os.rename(m.path / "a.txt", m.path / "d" / "a-moved.txt")  # a stored file
        os.rename(m.path / "d", m.path / "e")  # a directory: copy + delete of each key
        os.unlink(m.path / "new.txt")
        subprocess.run(["rm", "-rf", str(m.path / "newdir")], check=True, timeout=60)
        sync(run_fbmount, m.path)
        assert sorted(os.listdir(m.path)) == ["e"]
        assert sorted(os.listdir(m.path / "e")) == ["a-moved.txt", "b.txt"]
        assert m.unmount() == 0

    assert {k for k in keys_in(s3, bucket) if k.startswith("some/prefix/")} == {
        "some/prefix/e/a-moved.txt",
        "some/prefix/e/b.txt",
    } | ({"some/prefix/e/"} & keys_in(s3, bucket))  # a marker for e/ may be kept
    for key, data in outside.items():
        assert body(s3, bucket, key) == data, key
    assert body(s3, bucket, "some/prefix/e/a-moved.txt") == b"alpha"
    assert body(s3, bucket, "some/prefix/e/b.txt") == b"bravo"
    # Every request on an object named a key below the prefix; every LIST asked below it.
    object_paths = [
        r.path
        for r in proxy.records
        if r.path.count("/") >= 2 and r.kind not in ("ListObjects", "DeleteObjects", "HeadBucket")
    ]
    assert object_paths, "no object requests seen"
    stray = [p for p in object_paths if not p.startswith(f"/{bucket}/some/prefix/")]
    assert not stray, stray
    lists = [r.query.get("prefix", "") for r in proxy.records if r.kind == "ListObjects"]
    assert lists and all(p.startswith("some/prefix/") for p in lists), lists
    copies = [r for r in proxy.records if r.kind == "CopyObject"]
    assert copies, "the renames were expected to copy server-side"


# --------------------------------------------------------------------------- Content-MD5
def test_content_md5_on_put_object_and_upload_part(
    s3: Any, bucket: str, mount: MountFactory, s3_endpoint: str
) -> None:
    """README: "parts and PUTs carry Content-MD5 so the server rejects corrupted uploads".
    Each PutObject and UploadPart carries Content-MD5, and it is the MD5 of exactly the
    bytes of that object or part."""
    small = data_of(300_000, "md5-small")
    part = 5 * MIB
    big = data_of(2 * part + 12_345, "md5-big")
    with FaultProxy(s3_endpoint) as proxy:
        seen = watch_headers(proxy, {"PutObject", "UploadPart"}, ("content-md5",))
        m = mount(bucket, "--endpoint", proxy.endpoint, *STRICT, "--part-size", "5")
        assert bounded(write_file, m.path / "small.bin", small) is None
        assert bounded(write_file, m.path / "big.bin", big) is None
        assert m.unmount() == 0
    puts = [e for e in seen if e["kind"] == "PutObject" and e["key"] == "small.bin"]
    assert puts and all(e["content-md5"] == md5_b64(small) for e in puts), puts
    parts = {
        int(e["query"]["partNumber"]): e["content-md5"]
        for e in seen
        if e["kind"] == "UploadPart" and e["key"] == "big.bin"
    }
    expected = {
        n + 1: md5_b64(big[off : off + part]) for n, off in enumerate(range(0, len(big), part))
    }
    assert parts == expected
    missing = [e for e in seen if not e["content-md5"]]
    assert not missing, missing
    assert body(s3, bucket, "small.bin") == small
    assert body(s3, bucket, "big.bin") == big


# --------------------------------------------------------------------------- DeleteObjects refused
def test_refused_delete_objects_falls_back_to_single_deletes(
    s3: Any, bucket: str, mount: MountFactory, s3_endpoint: str, run_fbmount: Run
) -> None:
    """README (Providers): a refused DeleteObjects (501 NotImplemented) makes `rm -rf`
    delete one key at a time. It is probed once and remembered; every key goes."""
    tree = {f"tree/d{i % 3}/f{i:02d}": data_of(100 + i, f"del{i}") for i in range(24)}
    more = {f"more/g{i}": b"x" for i in range(5)}
    for key, data in {**tree, **more}.items():
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    with FaultProxy(s3_endpoint) as proxy:
        refusal = proxy.add_rule("DeleteObjects", "status", status=501, code="NotImplemented")
        m = mount(bucket, "--endpoint", proxy.endpoint)
        assert sorted(os.listdir(m.path)) == ["more", "tree"]
        r = subprocess.run(
            ["rm", "-rf", str(m.path / "tree")], capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0, r.stderr
        assert not (m.path / "tree").exists()
        sync(run_fbmount, m.path)
        assert refusal.fired == 1, "DeleteObjects should be probed once, then remembered"
        deleted = {p.split("/", 2)[2] for p in proxy.paths("DeleteObject")}
        assert set(tree) <= deleted, sorted(set(tree) - deleted)
        assert not keys_in(s3, bucket, "tree/")

        # Remembered: the next rm -rf sends no DeleteObjects at all.
        r = subprocess.run(
            ["rm", "-rf", str(m.path / "more")], capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0, r.stderr
        sync(run_fbmount, m.path)
        assert proxy.counts["DeleteObjects"] == 1
        assert not keys_in(s3, bucket, "more/")
        assert "Traceback" not in m.log_text(), m.log_text()
        assert m.unmount() == 0


# --------------------------------------------------------------------------- 5xx retries
def test_5xx_retried_on_copy_delete_and_create_multipart(
    s3: Any, bucket: str, mount: MountFactory, s3_endpoint: str, run_fbmount: Run
) -> None:
    """README: every S3 request is retried on 5xx. Two 503s on CopyObject, DeleteObject,
    DeleteObjects and CreateMultipartUpload: the rename, the unlink and the big write
    succeed, and the proxy saw each request three times (two refused, one served) while
    fbmount counted one call of each."""
    s3.put_object(Bucket=bucket, Key="stored.bin", Body=b"stored body")
    s3.put_object(Bucket=bucket, Key="doomed.bin", Body=b"doomed")
    big = data_of(11 * MIB + 7, "cmu-retry")
    with FaultProxy(s3_endpoint) as proxy:
        # Write-back (not strict) mode: unlink queues a DeleteObjects batch.
        m = mount(bucket, "--endpoint", proxy.endpoint, "--part-size", "5")
        assert sorted(os.listdir(m.path)) == ["doomed.bin", "stored.bin"]
        assert proxy.wait_idle()
        before = proxy.counts
        rules = {
            kind: proxy.add_rule(kind, "status", status=503, times=2)
            for kind in ("CopyObject", "DeleteObject", "DeleteObjects", "CreateMultipartUpload")
        }
        os.rename(m.path / "stored.bin", m.path / "renamed.bin")  # CopyObject + DeleteObject
        os.unlink(m.path / "doomed.bin")  # a DeleteObjects batch
        assert bounded(write_file, m.path / "big.bin", big) is None  # multipart at sync
        sync(run_fbmount, m.path)
        assert proxy.wait_idle()
        spent = proxy.counts - before
        assert {k: r.fired for k, r in rules.items()} == dict.fromkeys(rules, 2)
        for kind in rules:
            assert spent[kind] == 3, (kind, dict(spent))
        r = run_fbmount("status", str(m.path), "--json", timeout=30)
        assert r.returncode == 0, r.stderr
        requests = json.loads(r.stdout)["requests"]
        for kind in rules:
            assert requests.get(kind) == 1, (kind, requests)  # retried inside one call
        assert m.unmount() == 0
    assert body(s3, bucket, "renamed.bin") == b"stored body"
    assert not exists(s3, bucket, "stored.bin")
    assert not exists(s3, bucket, "doomed.bin")
    assert body(s3, bucket, "big.bin") == big
    assert not open_uploads(s3, bucket)


# --------------------------------------------------------------------------- credentials
@pytest.fixture(scope="module")
def cred_bucket(auth_server: Any) -> str:
    """A bucket on the key-checking server, holding hello.txt."""
    client = make_s3_client(auth_server.endpoint, AUTH_KEY, AUTH_SECRET)
    name = unique_bucket_name("creds")
    client.create_bucket(Bucket=name)
    warm_bucket(client, name)
    client.put_object(Bucket=name, Key="hello.txt", Body=b"hello from auth")
    return name


def watch_access_keys(proxy: FaultProxy) -> list[str]:
    """The access key each request was signed with (header or pre-signed query)."""
    seen: list[str] = []

    def look(info: RequestInfo) -> bool:
        auth = info.header("authorization") or ""
        cred = auth.partition("Credential=")[2] or info.query.get("X-Amz-Credential", "")
        seen.append(cred.split("/", 1)[0])
        return False

    proxy.add_rule(None, "delay", where=look)
    return seen


def secret_file(path: Path, line: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(line + "\n")
    path.chmod(0o600)
    return path


GOOD = f"{AUTH_KEY}:{AUTH_SECRET}"
NO_ENV_KEYS = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}


def test_credential_sources_in_readme_order(
    auth_server: Any, cred_bucket: str, mount: MountFactory, tmp_path: Path
) -> None:
    """README (Credentials): `--passwd-file`; then AWS_ACCESS_KEY_ID/SECRET (+ session
    token) from the environment; then ~/.passwd-fbmount; then botocore's chain (a
    profile, ~/.aws/credentials). Each source carries a different key and only the one
    expected to win is valid on the server; the proxy checks that every request was
    signed with it and no other."""
    home = tmp_path / "home"
    home.mkdir()
    secret_file(home / ".passwd-fbmount", "HOMEKEYBAD:home-secret-bad")
    env_bad = {"AWS_ACCESS_KEY_ID": "ENVKEYBAD", "AWS_SECRET_ACCESS_KEY": "env-secret-bad"}
    aws = home / ".aws" / "credentials"
    aws.parent.mkdir()
    aws.write_text(
        "[default]\naws_access_key_id = DEFAULTKEYBAD\naws_secret_access_key = d-bad\n"
        f"[chosen]\naws_access_key_id = {AUTH_KEY}\naws_secret_access_key = {AUTH_SECRET}\n"
    )
    aws.chmod(0o600)
    base = {"HOME": str(home), "AWS_SHARED_CREDENTIALS_FILE": None}

    def mounts_with(args: tuple[str, ...], env: dict[str, str | None], expect: str) -> None:
        with FaultProxy(auth_server.endpoint) as proxy:
            keys = watch_access_keys(proxy)
            m = mount(cred_bucket, *args, endpoint=proxy.endpoint, env={**base, **env})
            assert read_file(m.path / "hello.txt") == b"hello from auth"
            assert m.unmount() == 0
        assert keys and set(keys) == {expect}, (args, env, sorted(set(keys)))
        assert expect == AUTH_KEY or "Traceback" not in m.log_text()

    # 1. --passwd-file beats the environment and ~/.passwd-fbmount.
    pw = secret_file(tmp_path / "explicit.passwd", GOOD)
    mounts_with(("--passwd-file", str(pw)), env_bad, AUTH_KEY)
    # 2. The environment beats ~/.passwd-fbmount (and ~/.aws/credentials).
    mounts_with((), {"AWS_ACCESS_KEY_ID": AUTH_KEY, "AWS_SECRET_ACCESS_KEY": AUTH_SECRET}, AUTH_KEY)
    # 3. ~/.passwd-fbmount beats ~/.aws/credentials' default profile.
    secret_file(home / ".passwd-fbmount", GOOD)
    aws_default_good = aws.read_text()
    mounts_with((), NO_ENV_KEYS, AUTH_KEY)
    # 4. Nothing of fbmount's own: botocore's chain, ~/.aws/credentials [default] ...
    (home / ".passwd-fbmount").unlink()
    good_default = aws_default_good.replace("DEFAULTKEYBAD", AUTH_KEY)
    aws.write_text(good_default.replace("d-bad", AUTH_SECRET))
    mounts_with((), NO_ENV_KEYS, AUTH_KEY)
    # 5. ... or the profile named by --profile (bad default, good [chosen]). botocore lets an
    # explicitly named profile override environment keys, and fbmount follows it.
    aws.write_text(aws_default_good)
    mounts_with(("--profile", "chosen"), NO_ENV_KEYS, AUTH_KEY)
    mounts_with(("--profile", "chosen"), env_bad, AUTH_KEY)


def test_session_token_from_the_environment_is_sent(
    auth_server: Any, cred_bucket: str, run_fbmount: Run, tmp_path: Path
) -> None:
    """AWS_SESSION_TOKEN goes with the environment's keys: the request that checks them
    carries it as X-Amz-Security-Token. (SeaweedFS takes a session token for an STS
    credential it did not issue and refuses it, so the mount itself fails here: what is
    tested is that the token is sent, with the environment's key.)"""
    seen: list[tuple[str | None, str]] = []

    def look(info: RequestInfo) -> bool:
        auth = info.header("authorization") or ""
        token = info.header("x-amz-security-token")
        seen.append((token, auth.partition("Credential=")[2].split("/", 1)[0]))
        return False

    mnt = tmp_path / "mnt-token"
    mnt.mkdir()
    with FaultProxy(auth_server.endpoint) as proxy:
        proxy.add_rule(None, "delay", where=look)
        env = {
            "HOME": str(tmp_path),
            "AWS_ACCESS_KEY_ID": AUTH_KEY,
            "AWS_SECRET_ACCESS_KEY": AUTH_SECRET,
            "AWS_SESSION_TOKEN": "session-token-of-this-test",
        }
        # Daemon mode: returns whether or not the server takes the token.
        r = run_fbmount(
            cred_bucket, str(mnt), "--endpoint", proxy.endpoint, "--cache-dir",
            str(tmp_path / "cache-token"), env=env, timeout=60,
        )  # fmt: skip
        if r.returncode == 0:
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=60)
    assert seen and set(seen) == {("session-token-of-this-test", AUTH_KEY)}, (set(seen), r)
    assert "session-token-of-this-test" not in r.stdout + r.stderr  # never printed


ETC_SCRIPT = r"""
set -u
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$OV/upper,workdir=$OV/work" /etc || exit 90
printf '%s\n' "$ETC_LINE" > /etc/passwd-fbmount && chmod 600 /etc/passwd-fbmount || exit 91
"$PY" -m fbmount "$BUCKET" "$MNT" -f --endpoint "$EP" --cache-dir "$CACHE" >>"$LOG" 2>&1 &
pid=$!
trap 'kill -9 $pid 2>/dev/null; fusermount3 -uz "$MNT" 2>/dev/null' EXIT
i=0
until mountpoint -q "$MNT"; do
    kill -0 $pid 2>/dev/null || { wait $pid; exit 92; }
    i=$((i + 1)); [ $i -gt 600 ] && exit 93
    sleep 0.05
done
cat "$MNT/hello.txt" || exit 94
fusermount3 -u "$MNT"
wait $pid
"""


def test_etc_passwd_fbmount_comes_after_home(
    auth_server: Any, cred_bucket: str, tmp_path: Path
) -> None:
    """/etc/passwd-fbmount is read when no earlier source has keys, and ~/.passwd-fbmount
    wins over it. The real /etc is never written: fbmount runs in a private mount
    namespace (unshare -m) whose /etc is an overlay with its upper layer in tmp_path."""
    home = tmp_path / "home"
    home.mkdir()
    real_etc_file = Path("/etc/passwd-fbmount").exists()

    def run_in_namespace(etc_line: str, n: int) -> tuple[subprocess.CompletedProcess, list]:
        ov, mnt, cache = tmp_path / f"ov{n}", tmp_path / f"mnt{n}", tmp_path / f"cache{n}"
        for d in (ov / "upper", ov / "work", mnt, cache):
            d.mkdir(parents=True)
        env = _base_env({"HOME": str(home), **NO_ENV_KEYS}, tmp_path)
        with FaultProxy(auth_server.endpoint) as proxy:
            keys = watch_access_keys(proxy)
            env.update(
                OV=str(ov),
                ETC_LINE=etc_line,
                PY=sys.executable,
                BUCKET=cred_bucket,
                MNT=str(mnt),
                EP=proxy.endpoint,
                CACHE=str(cache),
                LOG=str(tmp_path / f"fbmount{n}.log"),
            )
            r = subprocess.run(
                ["unshare", "-m", "--propagation", "private", "sh", "-c", ETC_SCRIPT],
                capture_output=True,
                text=True,
                env=env,
                timeout=120,
            )
        assert Path("/etc/passwd-fbmount").exists() == real_etc_file  # the real /etc untouched
        return r, keys

    def log(n: int) -> str:
        return (tmp_path / f"fbmount{n}.log").read_text(errors="replace")

    # Only /etc has keys: they are used.
    r, keys = run_in_namespace(GOOD, 0)
    assert r.returncode == 0 and r.stdout == "hello from auth", (r, log(0))
    assert set(keys) == {AUTH_KEY}, set(keys)
    # ~/.passwd-fbmount (good) beats /etc/passwd-fbmount (bad).
    secret_file(home / ".passwd-fbmount", GOOD)
    r, keys = run_in_namespace("ETCKEYBAD:etc-secret-bad", 1)
    assert r.returncode == 0 and r.stdout == "hello from auth", (r, log(1))
    assert set(keys) == {AUTH_KEY}, set(keys)
    # And the other way round: a bad home file is not skipped in favour of /etc.
    secret_file(home / ".passwd-fbmount", "HOMEKEYBAD:home-secret-bad")
    r, keys = run_in_namespace(GOOD, 2)
    assert r.returncode == 92, (r, log(2))  # fbmount refused to mount
    assert set(keys) == {"HOMEKEYBAD"}, set(keys)
    assert "refused the credentials" in log(2), log(2)


# --------------------------------------------------------------------------- --max-rps
def test_max_rps_limits_the_request_rate_seen_by_the_server(
    s3: Any, bucket: str, mount: MountFactory, s3_endpoint: str
) -> None:
    """--max-rps 20: 100 HEAD-causing stats from 8 threads reach the server no faster than
    20 a second after a burst of at most one second's worth. Measured on the proxy's
    arrival times of the requests, not on the test's own clock: the 100 HEADs span at
    least (100 - 20 - 1) / 20 s, and no window of W seconds holds more than 20·W + 20."""
    rate, n = 20, 100
    keys = [f"many/o{i:03d}" for i in range(n)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket=bucket, Key=k, Body=b"x"), keys))
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--endpoint", proxy.endpoint, "--max-rps", str(rate))
        assert sorted(os.listdir(m.path / "many")) == [k.split("/")[1] for k in keys]
        with ThreadPoolExecutor(8) as pool:
            sizes = list(pool.map(lambda k: os.stat(m.path / k).st_size, keys))
        assert sizes == [1] * n
        assert proxy.wait_idle()
        records = sorted(proxy.records, key=lambda r: r.started)
        assert m.unmount() == 0
    heads = [r.started for r in records if r.kind == "HeadObject" and "/many/" in r.path]
    assert len(heads) >= n, len(heads)  # each unseen object's first stat is one HEAD
    span = heads[-1] - heads[0]
    assert span >= (n - rate - 1) / rate - 0.1, f"{len(heads)} HEADs within {span:.2f} s"
    times = [r.started for r in records]
    for window in (1.0, 2.0):
        most = max(sum(1 for t in times[i:] if t < start + window) for i, start in enumerate(times))
        assert most <= rate * window + rate + 1, (window, most)
    print(f"\n[max-rps] {len(heads)} HEADs at --max-rps {rate} spanned {span:.2f} s")


# --------------------------------------------------------------------------- concurrent writers
WRITER = r"""
import os, sys
path, offset, seed, size = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
import hashlib
data = bytearray()
i = 0
while len(data) < size:
    data += hashlib.sha256(f"{seed}:{i}".encode()).digest() * 128
    i += 1
fd = os.open(path, os.O_WRONLY)  # no O_TRUNC: like dd conv=notrunc
for off in range(0, size, 64 * 1024):  # many small pwrites, interleaved with the others
    os.pwrite(fd, data[off : min(off + 64 * 1024, size)], offset + off)
os.close(fd)
"""


@pytest.mark.parametrize("stored", [False, True], ids=["new-file", "stored-object"])
def test_concurrent_writers_on_disjoint_ranges_of_one_file(
    s3: Any, bucket: str, mount: MountFactory, run_fbmount: Run, stored: bool
) -> None:
    """Six processes pwrite disjoint ranges of one file at once (one of them past the
    end); the ranges nobody wrote keep the old bytes (of the stored object, or zeros of
    the new file's size). In S3 after `fbmount sync`: exactly the merged content."""
    size = 8 * MIB
    old = data_of(size, "old") if stored else bytes(size)
    if stored:
        s3.put_object(Bucket=bucket, Key="shared.bin", Body=old)
    m = mount(bucket, "--part-size", "5")
    path = m.path / "shared.bin"
    if not stored:
        with open(path, "wb") as f:
            f.truncate(size)
    ranges = [(0, MIB), (MIB + 4096, MIB), (3 * MIB, 777_777), (5 * MIB - 1, 2)]
    ranges += [(6 * MIB, MIB + 3), (size + 123, 500_000)]  # the last one grows the file
    expected = bytearray(old)
    expected += bytes(size + 123 + 500_000 - len(expected))
    procs = []
    for n, (offset, length) in enumerate(ranges):
        expected[offset : offset + length] = data_of(length, f"w{n}")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", WRITER, str(path), str(offset), f"w{n}", str(length)]
            )
        )
    for p in procs:
        assert p.wait(timeout=120) == 0
    assert bounded(read_file, path) == bytes(expected)
    sync(run_fbmount, m.path)
    assert body(s3, bucket, "shared.bin") == bytes(expected)
    assert m.unmount() == 0
    assert body(s3, bucket, "shared.bin") == bytes(expected)


# --------------------------------------------------------------------------- races with uploads
@pytest.mark.parametrize("phase", ["request", "response"])
def test_overwrite_rename_and_read_while_a_put_is_in_flight(
    s3: Any, bucket: str, mount: MountFactory, s3_endpoint: str, run_fbmount: Run, phase: str
) -> None:
    """The proxy holds the PutObject of a closed file (before the server sees it, or after
    it stored the bytes but before fbmount hears so). Meanwhile the test reads the file,
    overwrites it and renames it: reading and overwriting never wait for the held PUT,
    reads give the newest bytes, and once the PUT is let go what ends up in S3 is the
    last write under the last name, nothing under the old one. (A rename may wait for
    the upload in flight, so it is issued from a thread just before the release.)"""
    v1, v2 = data_of(200_000, "race-v1"), data_of(150_001, "race-v2")
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--endpoint", proxy.endpoint, "--upload-delay", "0.2")
        hold = proxy.add_rule("PutObject", "hold", key=f"/{bucket}/race.bin", phase=phase, times=1)
        try:
            write_file(m.path / "race.bin", v1)
            assert hold.wait_held(30), "the upload of race.bin never started"
            assert bounded(read_file, m.path / "race.bin", timeout=20) == v1
            assert bounded(write_file, m.path / "race.bin", v2, timeout=20) is None
            assert bounded(read_file, m.path / "race.bin", timeout=20) == v2
            # A rename waits for the upload in flight (it must then delete the old key);
            # it runs in a thread while the PUT is let go.
            with ThreadPoolExecutor(1) as pool:
                renamed = pool.submit(os.rename, m.path / "race.bin", m.path / "final.bin")
                hold.release()
                assert renamed.result(timeout=HANG_BOUND) is None
            assert bounded(read_file, m.path / "final.bin", timeout=20) == v2
        finally:
            hold.release()
        sync(run_fbmount, m.path)
        assert proxy.wait_idle(timeout=30)
        assert hold.fired == 1
        assert sorted(os.listdir(m.path)) == ["final.bin"]
        assert body(s3, bucket, "final.bin") == v2
        assert not exists(s3, bucket, "race.bin")
        assert m.unmount() == 0
    assert body(s3, bucket, "final.bin") == v2
    assert not exists(s3, bucket, "race.bin")


@pytest.mark.parametrize("phase", ["request", "response"])
def test_overwrite_while_a_part_is_in_flight(
    s3: Any, bucket: str, mount: MountFactory, s3_endpoint: str, run_fbmount: Run, phase: str
) -> None:
    """The same with a multipart upload: an UploadPart of the first version is held while
    the file is rewritten smaller; the last write wins and no upload stays open."""
    v1, v2 = data_of(12 * MIB + 5, "part-v1"), data_of(3 * MIB + 1, "part-v2")
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--endpoint", proxy.endpoint, "--upload-delay", "0.2", "--part-size", "5")
        hold = proxy.add_rule("UploadPart", "hold", key=f"/{bucket}/big.bin", phase=phase, times=1)
        try:
            assert bounded(write_file, m.path / "big.bin", v1) is None
            assert hold.wait_held(30), "no part of big.bin went up"
            assert bounded(write_file, m.path / "big.bin", v2, timeout=20) is None
            assert bounded(read_file, m.path / "big.bin", timeout=20) == v2
        finally:
            hold.release()
        sync(run_fbmount, m.path)
        assert body(s3, bucket, "big.bin") == v2
        assert m.unmount() == 0
    assert body(s3, bucket, "big.bin") == v2
    assert not open_uploads(s3, bucket)


# --------------------------------------------------------------------------- If-Match
def read_all_of(path: Path) -> tuple[bytes, int | None]:
    """Read an open file to the end: (bytes handed over, errno of the error that ended
    it or None)."""
    got = bytearray()
    with open(path, "rb", buffering=0) as f:
        try:
            while chunk := f.read(MIB):
                got += chunk
        except OSError as e:
            return bytes(got), e.errno
    return bytes(got), None


@pytest.mark.parametrize("size", [100_000, 20 * MIB], ids=["one-get", "read-ahead"])
def test_object_replaced_while_its_get_is_held_gives_eio(
    s3: Any, bucket: str, mount: MountFactory, s3_endpoint: str, size: int
) -> None:
    """README: reads pin the ETag seen at open (If-Match). The proxy holds the reader's
    ranged GETs; the object is replaced behind the mount; the GETs go on and the server
    answers 412. The reader gets EIO, never a byte of the new version (and never a mix);
    the next open reads the new version whole."""
    old, new = b"A" * size, b"B" * (size + 17)
    s3.put_object(Bucket=bucket, Key="obj", Body=old)
    with FaultProxy(s3_endpoint) as proxy:
        seen = watch_headers(proxy, {"GetObject"}, ("if-match", "range"))
        m = mount(bucket, "--endpoint", proxy.endpoint)
        assert os.stat(m.path / "obj").st_size == size
        hold = proxy.add_rule("GetObject", "hold", key=f"/{bucket}/obj")
        with ThreadPoolExecutor(1) as pool:
            try:
                reading = pool.submit(read_all_of, m.path / "obj")
                assert hold.wait_held(30), "the read sent no GET"
                s3.put_object(Bucket=bucket, Key="obj", Body=new)  # behind the mount
            finally:
                hold.release()
            got, err = reading.result(timeout=HANG_BOUND)
        proxy.remove_rule(hold)
        assert err == errno.EIO, (len(got), err)
        assert set(got) <= {ord("A")}, "bytes of the new version reached the reader"
        assert len(got) < size
        gets = [e for e in seen if e["key"] == "obj"]
        assert gets and all(e["if-match"] for e in gets), gets
        assert any(r.kind == "GetObject" and r.upstream_status == 412 for r in proxy.records)
        assert bounded(read_file, m.path / "obj") == new  # the next open: the new version
        assert m.unmount() == 0
