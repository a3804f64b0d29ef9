"""Tests for tests/faultproxy.py: counting and every fault action, against a real SeaweedFS
(so SigV4 signatures are checked through the proxy) plus a tiny stdlib backend for the wire
details boto3 never exercises (chunked request bodies, Expect handling, keep-alive)."""

from __future__ import annotations

import email.utils
import hashlib
import http.server
import json
import os
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    HTTPClientError,
    IncompleteReadError,
    ResponseStreamingError,
)
from faultproxy import FaultProxy, LogEntry, classify

from fbmount.localserver import LocalS3Server

BUCKET = "faultproxy"
ACCESS_KEY = "AKFAULTPROXY"
SECRET_KEY = "faultproxy-secret"
MiB = 1 << 20
DROPPED = (HTTPClientError, EndpointConnectionError)  # what botocore raises for a lost answer
TRUNCATED = (ResponseStreamingError, IncompleteReadError)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def s3server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3Server]:
    server = LocalS3Server(
        tmp_path_factory.mktemp("weed"), identities={ACCESS_KEY: SECRET_KEY}, stop_timeout=3.0
    )
    server.start()
    try:
        s3 = _client(server.endpoint)
        s3.create_bucket(Bucket=BUCKET)
        s3.put_object(Bucket=BUCKET, Key="first", Body=b"1")  # let the bucket grow alone
        yield server
    finally:
        server.stop()


@pytest.fixture
def proxy(s3server: LocalS3Server) -> Iterator[FaultProxy]:
    with FaultProxy(s3server.endpoint) as p:
        yield p
    assert p.errors == []
    assert not [t for t in threading.enumerate() if t.name == "faultproxy"]


@pytest.fixture
def s3(proxy: FaultProxy):
    return _client(proxy.endpoint)


def _client(endpoint: str, secret: str = SECRET_KEY, pool: int = 10):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=secret,
        region_name="us-east-1",
        config=Config(
            s3={"addressing_style": "path"},
            # total_max_attempts=1: no retries at all ({"max_attempts": 1} still retries once).
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=5,
            read_timeout=15,
            max_pool_connections=pool,
        ),
    )


def _code(exc: ClientError) -> tuple[int, str]:
    return exc.response["ResponseMetadata"]["HTTPStatusCode"], exc.response["Error"]["Code"]


# --------------------------------------------------------------------------- classification
@pytest.mark.parametrize(
    ("method", "target", "headers", "kind"),
    [
        ("GET", "/", {}, "ListBuckets"),
        ("HEAD", "/b", {}, "HeadBucket"),
        ("PUT", "/b", {}, "CreateBucket"),
        ("DELETE", "/b", {}, "DeleteBucket"),
        ("GET", "/b?list-type=2&prefix=a%2F", {}, "ListObjects"),
        ("GET", "/b?prefix=&delimiter=%2F", {}, "ListObjects"),
        ("GET", "/b?uploads", {}, "ListMultipartUploads"),
        ("GET", "/b?location", {}, "Other"),
        ("POST", "/b?delete", {}, "DeleteObjects"),
        ("HEAD", "/b/k", {}, "HeadObject"),
        ("GET", "/b/d/k?versionId=x", {}, "GetObject"),
        ("GET", "/b/k?uploadId=u", {}, "Other"),  # ListParts
        ("PUT", "/b/k", {}, "PutObject"),
        ("PUT", "/b/k", {"X-Amz-Copy-Source": "/b/s"}, "CopyObject"),
        ("PUT", "/b/k?partNumber=1&uploadId=u", {}, "UploadPart"),
        ("PUT", "/b/k?partNumber=1&uploadId=u", {"x-amz-copy-source": "b/s"}, "UploadPartCopy"),
        ("PUT", "/b/k?tagging", {}, "Other"),
        ("POST", "/b/k?uploads", {}, "CreateMultipartUpload"),
        ("POST", "/b/k?uploadId=u", {}, "CompleteMultipartUpload"),
        ("DELETE", "/b/k?uploadId=u", {}, "AbortMultipartUpload"),
        ("DELETE", "/b/k", {}, "DeleteObject"),
        ("PATCH", "/b/k", {}, "Other"),
    ],
)
def test_classify(method: str, target: str, headers: dict[str, str], kind: str) -> None:
    from urllib.parse import parse_qsl, unquote, urlsplit

    parts = urlsplit(target)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    assert classify(method, unquote(parts.path), query, headers.items()) == kind


