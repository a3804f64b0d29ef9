"""What Filebase asks of a client, checked through real mounts (nothing mocked).

Filebase serves HTTPS only (certificates verified), keeps an object's IPFS CID in its
metadata (``x-amz-meta-cid``), may refuse CopyObject, has no object ACLs and documents a
request-rate limit. Here: a module-scoped SeaweedFS speaking HTTPS with a certificate from
a throw-away CA (trustme) for the TLS paths, the session SeaweedFS (through the counting
FaultProxy where requests matter) for everything else.
"""

from __future__ import annotations

import datetime
import errno
import os
import random
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import trustme
from conftest import (
    ACCESS_KEY,
    SECRET_KEY,
    MountFactory,
    is_mounted,
    make_s3_client,
    unique_bucket_name,
    warm_bucket,
)
from faultproxy import FaultProxy, RequestInfo
from helpers import body, exists, fail_lines, read_file, status_json, sync_path, write_file

from fbmount import format as fmt
from fbmount.localserver import LocalS3Server

Run = Callable[..., subprocess.CompletedProcess[str]]
STRICT = ("--upload-delay", "0")
CID = "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi"  # the IPFS docs' example
FBX = "user.fbmount."
# How long a failing fbmount may take: a liveness bound, never a timing assertion.
FAIL_TIMEOUT = 60.0


