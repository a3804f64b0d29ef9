"""A pass-through proxy that rewrites key segments in ListObjectsV2 bodies only.

SeaweedFS refuses to store `.`/`..` segments and folds `a//b` into `a/b`, but real S3
stores such keys, so fbmount must cope with them in listings. Tests store objects under
placeholder segments and list them through this proxy, which turns the placeholders into
the real-S3 segments; every other request reaches the server unchanged (Host included, so
SigV4 stays valid) and is recorded as (method, decoded path + query).
"""

from __future__ import annotations

import contextlib
import http.client
import threading
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


class ListRewriteProxy(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, target: str, rewrites: Mapping[bytes, bytes]) -> None:
        parts = urlsplit(target)
        assert parts.hostname == "127.0.0.1", target
        self.up = (parts.hostname, parts.port or 80)
        self.rewrites = dict(rewrites)  # placeholder → real segment, longest first
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _RewriteHandler)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _RewriteHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ListRewriteProxy

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        payload = self.rfile.read(length) if length else None
        with self.server.lock:
            self.server.requests.append((self.command, unquote(self.path)))
        up = http.client.HTTPConnection(*self.server.up, timeout=60)
        try:
            up.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in ("connection", "keep-alive", "expect"):
                    up.putheader(name, value)  # Host included: SigV4 stays valid
            up.endheaders(payload)
            resp = up.getresponse()
            data = resp.read()
        finally:
            up.close()
        if self.command == "GET" and parse_qs(urlsplit(self.path).query).get("list-type") == ["2"]:
            for placeholder, real in self.server.rewrites.items():
                data = data.replace(placeholder, real)
        self.send_response_only(resp.status, resp.reason)
        for name, value in resp.getheaders():
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(name, value)
        if self.command == "HEAD":
            self.send_header("Content-Length", resp.getheader("Content-Length") or "0")
        else:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward


@contextlib.contextmanager
def running(target: str, rewrites: Mapping[bytes, bytes]) -> Iterator[ListRewriteProxy]:
    """The proxy serving in a thread for the duration of the block."""
    proxy = ListRewriteProxy(target, rewrites)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True, name="list-rewrite")
    thread.start()
    try:
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()
        thread.join(10)