def test_rule_validation() -> None:
    p = FaultProxy("http://127.0.0.1:9")
    with pytest.raises(ValueError):
        p.add_rule(kind="PutObjekt")
    with pytest.raises(ValueError):
        p.add_rule(kind="PutObject", action="explode")
    with pytest.raises(ValueError):
        p.add_rule(kind="PutObject", action="date")
    with pytest.raises(ValueError):
        FaultProxy("http://192.0.2.1:80")  # only loopback targets
    p.close()  # never started: a no-op


# --------------------------------------------------------------------------- counting
def test_counts_simple_operations(proxy: FaultProxy, s3) -> None:
    s3.put_object(Bucket=BUCKET, Key="count/a b+c", Body=b"hello")
    assert s3.get_object(Bucket=BUCKET, Key="count/a b+c")["Body"].read() == b"hello"
    s3.head_object(Bucket=BUCKET, Key="count/a b+c")
    s3.list_objects_v2(Bucket=BUCKET, Prefix="count/")
    s3.list_objects(Bucket=BUCKET, Prefix="count/")
    s3.head_bucket(Bucket=BUCKET)
    s3.list_buckets()
    s3.delete_object(Bucket=BUCKET, Key="count/a b+c")
    assert dict(proxy.counts) == {
        "PutObject": 1,
        "GetObject": 1,
        "HeadObject": 1,
        "ListObjects": 2,
        "HeadBucket": 1,
        "ListBuckets": 1,
        "DeleteObject": 1,
    }
    assert proxy.counts["ListObjectsV2"] == 2  # alias
    before = proxy.counts  # a snapshot: later requests do not change it
    s3.head_bucket(Bucket=BUCKET)
    assert before["HeadBucket"] == 1 and dict(proxy.counts - before) == {"HeadBucket": 1}
    assert proxy.log[0] == LogEntry("PutObject", "PUT", f"/{BUCKET}/count/a b+c", 200)
    assert [e.kind for e in proxy.log] == [
        "PutObject",
        "GetObject",
        "HeadObject",
        "ListObjects",
        "ListObjects",
        "HeadBucket",
        "ListBuckets",
        "DeleteObject",
        "HeadBucket",
    ]
    assert all(e.status in (200, 204) for e in proxy.log)
    assert proxy.bytes_in >= 5 and proxy.bytes_out >= 5
    assert proxy.records[1].bytes_out == 5  # the GET body
    assert proxy.paths("HeadObject") == [f"/{BUCKET}/count/a b+c"]
    proxy.reset()
    assert proxy.total == 0 and proxy.log == [] and proxy.bytes_in == 0


def test_counts_multipart_copy_and_bucket_ops(proxy: FaultProxy, s3) -> None:
    part1, part2 = os.urandom(5 * MiB), os.urandom(1000)
    up = s3.create_multipart_upload(Bucket=BUCKET, Key="mpu/obj")["UploadId"]
    e1 = s3.upload_part(Bucket=BUCKET, Key="mpu/obj", UploadId=up, PartNumber=1, Body=part1)
    e2 = s3.upload_part(Bucket=BUCKET, Key="mpu/obj", UploadId=up, PartNumber=2, Body=part2)
    s3.list_multipart_uploads(Bucket=BUCKET)
    s3.complete_multipart_upload(
        Bucket=BUCKET,
        Key="mpu/obj",
        UploadId=up,
        MultipartUpload={
            "Parts": [
                {"PartNumber": 1, "ETag": e1["ETag"]},
                {"PartNumber": 2, "ETag": e2["ETag"]},
            ]
        },
    )
    up2 = s3.create_multipart_upload(Bucket=BUCKET, Key="mpu/copy")["UploadId"]
    s3.upload_part_copy(
        Bucket=BUCKET,
        Key="mpu/copy",
        UploadId=up2,
        PartNumber=1,
        CopySource={"Bucket": BUCKET, "Key": "mpu/obj"},
    )
    s3.abort_multipart_upload(Bucket=BUCKET, Key="mpu/copy", UploadId=up2)
    s3.copy_object(Bucket=BUCKET, Key="mpu/obj2", CopySource={"Bucket": BUCKET, "Key": "mpu/obj"})
    s3.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": "mpu/obj"}, {"Key": "mpu/obj2"}]})
    s3.create_bucket(Bucket="faultproxy-tmp")
    s3.delete_bucket(Bucket="faultproxy-tmp")
    assert dict(proxy.counts) == {
        "CreateMultipartUpload": 2,
        "UploadPart": 2,
        "ListMultipartUploads": 1,
        "CompleteMultipartUpload": 1,
        "UploadPartCopy": 1,
        "AbortMultipartUpload": 1,
        "CopyObject": 1,
        "DeleteObjects": 1,
        "CreateBucket": 1,
        "DeleteBucket": 1,
    }
    assert all(200 <= e.status < 300 for e in proxy.log), proxy.log
    assert proxy.bytes_in >= len(part1) + len(part2)