# --------------------------------------------------------------------------- helpers
def data_of(n: int, seed: int | str = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def stored_xattrs(s3: Any, bucket: str, key: str) -> dict[str, bytes]:
    md = s3.head_object(Bucket=bucket, Key=key)["Metadata"]
    return fmt.decode_xattrs(md["xattr"]) if "xattr" in md else {}


def expect_errno(errs: int | set[int], fn: Callable[..., Any], *args: Any) -> int:
    wanted = {errs} if isinstance(errs, int) else errs
    with pytest.raises(OSError) as info:
        fn(*args)
    assert info.value.errno in wanted, f"{fn.__name__}{args}: {info.value!r}, wanted {wanted}"
    return info.value.errno


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    """The contract for every startup failure: exit 1, ONE stderr line "fbmount: ..."."""
    assert r.returncode == 1, f"exit {r.returncode}\nstdout={r.stdout!r}\nstderr={r.stderr!r}"
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, f"wanted one line, got:\n{r.stderr}"
    assert lines[0].startswith("fbmount: "), lines[0]
    return lines[0]


def watch_acl_headers(proxy: FaultProxy) -> tuple[list[str], list[int]]:
    """Record any ACL header or ACL-setting/object ?acl request fbmount sends (Filebase has
    no object ACLs).

    FaultProxy keeps no request headers, so a rule that never fires inspects each request
    head. It must be the first rule: a status rule (refuse_copy) ends the rule scan.
    Returns (offences, [requests inspected]).
    """
    offences: list[str] = []
    inspected = [0]

    def where(info: RequestInfo) -> bool:
        inspected[0] += 1
        for name, _ in info.headers:
            low = name.lower()
            if low == "x-amz-acl" or low.startswith("x-amz-grant-"):
                offences.append(f"{info.kind} {info.path}: {name}")
        # Reading the bucket's ACL (to pick default modes) is fine; setting one, or any
        # object ACL, is not.
        if "acl" in info.query and (info.method != "GET" or info.key):
            offences.append(f"{info.kind} {info.path}: ?acl")
        return False

    proxy.add_rule(kind=None, action="delay", where=where)
    return offences, inspected


# --------------------------------------------------------------------------- TLS fixtures
@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throw-away CA; a leaf for IP 127.0.0.1; and an expired leaf from the same CA."""
    d = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    leaf = ca.issue_cert("127.0.0.1")
    # The chain, so a client trusting only the CA verifies the leaf.
    (d / "cert.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(d / "key.pem"))
    expired = ca.issue_cert(
        "127.0.0.1",
        not_before=datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC),
        not_after=datetime.datetime(2021, 1, 1, tzinfo=datetime.UTC),
    )
    expired.private_key_and_cert_chain_pem.write_to_path(str(d / "expired.pem"))
    return {
        "dir": d,
        "ca": d / "ca.pem",
        "cert": d / "cert.pem",
        "key": d / "key.pem",
        "expired": d / "expired.pem",
    }


@pytest.fixture(scope="module")
def tls_server(
    tmp_path_factory: pytest.TempPathFactory, tls_dir: dict[str, Path]
) -> Iterator[LocalS3Server]:
    """SeaweedFS serving S3 over HTTPS only, checking signatures like Filebase does."""
    with LocalS3Server(
        tmp_path_factory.mktemp("seaweedfs-tls"),
        identities={ACCESS_KEY: SECRET_KEY},
        tls_cert=tls_dir["cert"],
        tls_key=tls_dir["key"],
        stop_timeout=2.0,
        die_with_parent=True,
    ) as server:
        yield server


@pytest.fixture(scope="module")
def tls_s3(tls_server: LocalS3Server, tls_dir: dict[str, Path]) -> Any:
    return make_s3_client(tls_server.endpoint, verify=str(tls_dir["ca"]))


@pytest.fixture(scope="module")
def tls_bucket(tls_s3: Any) -> str:
    """A bucket on the TLS server holding hello.txt (the server is disposable)."""
    name = unique_bucket_name("tls")
    tls_s3.create_bucket(Bucket=name)
    warm_bucket(tls_s3, name)
    tls_s3.put_object(Bucket=name, Key="hello.txt", Body=b"hello over tls")
    return name


class TlsListener:
    """A TLS port presenting a given certificate (here: an expired one).

    Clients that verify never get past the handshake, so nothing S3 is needed behind it;
    the rare client that gets through receives a 503. Bounded: every socket has a timeout.
    """

    def __init__(self, pem: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(pem))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.handshakes_failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="tls-listener")
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            raw.settimeout(5)
            try:
                with self.ctx.wrap_socket(raw, server_side=True) as tls:
                    tls.recv(65536)
                    tls.sendall(
                        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                        b"Connection: close\r\n\r\n"
                    )
            except (ssl.SSLError, OSError):
                self.handshakes_failed += 1
            finally:
                raw.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


# --------------------------------------------------------------------------- TLS tests
def test_tls_mount_with_ca_bundle(
    mount: MountFactory,
    tls_server: LocalS3Server,
    tls_s3: Any,
    tls_bucket: str,
    tls_dir: dict[str, Path],
) -> None:
    """--endpoint https://127.0.0.1:PORT --ca-bundle ca.pem: the mount reads and writes."""
    m = mount(
        tls_bucket, "--endpoint", tls_server.endpoint, "--ca-bundle", str(tls_dir["ca"]), *STRICT
    )
    assert "hello.txt" in os.listdir(m.path)
    assert read_file(m.path / "hello.txt") == b"hello over tls"
    data = data_of(300_000, "tls")
    write_file(m.path / "up.bin", data)
    assert read_file(m.path / "up.bin") == data
    assert body(tls_s3, tls_bucket, "up.bin") == data
    assert m.unmount() == 0


@pytest.mark.parametrize("mode", ["foreground", "daemon"])
def test_tls_untrusted_certificate_fails_in_one_line(
    run_fbmount: Run, tmp_path: Path, tls_server: LocalS3Server, tls_bucket: str, mode: str
) -> None:
    """Without --ca-bundle the private CA is not trusted: exit 1, one line that says the
    certificate does not verify and how to fix it, nothing mounted."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    args = [
        tls_bucket,
        str(mnt),
        "--endpoint",
        tls_server.endpoint,
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    r = run_fbmount(*args, *(["-f"] if mode == "foreground" else []), timeout=FAIL_TIMEOUT)
    line = one_line_error(r)
    print(f"untrusted ({mode}): {line}")
    assert "certificate" in line and "does not verify" in line
    assert "--ca-bundle" in line
    assert not is_mounted(mnt)


def test_tls_expired_certificate_fails_in_one_line(
    run_fbmount: Run, tmp_path: Path, tls_dir: dict[str, Path], tls_bucket: str
) -> None:
    """A certificate past its notAfter (from a trusted CA): one line that says 'expired'."""
    listener = TlsListener(tls_dir["expired"])
    try:
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        r = run_fbmount(
            tls_bucket,
            str(mnt),
            "-f",
            "--endpoint",
            f"https://127.0.0.1:{listener.port}",
            "--ca-bundle",
            str(tls_dir["ca"]),
            "--cache-dir",
            str(tmp_path / "cache"),
            timeout=FAIL_TIMEOUT,
        )
    finally:
        listener.close()
    line = one_line_error(r)
    print(f"expired: {line}")
    assert "certificate" in line and "expired" in line
    assert not is_mounted(mnt)


def test_http_endpoint_on_tls_port_fails_in_one_line(
    run_fbmount: Run, tmp_path: Path, tls_server: LocalS3Server, tls_bucket: str
) -> None:
    """--endpoint http:// against the HTTPS port: a clear line naming https, not a hang."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    plain = tls_server.endpoint.replace("https://", "http://", 1)
    r = run_fbmount(
        tls_bucket,
        str(mnt),
        "-f",
        "--endpoint",
        plain,
        "--cache-dir",
        str(tmp_path / "cache"),
        timeout=FAIL_TIMEOUT,
    )
    line = one_line_error(r)
    print(f"http on tls port: {line}")
    assert "https://" in line
    assert not is_mounted(mnt)


def test_https_endpoint_on_plain_port_fails_in_one_line(
    run_fbmount: Run, tmp_path: Path, s3_endpoint: str, bucket: str
) -> None:
    """The reverse mistake, https:// against a plain-HTTP port: one line, not a hang."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    tls = s3_endpoint.replace("http://", "https://", 1)
    r = run_fbmount(
        bucket,
        str(mnt),
        "-f",
        "--endpoint",
        tls,
        "--cache-dir",
        str(tmp_path / "cache"),
        timeout=FAIL_TIMEOUT,
    )
    line = one_line_error(r)
    print(f"https on plain port: {line}")
    assert "TLS" in line and "http://" in line
    assert not is_mounted(mnt)


def test_doctor_tls(
    run_fbmount: Run,
    tls_server: LocalS3Server,
    tls_bucket: str,
    tls_dir: dict[str, Path],
    tmp_path: Path,
) -> None:
    """`fbmount doctor` says TLS ok with the bundle, FAIL with a fix line without it."""
    good = run_fbmount(
        "doctor",
        tls_bucket,
        "--endpoint",
        tls_server.endpoint,
        "--ca-bundle",
        str(tls_dir["ca"]),
        timeout=FAIL_TIMEOUT,
    )
    assert "Traceback" not in good.stderr, good.stderr
    assert any(ln.startswith("ok    TLS") for ln in good.stdout.splitlines()), good.stdout
    assert "ok    bucket" in good.stdout, good.stdout
    # Not the exit status: another worker's test may leave a stale mount on purpose.
    assert fail_lines(good.stdout, tmp_path) == [], good.stdout + good.stderr

    bad = run_fbmount("doctor", tls_bucket, "--endpoint", tls_server.endpoint, timeout=FAIL_TIMEOUT)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "Traceback" not in bad.stderr, bad.stderr
    lines = bad.stdout.splitlines()
    fails = [i for i, ln in enumerate(lines) if ln.startswith("FAIL  TLS")]
    assert fails, bad.stdout
    assert "does not verify" in lines[fails[0]]
    assert lines[fails[0] + 1].strip().startswith("fix:") and "--ca-bundle" in lines[fails[0] + 1]


# --------------------------------------------------------------------------- xattrs
def test_fbmount_xattrs_listed_and_cid(s3: Any, bucket: str, mount: MountFactory) -> None:
    """getfattr -d -m - shows etag, content_type, storage_class, url (and cid where Filebase
    stored one); the URL fetches the object's bytes."""
    photo = data_of(50_000, "photo")
    s3.put_object(
        Bucket=bucket, Key="photo.jpg", Body=photo, ContentType="image/jpeg", Metadata={"cid": CID}
    )
    s3.put_object(Bucket=bucket, Key="plain.txt", Body=b"no cid here", ContentType="text/plain")
    m = mount(bucket)
    p, q = m.path / "photo.jpg", m.path / "plain.txt"
    base = {FBX + n for n in ("etag", "content_type", "storage_class", "url")}
    assert base | {FBX + "cid"} <= set(os.listxattr(p))
    names_q = set(os.listxattr(q))
    assert base <= names_q and FBX + "cid" not in names_q

    assert os.getxattr(p, FBX + "cid").decode() == CID
    expect_errno(errno.ENODATA, os.getxattr, q, FBX + "cid")
    assert os.getxattr(p, FBX + "etag").decode() == s3.head_object(Bucket=bucket, Key="photo.jpg")[
        "ETag"
    ].strip('"')
    assert os.getxattr(p, FBX + "content_type") == b"image/jpeg"
    assert os.getxattr(p, FBX + "storage_class") == b"STANDARD"
    url = os.getxattr(p, FBX + "url").decode()
    assert url.startswith("http")
    with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - our loopback URL
        assert r.read() == photo

    out = subprocess.run(
        ["getfattr", "-d", "-m", "-", str(p)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    dumped = dict(ln.split("=", 1) for ln in out.splitlines() if "=" in ln)
    assert dumped[FBX + "cid"] == f'"{CID}"'
    assert dumped[FBX + "content_type"] == '"image/jpeg"'
    assert {FBX + "etag", FBX + "storage_class", FBX + "url"} <= set(dumped)


def test_setxattr_on_new_file_costs_no_request(
    s3: Any, bucket: str, mount: MountFactory, s3_endpoint: str
) -> None:
    """create + write + setxattr + close = ONE PutObject carrying the xattrs (s3fs format,
    header ``xattr``); they round-trip through a remount."""
    with FaultProxy(s3_endpoint) as proxy:
        offences, inspected = watch_acl_headers(proxy)
        m = mount(bucket, "--endpoint", proxy.endpoint, *STRICT)
        p = m.path / "notes.txt"
        before = proxy.counts
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, b"some notes")
        os.setxattr(p, "user.author", b"ada")
        os.setxattr(p, "user.bin", b'\x00\xff,:"{}')
        assert os.getxattr(p, "user.author") == b"ada"
        os.close(fd)
        assert proxy.wait_idle(10)
        spent = proxy.counts - before
        assert spent["PutObject"] == 1, dict(spent)
        assert spent["CopyObject"] == spent["CreateMultipartUpload"] == 0, dict(spent)
        assert m.unmount() == 0
        assert (proxy.counts - before)["PutObject"] == 1
        assert inspected[0] > 0 and offences == []
    assert stored_xattrs(s3, bucket, "notes.txt") == {
        "user.author": b"ada",
        "user.bin": b'\x00\xff,:"{}',
    }
    assert body(s3, bucket, "notes.txt") == b"some notes"
    m2 = mount(bucket)
    p2 = m2.path / "notes.txt"
    assert os.getxattr(p2, "user.author") == b"ada"
    assert os.getxattr(p2, "user.bin") == b'\x00\xff,:"{}'
    assert {"user.author", "user.bin"} <= set(os.listxattr(p2))


@pytest.mark.parametrize("copy", ["copy-allowed", "copy-refused"])
def test_setxattr_removexattr_on_stored_file(
    s3: Any, bucket: str, mount: MountFactory, s3_endpoint: str, copy: str
) -> None:
    """On a stored object a user.* change is a metadata update: CopyObject onto itself, or
    (CopyObject refused) a re-upload; the body survives, removexattr works too."""
    data = data_of(200_000, "stored")
    s3.put_object(Bucket=bucket, Key="doc.bin", Body=data, Metadata={"mode": "33184"})
    with FaultProxy(s3_endpoint) as proxy:
        offences, _ = watch_acl_headers(proxy)
        if copy == "copy-refused":
            proxy.refuse_copy()
        m = mount(bucket, "--endpoint", proxy.endpoint, *STRICT)
        p = m.path / "doc.bin"
        os.setxattr(p, "user.color", b"blue")
        os.setxattr(p, "user.size", b"L")
        sync_path(p)
        assert stored_xattrs(s3, bucket, "doc.bin") == {"user.color": b"blue", "user.size": b"L"}
        assert body(s3, bucket, "doc.bin") == data
        assert s3.head_object(Bucket=bucket, Key="doc.bin")["Metadata"]["mode"] == "33184"
        assert proxy.counts["CopyObject"] >= 1
        if copy == "copy-refused":
            assert proxy.counts["CopyObject"] == 1  # probed once, then remembered
            assert proxy.counts["PutObject"] + proxy.counts["CompleteMultipartUpload"] >= 1

        os.removexattr(p, "user.size")
        expect_errno(errno.ENODATA, os.getxattr, p, "user.size")
        expect_errno(errno.ENODATA, os.removexattr, p, "user.size")
        sync_path(p)
        assert stored_xattrs(s3, bucket, "doc.bin") == {"user.color": b"blue"}
        assert body(s3, bucket, "doc.bin") == data
        if copy == "copy-refused":
            assert proxy.counts["CopyObject"] == 1
        assert m.unmount() == 0
        assert offences == []
    m2 = mount(bucket)
    assert os.getxattr(m2.path / "doc.bin", "user.color") == b"blue"
    expect_errno(errno.ENODATA, os.getxattr, m2.path / "doc.bin", "user.size")


def test_xattr_errors(s3: Any, bucket: str, mount: MountFactory) -> None:
    """ENODATA for a missing name, EPERM for user.fbmount.*, ENOTSUP outside user.* (EPERM
    allowed for setxattr),
    an error for names s3fs's header cannot hold, E2BIG past the 2 KiB metadata cap."""
    m = mount(bucket, *STRICT)
    p = m.path / "f.txt"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x")
        expect_errno(errno.ENODATA, os.getxattr, p, "user.missing")
        expect_errno(errno.ENODATA, os.removexattr, p, "user.missing")
        expect_errno(errno.EPERM, os.setxattr, p, FBX + "etag", b"forged")
        expect_errno(errno.EPERM, os.setxattr, p, FBX + "anything", b"x")
        for name in ("trusted.x", "security.x"):
            expect_errno({errno.ENOTSUP, errno.EPERM}, os.setxattr, p, name, b"x")
        # Not stored, so not supported: ls -l then stops asking for every file's
        # SELinux label and ACL (two FUSE round trips per entry).
        for name in ("security.selinux", "system.posix_acl_access", "trusted.x"):
            expect_errno(errno.ENOTSUP, os.getxattr, p, name)
        for name in ("user.a:b", "user.a,b", 'user.a"b'):
            expect_errno({errno.ENOTSUP, errno.EINVAL}, os.setxattr, p, name, b"x")
            assert name not in os.listxattr(p)
        os.setxattr(p, "user.ok", b"v" * 400)  # fits with room to spare
        expect_errno(errno.E2BIG, os.setxattr, p, "user.big", b"v" * fmt.MAX_USER_METADATA_BYTES)
        expect_errno(errno.ENODATA, os.getxattr, p, "user.big")
        # Replacing a value that fits with one that does not keeps the old one.
        expect_errno(errno.E2BIG, os.setxattr, p, "user.ok", b"w" * fmt.MAX_USER_METADATA_BYTES)
        assert os.getxattr(p, "user.ok") == b"v" * 400
    finally:
        os.close(fd)
    assert stored_xattrs(s3, bucket, "f.txt") == {"user.ok": b"v" * 400}
    md = s3.head_object(Bucket=bucket, Key="f.txt")["Metadata"]
    assert fmt.metadata_size(md) <= fmt.MAX_USER_METADATA_BYTES


# --------------------------------------------------------------------------- content type
def test_content_type_from_name(s3: Any, bucket: str, mount: MountFactory) -> None:
    m = mount(bucket, *STRICT)
    want = {
        "x.html": "text/html",
        "x.json": "application/json",
        "x.unknownext": "application/octet-stream",
    }
    for name in want:
        write_file(m.path / name, b"{}")
    for name, ctype in want.items():
        assert s3.head_object(Bucket=bucket, Key=name)["ContentType"] == ctype
        assert os.getxattr(m.path / name, FBX + "content_type").decode() == ctype


# --------------------------------------------------------------------------- providers
def test_provider_filebase_mounts_and_counts(
    s3: Any, bucket: str, mount: MountFactory, run_fbmount: Run, s3_endpoint: str
) -> None:
    """--provider filebase (100 requests/s client-side): the mount works and status shows
    the request counts. No timing is asserted; the elapsed time is printed."""
    s3.put_object(Bucket=bucket, Key="hello.txt", Body=b"hi")
    # Objects written by another client carry metadata fbmount has not seen: the first
    # stat of each costs one HEAD (~300 HEADs: about 2 s at 100/s, ~0.5 s unlimited here).
    n = 300
    keys = [f"many/o{i:03d}" for i in range(n)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket=bucket, Key=k, Body=b"x"), keys))
    with FaultProxy(s3_endpoint) as proxy:
        offences, _ = watch_acl_headers(proxy)
        m = mount(bucket, "--endpoint", proxy.endpoint, "--provider", "filebase", *STRICT)
        st = status_json(run_fbmount, m.path)
        assert st.get("max_rps") == 100.0 and st.get("provider") == "filebase", st
        before = st["requests"]
        t0 = time.monotonic()
        for key in keys:
            assert os.stat(m.path / key).st_size == 1
        elapsed = time.monotonic() - t0
        print(f"{n} HEAD-causing stats under --provider filebase: {elapsed:.2f} s")
        after = status_json(run_fbmount, m.path)["requests"]
        heads = after.get("HeadObject", 0) - before.get("HeadObject", 0)
        assert heads >= n, after
        assert proxy.counts["HeadObject"] >= heads
        assert read_file(m.path / "hello.txt") == b"hi"
        write_file(m.path / "new.txt", b"written")
        assert body(s3, bucket, "new.txt") == b"written"
        assert m.unmount() == 0
        assert offences == []


