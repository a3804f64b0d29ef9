"""fbmount.localserver against a real SeaweedFS: the ground every other test stands on."""

from __future__ import annotations

import io
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import trustme
from botocore.exceptions import ClientError, SSLError
from conftest import empty_and_delete_bucket, make_s3_client, unique_bucket_name, warm_bucket

from fbmount.localserver import _TMP_SOCKETS, LocalS3Server, LocalServerError, free_ports

GOOD_KEY, GOOD_SECRET = "fbm-good-key", "fbm-good-secret"


def _listening(ip: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((ip, port)) == 0


def _pids_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (to prove nothing of ours is left)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def _error_code(exc: ClientError) -> str:
    return exc.response.get("Error", {}).get("Code", "")


# ---------------------------------------------------------------- the session server
def test_server_is_up_on_pinned_loopback_ports(s3_server: LocalS3Server) -> None:
    assert s3_server.running
    assert s3_server.endpoint == f"http://127.0.0.1:{s3_server.s3_port}"
    ports = s3_server.ports
    assert len(set(ports.values())) == len(ports) == 8
    for name, port in ports.items():
        assert _listening("127.0.0.1", port), f"{name} port {port} not listening"
    argv = " ".join(s3_server.command())
    for port in ports.values():
        assert f"={port}" in argv
    # The raised filer name limit was picked up from the data dir's filer.toml.
    assert "max_file_name_length 1024" in s3_server.log_path.read_text()


def test_put_get_roundtrip(s3: Any, bucket: str) -> None:
    body = os.urandom(300_000)
    s3.put_object(Bucket=bucket, Key="dir/blob.bin", Body=body)
    got = s3.get_object(Bucket=bucket, Key="dir/blob.bin")
    assert got["Body"].read() == body
    assert got["ContentLength"] == len(body)
    ranged = s3.get_object(Bucket=bucket, Key="dir/blob.bin", Range="bytes=100-199")
    assert ranged["Body"].read() == body[100:200]


def test_list_more_than_1000_keys(s3: Any, bucket: str) -> None:
    keys = [f"many/{i:05d}" for i in range(1050)]
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket=bucket, Key=k, Body=b"x"), keys))
    listed: list[str] = []
    pages = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="many/"):
        pages += 1
        listed += [obj["Key"] for obj in page.get("Contents", [])]
    assert listed == keys
    assert pages >= 2
    assert time.monotonic() - start < 60


def test_long_keys_and_names(s3: Any, bucket: str) -> None:
    # S3 allows 1,024-byte keys; SeaweedFS's filer limits one path component to 255 bytes
    # unless filer.toml raises it, which LocalS3Server does.
    flat = "k" * 1024
    nested = "d/" + "n" * 1000 + "/f"
    for key in (flat, nested):
        s3.put_object(Bucket=bucket, Key=key, Body=key.encode()[:16])
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == key.encode()[:16]
    listed = s3.list_objects_v2(Bucket=bucket)["Contents"]
    assert {o["Key"] for o in listed} == {flat, nested}


def test_client_drops_expect_header(s3_endpoint: str, bucket: str) -> None:
    """An empty file-like PUT followed by another request must not stall (field notes).
    A stall would show as a read timeout: with no retry allowed, it fails the request
    instead of being measured against the test's clock."""
    client = make_s3_client(
        s3_endpoint, read_timeout=10, retries={"max_attempts": 1, "mode": "standard"}
    )
    sent: list[dict[str, str]] = []
    client.meta.events.register(
        "before-send.s3", lambda request, **_: sent.append(dict(request.headers))
    )
    client.put_object(Bucket=bucket, Key="empty", Body=io.BytesIO(b""))
    client.put_object(Bucket=bucket, Key="after", Body=io.BytesIO(b"data"))
    assert client.get_object(Bucket=bucket, Key="after")["Body"].read() == b"data"
    assert sent and all("Expect" not in h for h in sent)