def test_signatures_are_checked_through_the_proxy(proxy: FaultProxy) -> None:
    # The server verifies SigV4 (identities configured), so the passing tests above prove the
    # proxy forwards requests byte-exact; a wrong secret must still be refused.
    bad = _client(proxy.endpoint, secret="wrong-secret")
    with pytest.raises(ClientError) as info:
        bad.head_object(Bucket=BUCKET, Key="first")
    assert _code(info.value)[0] == 403
    assert proxy.log[-1].status == 403


# --------------------------------------------------------------------------- faults
def test_status_times_after_and_key(proxy: FaultProxy, s3) -> None:
    rule = proxy.add_rule(kind="PutObject", action="status", status=503, times=2, after=1)
    s3.put_object(Bucket=BUCKET, Key="st/0", Body=b"0")  # skipped by after=1
    for i in (1, 2):
        with pytest.raises(ClientError) as info:
            s3.put_object(Bucket=BUCKET, Key=f"st/{i}", Body=b"x" * 70_000)
        assert _code(info.value) == (503, "SlowDown")
    s3.put_object(Bucket=BUCKET, Key="st/3", Body=b"3")  # times exhausted
    assert (rule.seen, rule.fired, rule.exhausted) == (4, 2, True)
    assert [e.status for e in proxy.log] == [200, 503, 503, 200]
    with pytest.raises(ClientError):  # the refused PUTs never reached the server
        s3.head_object(Bucket=BUCKET, Key="st/1")

    proxy.clear_rules()
    proxy.add_rule(kind="GetObject", key="st/3", status=403, message="nope")
    proxy.add_rule(kind="HeadObject", status=500, headers={"Retry-After": "1"})
    assert s3.get_object(Bucket=BUCKET, Key="st/0")["Body"].read() == b"0"
    with pytest.raises(ClientError) as info:
        s3.get_object(Bucket=BUCKET, Key="st/3")
    assert _code(info.value) == (403, "AccessDenied")
    assert info.value.response["Error"]["Message"] == "nope"
    with pytest.raises(ClientError) as info:
        s3.head_object(Bucket=BUCKET, Key="st/0")
    assert _code(info.value)[0] == 500
    assert info.value.response["ResponseMetadata"]["HTTPHeaders"]["retry-after"] == "1"


def test_status_on_response_phase_lets_request_take_effect(proxy: FaultProxy, s3) -> None:
    proxy.add_rule(kind="PutObject", status=500, phase="response", times=1)
    with pytest.raises(ClientError) as info:
        s3.put_object(Bucket=BUCKET, Key="phase/put", Body=b"stored anyway")
    assert _code(info.value) == (500, "InternalError")
    assert (proxy.records[-1].status, proxy.records[-1].upstream_status) == (500, 200)
    assert s3.get_object(Bucket=BUCKET, Key="phase/put")["Body"].read() == b"stored anyway"


def test_refuse_copy(proxy: FaultProxy, s3) -> None:
    s3.put_object(Bucket=BUCKET, Key="copy/src", Body=b"source")
    proxy.refuse_copy()
    with pytest.raises(ClientError) as info:
        s3.copy_object(Bucket=BUCKET, Key="copy/dst", CopySource=f"{BUCKET}/copy/src")
    assert _code(info.value) == (501, "NotImplemented")
    up = s3.create_multipart_upload(Bucket=BUCKET, Key="copy/mpu")["UploadId"]
    with pytest.raises(ClientError) as info:
        s3.upload_part_copy(
            Bucket=BUCKET,
            Key="copy/mpu",
            UploadId=up,
            PartNumber=1,
            CopySource=f"{BUCKET}/copy/src",
        )
    assert _code(info.value) == (501, "NotImplemented")
    s3.abort_multipart_upload(Bucket=BUCKET, Key="copy/mpu", UploadId=up)
    with pytest.raises(ClientError):
        s3.head_object(Bucket=BUCKET, Key="copy/dst")
    s3.put_object(Bucket=BUCKET, Key="copy/dst", Body=b"plain put still works")