def test_copy_no_streams_renames(
    s3: Any, bucket: str, mount: MountFactory, run_fbmount: Run, s3_endpoint: str
) -> None:
    """--copy no: a rename never sends CopyObject; the object is streamed GET → PUT."""
    data = data_of(300_000, "nocopy")
    s3.put_object(Bucket=bucket, Key="a.bin", Body=data)
    with FaultProxy(s3_endpoint) as proxy:
        offences, _ = watch_acl_headers(proxy)
        m = mount(bucket, "--endpoint", proxy.endpoint, "--copy", "no", *STRICT)
        assert read_file(m.path / "a.bin") == data  # known to the mount
        before = proxy.counts
        os.rename(m.path / "a.bin", m.path / "b.bin")
        spent = proxy.counts - before
        assert spent["CopyObject"] == 0 and spent["UploadPartCopy"] == 0, dict(spent)
        assert spent["GetObject"] >= 1, dict(spent)
        assert spent["PutObject"] + spent["CompleteMultipartUpload"] == 1, dict(spent)
        assert read_file(m.path / "b.bin") == data
        assert status_json(run_fbmount, m.path)["copy_supported"] is False
        assert m.unmount() == 0
        assert proxy.counts["CopyObject"] == 0
        assert offences == []
    assert body(s3, bucket, "b.bin") == data
    assert not exists(s3, bucket, "a.bin")