def test_bucket_helpers(s3: Any) -> None:
    name = unique_bucket_name("Helpers_Test[param-1]")
    assert 3 <= len(name) <= 63 and name == name.lower() and "_" not in name
    s3.create_bucket(Bucket=name)
    warm_bucket(s3, name)
    assert s3.list_objects_v2(Bucket=name).get("KeyCount") == 0  # warm-up object removed
    s3.put_object(Bucket=name, Key="a/b", Body=b"1")
    empty_and_delete_bucket(s3, name)
    with pytest.raises(ClientError):
        s3.head_bucket(Bucket=name)


# ---------------------------------------------------------------- identities + TLS
@pytest.fixture(scope="module")
def tls_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path]:
    ca = trustme.CA()
    bundle = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    return ca, bundle


@pytest.fixture(scope="module")
def secure_server(tmp_path_factory: pytest.TempPathFactory, tls_ca: tuple[trustme.CA, Path]) -> Any:
    """A second server that checks credentials and serves S3 over HTTPS."""
    ca, _ = tls_ca
    certdir = tmp_path_factory.mktemp("tls")
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = certdir / "cert.pem", certdir / "key.pem"
    # The chain, so clients that only trust the CA can verify the leaf.
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    server = LocalS3Server(
        tmp_path_factory.mktemp("seaweedfs-secure"),
        identities={GOOD_KEY: GOOD_SECRET},
        tls_cert=cert,
        tls_key=key,
        stop_timeout=1.0,
    )
    server.start()
    yield server
    server.stop()


def test_secure_server_reports_https_and_its_keys(secure_server: LocalS3Server) -> None:
    assert secure_server.endpoint.startswith("https://127.0.0.1:")
    assert (secure_server.access_key, secure_server.secret_key) == (GOOD_KEY, GOOD_SECRET)
    config = secure_server.data_dir / "s3-identities.json"
    assert config.stat().st_mode & 0o077 == 0  # secrets file is private


def test_tls_with_ca_bundle(secure_server: LocalS3Server, tls_ca: tuple[trustme.CA, Path]) -> None:
    _, bundle = tls_ca
    client = make_s3_client(secure_server.endpoint, GOOD_KEY, GOOD_SECRET, verify=str(bundle))
    name = unique_bucket_name("tls")
    client.create_bucket(Bucket=name)
    warm_bucket(client, name)
    client.put_object(Bucket=name, Key="k", Body=b"over tls")
    assert client.get_object(Bucket=name, Key="k")["Body"].read() == b"over tls"
    empty_and_delete_bucket(client, name)


def test_tls_untrusted_without_ca_bundle(secure_server: LocalS3Server) -> None:
    client = make_s3_client(
        secure_server.endpoint, GOOD_KEY, GOOD_SECRET, verify=True, retries={"max_attempts": 1}
    )
    with pytest.raises(SSLError):
        client.list_buckets()
    # And the plain-HTTP scheme is not served on that port.
    with socket.create_connection(("127.0.0.1", secure_server.s3_port), timeout=5) as raw:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with ctx.wrap_socket(raw) as tls:
            assert tls.version() is not None


@pytest.mark.parametrize(
    ("access", "secret", "expected"),
    [
        ("fbm-unknown-key", GOOD_SECRET, {"InvalidAccessKeyId"}),
        (GOOD_KEY, "wrong-secret", {"SignatureDoesNotMatch"}),
    ],
)
def test_identities_reject_bad_credentials(
    secure_server: LocalS3Server,
    tls_ca: tuple[trustme.CA, Path],
    access: str,
    secret: str,
    expected: set[str],
) -> None:
    _, bundle = tls_ca
    good = make_s3_client(secure_server.endpoint, GOOD_KEY, GOOD_SECRET, verify=str(bundle))
    bad = make_s3_client(secure_server.endpoint, access, secret, verify=str(bundle))
    name = unique_bucket_name("auth")
    good.create_bucket(Bucket=name)
    try:
        good.put_object(Bucket=name, Key="k", Body=b"secret")
        for call in (
            lambda: bad.list_buckets(),
            lambda: bad.get_object(Bucket=name, Key="k"),
            lambda: bad.put_object(Bucket=name, Key="k2", Body=b"x"),
        ):
            with pytest.raises(ClientError) as err:
                call()
            assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
            assert _error_code(err.value) in expected
        assert good.get_object(Bucket=name, Key="k")["Body"].read() == b"secret"
        assert [o["Key"] for o in good.list_objects_v2(Bucket=name)["Contents"]] == ["k"]
    finally:
        empty_and_delete_bucket(good, name)