def test_drop_raises_and_connection_recovers(proxy: FaultProxy, s3) -> None:
    s3.put_object(Bucket=BUCKET, Key="drop/k", Body=b"data")
    proxy.add_rule(kind="HeadObject", action="drop", times=1)
    with pytest.raises(DROPPED):
        s3.head_object(Bucket=BUCKET, Key="drop/k")
    assert s3.head_object(Bucket=BUCKET, Key="drop/k")["ContentLength"] == 4
    assert [e.status for e in proxy.log[-2:]] == [0, 200]

    proxy.add_rule(kind="PutObject", action="drop", times=1)  # with a body on the wire
    with pytest.raises(DROPPED):
        s3.put_object(Bucket=BUCKET, Key="drop/lost", Body=os.urandom(2 * MiB))
    with pytest.raises(ClientError):
        s3.head_object(Bucket=BUCKET, Key="drop/lost")

    proxy.add_rule(kind="PutObject", action="drop", phase="response", times=1)
    with pytest.raises(DROPPED):
        s3.put_object(Bucket=BUCKET, Key="drop/done", Body=b"it arrived")
    assert s3.get_object(Bucket=BUCKET, Key="drop/done")["Body"].read() == b"it arrived"


def test_cut_body_is_detected(proxy: FaultProxy, s3) -> None:
    data = os.urandom(3 * MiB)
    s3.put_object(Bucket=BUCKET, Key="cut/k", Body=data)
    proxy.add_rule(kind="GetObject", action="cut", at_byte=1000, times=1)
    resp = s3.get_object(Bucket=BUCKET, Key="cut/k")
    assert resp["ContentLength"] == len(data)  # the original Content-Length is kept
    with pytest.raises(TRUNCATED):
        resp["Body"].read()
    assert proxy.records[-1].bytes_out == 1000
    assert s3.get_object(Bucket=BUCKET, Key="cut/k")["Body"].read() == data

    proxy.add_rule(kind="GetObject", action="cut", times=1)  # at_byte=0: head only
    resp = s3.get_object(Bucket=BUCKET, Key="cut/k")
    with pytest.raises(TRUNCATED):
        resp["Body"].read()


def test_delay_is_measurable(proxy: FaultProxy, s3) -> None:
    s3.put_object(Bucket=BUCKET, Key="delay/k", Body=os.urandom(256 * 1024))
    t0 = time.monotonic()
    s3.head_object(Bucket=BUCKET, Key="delay/k")
    fast = time.monotonic() - t0
    proxy.add_rule(kind="HeadObject", action="delay", seconds=0.6, times=1)
    t0 = time.monotonic()
    s3.head_object(Bucket=BUCKET, Key="delay/k")
    slow = time.monotonic() - t0
    assert slow >= 0.6 and fast < slow

    proxy.add_rule(kind="GetObject", action="delay", seconds=1.0, at_byte=100_000, times=1)
    t0 = time.monotonic()
    resp = s3.get_object(Bucket=BUCKET, Key="delay/k")
    first = resp["Body"].read(50_000)
    t_first = time.monotonic() - t0
    rest = resp["Body"].read()
    t_all = time.monotonic() - t0
    assert len(first) + len(rest) == 256 * 1024
    assert t_first < 0.9 and t_all >= 1.0


def test_hold_keeps_a_request_until_released(proxy: FaultProxy, s3) -> None:
    """hold (request phase): the server has not seen the PUT while it is held."""
    rule = proxy.add_rule(kind="PutObject", action="hold", key="hold/req", times=1)
    with ThreadPoolExecutor(1) as pool:
        put = pool.submit(s3.put_object, Bucket=BUCKET, Key="hold/req", Body=b"x")
        assert rule.wait_held(10)
        with pytest.raises(ClientError):
            s3.head_object(Bucket=BUCKET, Key="hold/req")  # the PUT is not forwarded yet
        assert not put.done()
        rule.release()
        put.result(timeout=10)
    assert s3.get_object(Bucket=BUCKET, Key="hold/req")["Body"].read() == b"x"


def test_hold_response_phase_lets_the_server_act_first(proxy: FaultProxy, s3) -> None:
    rule = proxy.add_rule(
        kind="PutObject", action="hold", key="hold/resp", phase="response", times=1
    )
    with ThreadPoolExecutor(1) as pool:
        put = pool.submit(s3.put_object, Bucket=BUCKET, Key="hold/resp", Body=b"y")
        assert rule.wait_held(10)
        assert s3.get_object(Bucket=BUCKET, Key="hold/resp")["Body"].read() == b"y"
        assert not put.done()  # the client has no answer yet
        rule.release()
        put.result(timeout=10)