def test_copy_auto_probes_once_when_refused(
    s3: Any, bucket: str, mount: MountFactory, run_fbmount: Run, s3_endpoint: str
) -> None:
    """--copy auto with CopyObject refused: the first rename probes (1 refused CopyObject)
    and streams, later renames send no CopyObject at all."""
    blobs = {f"f{i}.bin": data_of(100_000 + i, i) for i in range(3)}
    for key, data in blobs.items():
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    with FaultProxy(s3_endpoint) as proxy:
        offences, _ = watch_acl_headers(proxy)
        refusal = proxy.refuse_copy()
        m = mount(bucket, "--endpoint", proxy.endpoint, "--copy", "auto", *STRICT)
        assert status_json(run_fbmount, m.path)["copy_supported"] is None
        for i, key in enumerate(blobs):
            os.rename(m.path / key, m.path / f"r{key}")
            assert proxy.counts["CopyObject"] == 1, f"after rename {i + 1}"
        assert refusal.fired == 1
        assert status_json(run_fbmount, m.path)["copy_supported"] is False
        for key, data in blobs.items():
            assert read_file(m.path / f"r{key}") == data
        assert m.unmount() == 0
        assert offences == []
    for key, data in blobs.items():
        assert body(s3, bucket, f"r{key}") == data
        assert not exists(s3, bucket, key)