# ---------------------------------------------------------------- lifecycle
def test_stop_leaves_nothing_and_restart_keeps_data_and_ports(tmp_path: Path) -> None:
    data = tmp_path / "weed-data"
    with LocalS3Server(data, stop_timeout=1.0) as server:
        pid = server.pid
        ports = dict(server.ports)
        client = make_s3_client(server.endpoint)
        client.create_bucket(Bucket="persist")
        client.put_object(Bucket="persist", Key="k", Body=b"kept")
    assert pid is not None
    assert not server.running and server.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert _pids_mentioning(str(data)) == []
    for port in ports.values():
        assert not _listening("127.0.0.1", port)
    # The sockets this server's weed made in /tmp (one per component, named by that
    # component's port). Not every name with every port: a freed port may be another test
    # worker's now, whose weed then makes its own socket under such a name.
    for name, template in _TMP_SOCKETS:
        if name in ports:
            assert not os.path.exists(template.format(ports[name])), name
    server.stop()  # idempotent

    with LocalS3Server(data, stop_timeout=1.0) as again:
        assert again.ports == ports  # remembered in ports.json: stable endpoint
        client = make_s3_client(again.endpoint)
        assert client.get_object(Bucket="persist", Key="k")["Body"].read() == b"kept"
    assert _pids_mentioning(str(data)) == []


def test_start_failure_raises_with_log_and_leaves_nothing(tmp_path: Path) -> None:
    data = tmp_path / "bad"
    # The exit is noticed (not the start timeout, which would give another message).
    server = LocalS3Server(data, extra_args=["-no-such-flag-for-weed"], start_timeout=120)
    with pytest.raises(LocalServerError) as err:
        server.start()
    assert "exited with status" in str(err.value), err.value
    assert "no-such-flag-for-weed" in str(err.value)  # the log tail is in the message
    assert not server.running
    assert _pids_mentioning(str(data)) == []


def test_busy_fixed_port_is_reported(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        server = LocalS3Server(tmp_path / "busy", s3_port=port, start_timeout=30)
        with pytest.raises(LocalServerError, match="address already in use"):
            server.start()
        assert not server.running
        assert _pids_mentioning(str(tmp_path / "busy")) == []


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(8)
    assert len(set(ports)) == 8
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_constructor_validates_tls_pair(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        LocalS3Server(tmp_path, tls_cert=tmp_path / "c.pem")
    with pytest.raises(ValueError):
        LocalS3Server(tmp_path, identities={})


def test_die_with_parent_kills_weed_when_owner_dies_hard(tmp_path: Path) -> None:
    """A test run killed without cleanup (no atexit, no teardown) must not leave weed."""
    data = tmp_path / "orphan"
    script = (
        "import os, sys\n"
        "from fbmount.localserver import LocalS3Server\n"
        f"s = LocalS3Server({str(data)!r}, die_with_parent=True)\n"
        "s.start()\n"
        "print(s.pid, flush=True)\n"
        "os._exit(0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=90, check=True
    )
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 10
    while _pids_mentioning(str(data)) and time.monotonic() < deadline:
        time.sleep(0.1)
    leftover = _pids_mentioning(str(data))
    for stray in leftover:  # never leave it running, even when the assertion fails
        os.kill(stray, signal.SIGKILL)
    assert leftover == [], f"weed (pid {pid}) outlived its owner"