def test_date_rewritten(proxy: FaultProxy, s3) -> None:
    proxy.add_rule(kind="HeadBucket", action="date", skew=7200)
    hdrs = s3.head_bucket(Bucket=BUCKET)["ResponseMetadata"]["HTTPHeaders"]
    skewed = email.utils.parsedate_to_datetime(hdrs["date"]).timestamp()
    assert abs(skewed - (time.time() + 7200)) < 10
    proxy.add_rule(kind="HeadObject", action="date", date="Thu, 01 Jan 2004 00:00:00 GMT")
    proxy.add_rule(kind="HeadObject", status=404, key="missing")
    hdrs = s3.head_object(Bucket=BUCKET, Key="first")["ResponseMetadata"]["HTTPHeaders"]
    assert hdrs["date"] == "Thu, 01 Jan 2004 00:00:00 GMT"
    with pytest.raises(ClientError) as info:  # generated errors carry the rewritten Date too
        s3.head_object(Bucket=BUCKET, Key="missing")
    meta = info.value.response["ResponseMetadata"]
    assert meta["HTTPStatusCode"] == 404
    assert meta["HTTPHeaders"]["date"] == "Thu, 01 Jan 2004 00:00:00 GMT"


# --------------------------------------------------------------------------- volume
def test_large_put_and_streamed_get(proxy: FaultProxy, s3) -> None:
    data = os.urandom(50 * MiB)
    s3.put_object(Bucket=BUCKET, Key="big/50m", Body=data)
    assert proxy.bytes_in >= len(data)
    want = hashlib.sha256(data).hexdigest()
    del data
    tracemalloc.start()
    try:
        body = s3.get_object(Bucket=BUCKET, Key="big/50m")["Body"]
        digest, size = hashlib.sha256(), 0
        for chunk in body.iter_chunks(MiB):
            digest.update(chunk)
            size += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size == 50 * MiB and digest.hexdigest() == want
    print(f"peak traced memory while streaming 50 MiB: {peak / MiB:.1f} MiB")
    assert peak < 16 * MiB, f"proxy or client buffered {peak / MiB:.0f} MiB"
    assert proxy.records[-1].bytes_out == 50 * MiB


def test_concurrent_requests(proxy: FaultProxy) -> None:
    s3 = _client(proxy.endpoint, pool=16)
    s3.put_object(Bucket=BUCKET, Key="conc/warm", Body=b"w")
    proxy.reset()

    def work(i: int) -> bool:
        for j in range(4):
            body = os.urandom(64 * 1024)
            s3.put_object(Bucket=BUCKET, Key=f"conc/{i}/{j}", Body=body)
            if s3.get_object(Bucket=BUCKET, Key=f"conc/{i}/{j}")["Body"].read() != body:
                return False
        return True

    with ThreadPoolExecutor(12) as pool:
        assert all(pool.map(work, range(12)))
    assert proxy.counts["PutObject"] == 48 and proxy.counts["GetObject"] == 48
    assert proxy.wait_idle(5)
    assert proxy.inflight == 0


# --------------------------------------------------------------------------- wire details
class _EchoHandler(http.server.BaseHTTPRequestHandler):
    """Answers every request with what it received (decoded body digest, Host, peer port)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.read(2)
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _answer(self) -> None:
        body = self._body()
        doc = {
            "method": self.command,
            "path": self.path,
            "host": self.headers.get("Host"),
            "expect": self.headers.get("Expect"),
            "len": len(body),
            "sha": hashlib.sha256(body).hexdigest(),
            "peer": self.client_address[1],
        }
        out = json.dumps(doc).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _answer


@pytest.fixture
def echo_proxy() -> Iterator[FaultProxy]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with FaultProxy(f"http://127.0.0.1:{server.server_address[1]}") as p:
            yield p
        assert p.errors == []
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class _Raw:
    """A bare HTTP/1.1 client socket, to control framing and Expect exactly."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def head(self) -> tuple[int, dict[str, str]]:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError("closed before a response head")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        return int(lines[0].split()[1]), headers

    def response(self) -> tuple[int, dict[str, str], bytes]:
        status, headers = self.head()
        n = int(headers.get("content-length", 0))
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionError("closed inside a body")
        body, self.buf = self.buf[:n], self.buf[n:]
        return status, headers, body

    def at_eof(self) -> bool:
        return not self.buf and not self._fill()

    def close(self) -> None:
        self.sock.close()