def test_bucket_acl_cors_versioning_as_root_xattrs(s3: Any, bucket: str, mount: Any) -> None:
    """Bucket-level settings are not filesystem concepts: read-only xattrs on the root."""
    m = mount(bucket)
    names = os.listxattr(m.path)
    assert "user.fbmount.versioning" in names
    assert os.getxattr(m.path, "user.fbmount.versioning").decode() in ("Disabled", "Suspended")
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    assert os.getxattr(m.path, "user.fbmount.versioning") == b"Enabled"
    if "user.fbmount.acl" in names:
        assert os.getxattr(m.path, "user.fbmount.acl").decode() in ("private", "public-read")
    expect_errno(errno.EPERM, os.setxattr, m.path, "user.fbmount.versioning", b"Suspended")
    expect_errno(errno.EPERM, os.setxattr, m.path, "user.fbmount.acl", b"public-read")
    expect_errno(errno.EPERM, os.removexattr, m.path, "user.fbmount.versioning")
    assert os.getxattr(m.path, "user.fbmount.versioning") == b"Enabled"  # unchanged
    (m.path / "sub").mkdir()
    # Only the bucket root has them: elsewhere the attribute does not exist.
    expect_errno(errno.ENODATA, os.getxattr, m.path / "sub", "user.fbmount.versioning")