def _req(method: str, path: str, port: int, extra: str = "", body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: client-signed.example:{port}\r\n{extra}"
    if body and "Transfer-Encoding" not in extra:
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def test_keepalive_chunked_and_host(echo_proxy: FaultProxy) -> None:
    port = echo_proxy.port
    raw = _Raw(port)
    try:
        peers = set()
        for i in range(3):
            raw.send(_req("PUT", f"/b/k{i}", port, body=b"abc" * 1000))
            status, _, body = raw.response()
            doc = json.loads(body)
            assert status == 200 and doc["len"] == 3000
            assert doc["host"] == f"client-signed.example:{port}"  # Host forwarded as-is
            peers.add(doc["peer"])
        assert len(peers) == 1  # one upstream connection served the kept-alive client one

        payload = os.urandom(300_000)
        chunks = [payload[:100_000], payload[100_000:250_000], payload[250_000:]]
        wire = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(c), c) for c in chunks)
        wire += b"0\r\nX-Trailer: t\r\n\r\n"
        raw.send(_req("PUT", "/b/chunked", port, "Transfer-Encoding: chunked\r\n") + wire)
        status, _, body = raw.response()
        doc = json.loads(body)
        assert status == 200 and doc["sha"] == hashlib.sha256(payload).hexdigest()
        assert echo_proxy.records[-1].bytes_in == len(wire)

        raw.send(_req("HEAD", "/b/k0", port))  # no body follows a HEAD answer
        status, headers = raw.head()
        assert status == 200 and int(headers["content-length"]) > 0
        raw.send(_req("GET", "/b/k0", port))
        assert raw.response()[0] == 200
    finally:
        raw.close()
    assert echo_proxy.counts["PutObject"] == 4


def test_expect_100_continue(echo_proxy: FaultProxy) -> None:
    port = echo_proxy.port
    raw = _Raw(port)
    try:
        body = os.urandom(100_000)
        raw.send(
            _req("PUT", "/b/e", port, f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\n")
        )
        assert raw.head()[0] == 100  # the proxy says go on
        raw.send(body)
        status, _, resp = raw.response()
        doc = json.loads(resp)
        assert status == 200 and doc["len"] == len(body) and doc["expect"] is None

        # Refused before the body: the final answer comes at once and the connection closes
        # cleanly (no reset), whether or not the client then sends the body anyway.
        echo_proxy.add_rule(kind="PutObject", status=503, times=1)
        raw.send(
            _req("PUT", "/b/e", port, f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\n")
        )
        raw.send(body)
        status, headers, resp = raw.response()
        assert status == 503 and b"<Code>SlowDown</Code>" in resp
        assert headers["connection"] == "close"
        assert raw.at_eof()
    finally:
        raw.close()

    raw = _Raw(port)  # refused without Expect: the body is read and the connection stays
    try:
        echo_proxy.add_rule(kind="PutObject", status=500, times=1)
        raw.send(_req("PUT", "/b/e", port, body=body))
        assert raw.response()[0] == 500
        raw.send(_req("PUT", "/b/e", port, body=body))
        assert raw.response()[0] == 200
    finally:
        raw.close()


def test_close_stops_everything(s3server: LocalS3Server) -> None:
    proxy = FaultProxy(s3server.endpoint).start()
    idle = _Raw(proxy.port)
    s3 = _client(proxy.endpoint)
    s3.head_bucket(Bucket=BUCKET)
    # An answer that would take 10 minutes: close() must not wait for it (close() itself
    # raises if its thread has not stopped within 10 s), so no timing is measured here.
    proxy.add_rule(kind="HeadObject", action="delay", seconds=600)
    errors: list[BaseException] = []

    def stuck() -> None:
        try:
            s3.head_object(Bucket=BUCKET, Key="first")
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=stuck)
    t.start()
    deadline = time.monotonic() + 5
    while proxy.inflight == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proxy.inflight == 1
    proxy.close()
    t.join(30)
    assert not t.is_alive() and errors and isinstance(errors[0], DROPPED)
    assert idle.at_eof()
    idle.close()
    assert not [th for th in threading.enumerate() if th.name == "faultproxy"]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
    proxy.close()  # idempotent
