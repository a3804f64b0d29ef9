"""Fault-injecting, request-counting HTTP/1.1 reverse proxy for the test suite.

It sits between a client (fbmount, boto3) and a loopback S3 server (SeaweedFS) so that tests
can count which S3 operations a file-system action caused, and script the failures real S3
services produce (503 SlowDown, dropped connections, truncated bodies, slow answers, clock
skew, CopyObject refused) without mocking S3.

    with FaultProxy("http://127.0.0.1:8333") as proxy:
        s3 = boto3.client("s3", endpoint_url=proxy.endpoint, ...)
        proxy.add_rule(kind="UploadPart", action="status", status=503, times=2)
        ...
        assert proxy.counts["PutObject"] == 1

Design: one asyncio event loop in a daemon thread; each client connection gets its own upstream
connection (opened lazily, reopened when the server closes it), so keep-alive behaviour seen by
the client mirrors what the server does. Bodies are streamed in bounded pieces, never held
whole. Request heads are forwarded unchanged (the Host header included, so SigV4 signatures
stay valid); only an unsigned ``Expect: 100-continue`` is answered by the proxy itself instead
of being forwarded, because SeaweedFS does not always answer it.

Paths are classified as path-style S3 requests (``/bucket/key``); virtual-hosted requests are
not recognised.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import ipaddress
import threading
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = ["KINDS", "FaultProxy", "LogEntry", "Record", "RequestInfo", "Rule", "classify"]

KINDS = frozenset(
    {
        "HeadObject",
        "GetObject",
        "PutObject",
        "ListObjects",
        "CopyObject",
        "UploadPartCopy",
        "CreateMultipartUpload",
        "UploadPart",
        "CompleteMultipartUpload",
        "AbortMultipartUpload",
        "DeleteObject",
        "DeleteObjects",
        "ListBuckets",
        "HeadBucket",
        "CreateBucket",
        "DeleteBucket",
        "ListMultipartUploads",
        "Other",
    }
)
# ListObjects covers V1 and V2; these names are accepted as aliases everywhere a kind is.
KIND_ALIASES = {"ListObjectsV2": "ListObjects", "ListObjectsV1": "ListObjects"}

ACTIONS = frozenset({"status", "drop", "delay", "cut", "date", "hold"})
HOLD_LIMIT = 60.0  # a held request goes on by itself after this long: a test never hangs CI
PHASES = frozenset({"request", "response"})

# Query parameters that turn a bucket/object request into some other (sub-resource) operation.
_BUCKET_SUBRESOURCES = frozenset(
    {
        "accelerate", "acl", "analytics", "cors", "encryption", "intelligent-tiering",
        "inventory", "lifecycle", "location", "logging", "metrics", "notification",
        "object-lock", "ownershipControls", "policy", "policyStatus", "publicAccessBlock",
        "replication", "requestPayment", "tagging", "versioning", "versions", "website",
        "session",
    }
)  # fmt: skip
_OBJECT_SUBRESOURCES = frozenset(
    {"acl", "attributes", "legal-hold", "restore", "retention", "select", "tagging", "torrent"}
)

_DEFAULT_CODES = {
    400: ("BadRequest", "Bad Request"),
    403: ("AccessDenied", "Access Denied"),
    404: ("NoSuchKey", "The specified key does not exist."),
    409: ("OperationAborted", "A conflicting conditional operation is in progress."),
    412: ("PreconditionFailed", "At least one of the preconditions you specified did not hold."),
    416: ("InvalidRange", "The requested range is not satisfiable"),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    501: (
        "NotImplemented",
        "A header you provided implies functionality that is not implemented",
    ),
    503: ("SlowDown", "Please reduce your request rate."),
}
_REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    409: "Conflict",
    412: "Precondition Failed",
    416: "Requested Range Not Satisfiable",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
}

_BUF = 1 << 20  # largest piece read or written at once; bounds memory per connection
_HEAD_LIMIT = 1 << 20  # largest request/response head accepted
_LINGER = 5.0  # seconds to discard unread request bytes before closing after an early answer


def _canon_kind(kind: str) -> str:
    kind = KIND_ALIASES.get(kind, kind)
    if kind not in KINDS:
        raise ValueError(f"unknown S3 operation kind {kind!r}; expected one of {sorted(KINDS)}")
    return kind


class _KindCounter(Counter):
    """Counter by operation kind that also answers to the aliases (ListObjectsV2)."""

    def __missing__(self, key: str) -> int:
        alias = KIND_ALIASES.get(key)
        return self[alias] if alias is not None else 0


class LogEntry(NamedTuple):
    """One answered (or dropped) request; status 0 means the client got no response."""

    kind: str
    method: str
    path: str
    status: int


@dataclass
class RequestInfo:
    """A parsed request head, as classification and rule predicates see it."""

    method: str
    target: str  # raw request target (path and query, still percent-encoded)
    path: str  # percent-decoded path without the query, e.g. "/bucket/dir/file"
    query: dict[str, str]
    headers: list[tuple[str, str]]
    version: str
    kind: str = "Other"

    def header(self, name: str, default: str | None = None) -> str | None:
        """Value of the first header called *name* (case-insensitive)."""
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return default

    @property
    def bucket(self) -> str:
        return self.path.lstrip("/").split("/", 1)[0]

    @property
    def key(self) -> str:
        parts = self.path.lstrip("/").split("/", 1)
        return parts[1] if len(parts) > 1 else ""


@dataclass
class Record:
    """Everything known about one request; updated while its body streams."""

    kind: str
    method: str
    path: str
    query: dict[str, str]
    status: int = 0  # what the client got (0: nothing)
    upstream_status: int | None = None  # what the server answered, if it was asked
    bytes_in: int = 0  # request body bytes read from the client, as framed on the wire
    bytes_out: int = 0  # response body bytes written to the client, as framed on the wire
    fault: str | None = None  # the terminal/modifying actions applied, e.g. "status", "cut"
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None


@dataclass
class Rule:
    """A scripted fault. See FaultProxy.add_rule for the meaning of each field."""

    kinds: frozenset[str] | None
    action: str
    key: str | None = None
    method: str | None = None
    where: Callable[[RequestInfo], bool] | None = None
    times: int | None = None
    after: int = 0
    phase: str = "request"
    status: int = 503
    code: str | None = None
    message: str | None = None
    headers: dict[str, str] | None = None
    seconds: float = 0.0
    at_byte: int | None = None
    skew: float | None = None
    date: str | None = None
    seen: int = 0  # requests that matched the selector
    fired: int = 0  # of those, how many the fault was applied to
    arrived: threading.Event = field(default_factory=threading.Event)  # hold: one is held
    gate: threading.Event = field(default_factory=threading.Event)  # hold: set to let go

    def wait_held(self, timeout: float = 10.0) -> bool:
        """hold: block until a matching request is being held (True) or `timeout` passes."""
        return self.arrived.wait(timeout)

    def release(self) -> None:
        """hold: let every held request (and every later match) go on."""
        self.gate.set()

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.fired >= self.times

    def _selects(self, info: RequestInfo) -> bool:
        if self.kinds is not None and info.kind not in self.kinds:
            return False
        if self.method is not None and info.method != self.method:
            return False
        if self.key is not None and self.key not in info.path:
            return False
        return self.where is None or bool(self.where(info))

    def _consider(self, info: RequestInfo) -> bool:
        """Count a match and tell whether the fault applies to this request."""
        if not self._selects(info):
            return False
        self.seen += 1
        if self.seen <= self.after or self.exhausted:
            return False
        self.fired += 1
        return True


def classify(
    method: str, path: str, query: dict[str, str], headers: Iterable[tuple[str, str]]
) -> str:
    """Name the S3 operation of a path-style request."""
    method = method.upper()
    hdrs = {k.lower() for k, _ in headers}
    parts = path.lstrip("/").split("/", 1)
    bucket = parts[0]
    key = parts[1] if len(parts) > 1 else ""
    q = set(query)
    if not bucket:
        return "ListBuckets" if method == "GET" else "Other"
    if not key:
        if q & _BUCKET_SUBRESOURCES:
            return "Other"
        if method == "GET":
            return "ListMultipartUploads" if "uploads" in q else "ListObjects"
        if method == "HEAD":
            return "HeadBucket"
        if method == "PUT":
            return "CreateBucket"
        if method == "DELETE":
            return "DeleteBucket"
        if method == "POST" and "delete" in q:
            return "DeleteObjects"
        return "Other"
    if q & _OBJECT_SUBRESOURCES:
        return "Other"
    if method == "HEAD":
        return "HeadObject"
    if method == "GET":
        return "Other" if "uploadId" in q else "GetObject"  # ListParts is "Other"
    if method == "PUT":
        copy = "x-amz-copy-source" in hdrs
        if "partNumber" in q and "uploadId" in q:
            return "UploadPartCopy" if copy else "UploadPart"
        return "CopyObject" if copy else "PutObject"
    if method == "POST":
        if "uploads" in q:
            return "CreateMultipartUpload"
        if "uploadId" in q:
            return "CompleteMultipartUpload"
        return "Other"
    if method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in q else "DeleteObject"
    return "Other"


class _Dropped(Exception):
    """The client connection is to be closed at once (drop/cut fault, broken peer)."""


class _UpstreamGone(Exception):
    """The upstream connection failed before a complete response head arrived."""


@dataclass
class _Plan:
    delay_request: float = 0.0
    delay_response: float = 0.0
    terminal: Rule | None = None
    cut: Rule | None = None
    body_delay: Rule | None = None
    date: Rule | None = None
    holds: list[Rule] = field(default_factory=list)

    @property
    def names(self) -> str | None:
        names = [
            r.action for r in (self.terminal, self.cut, self.body_delay, self.date) if r is not None
        ]
        if self.delay_request or self.delay_response:
            names.append("delay")
        if self.holds:
            names.append("hold")
        return ",".join(names) or None


class _Conn:
    """A client connection and the upstream connection dedicated to it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.up_reader: asyncio.StreamReader | None = None
        self.up_writer: asyncio.StreamWriter | None = None
        self.up_used = False  # the upstream connection already carried a request

    def close_upstream(self) -> None:
        if self.up_writer is not None:
            self.up_writer.transport.abort()
        self.up_reader = self.up_writer = None

    def close(self) -> None:
        """Close both sides; data already written to the client is still delivered (but
        a client that stops reading is cut off after a few seconds)."""
        self.close_upstream()
        transport = self.writer.transport
        transport.close()
        asyncio.get_running_loop().call_later(_LINGER, transport.abort)

    def abort(self) -> None:
        self.close_upstream()
        self.writer.transport.abort()


def _parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"malformed header line {line!r}")
        headers.append((name.strip(), value.strip()))
    return lines[0], headers


def _get(headers: list[tuple[str, str]], name: str) -> str | None:
    name = name.lower()
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def _has_token(headers: list[tuple[str, str]], name: str, token: str) -> bool:
    name = name.lower()
    return any(
        k.lower() == name and token in (t.strip().lower() for t in v.split(",")) for k, v in headers
    )


def _build_head(first_line: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [first_line] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _expect_signed(info: RequestInfo) -> bool:
    """Whether the client signed its Expect header (then it must be forwarded)."""
    auth = info.header("authorization") or ""
    signed = ""
    if "SignedHeaders=" in auth:
        signed = auth.split("SignedHeaders=", 1)[1].split(",", 1)[0]
    elif "X-Amz-SignedHeaders" in info.query:
        signed = info.query["X-Amz-SignedHeaders"]
    return "expect" in signed.lower().split(";")


class FaultProxy:
    """Reverse proxy in a background thread; counts S3 operations and injects faults.

    Attributes read by tests (all reset by ``reset()``):
      counts     Counter of operation kinds, counted when the request head arrives. Replaced
                 (not mutated) on every update, so a reference is a consistent snapshot that
                 is safe to iterate: ``before = proxy.counts; ...; proxy.counts - before``
      log        list of LogEntry(kind, method, path, status), appended before the client
                 sees the response (status 0: connection dropped without a response)
      records    list of Record with query, byte counts, fault applied and timing
      bytes_in   request body bytes received from clients (uploads)
      bytes_out  response body bytes sent to clients (downloads)
    """

    def __init__(self, target: str, host: str = "127.0.0.1", port: int = 0) -> None:
        parts = urlsplit(target)
        if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError(f"target must look like http://127.0.0.1:PORT, got {target!r}")
        if parts.hostname != "localhost" and not ipaddress.ip_address(parts.hostname).is_loopback:
            raise ValueError("FaultProxy only forwards to loopback addresses")
        self.target = target
        self._up_host = parts.hostname
        self._up_port = parts.port or 80
        self._host = host
        self._port = port
        self._lock = threading.RLock()  # RLock: rule predicates may call back into the proxy
        self._rules: list[Rule] = []
        self.counts: Counter[str] = _KindCounter()
        self.log: list[LogEntry] = []
        self.records: list[Record] = []
        self.bytes_in = 0
        self.bytes_out = 0
        self.errors: list[str] = []  # unexpected exceptions in connection handlers
        self._inflight = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._tasks: set[asyncio.Task] = set()
        self._conns: set[_Conn] = set()
        self._transports: weakref.WeakSet[asyncio.BaseTransport] = weakref.WeakSet()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._closed = False

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> FaultProxy:
        """Bind the listener and start serving; returns once connections are accepted."""
        if self._thread is not None:
            raise RuntimeError("FaultProxy already started")
        self._thread = threading.Thread(target=self._run, name="faultproxy", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            self._thread.join(5)
            raise RuntimeError("FaultProxy failed to start") from self._error
        if not self._ready.is_set():
            raise RuntimeError("FaultProxy did not start within 10 s")
        return self

    def close(self) -> None:
        """Close the listener and every connection, and join the thread."""
        if self._closed or self._thread is None:
            self._closed = True
            return
        self._closed = True
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # loop already gone
                loop.call_soon_threadsafe(stop.set)
        self._thread.join(10)
        if self._thread.is_alive():
            raise RuntimeError("FaultProxy thread did not stop within 10 s")

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def port(self) -> int:
        return self._port

    @property
    def endpoint(self) -> str:
        """URL clients should use instead of the target."""
        return f"http://{self._host}:{self._port}"

    # ----------------------------------------------------------------- counters
    def reset(self) -> None:
        """Forget counts, log, records and byte totals (rules stay; see clear_rules)."""
        with self._lock:
            self.counts = _KindCounter()
            self.log.clear()
            self.records.clear()
            self.bytes_in = 0
            self.bytes_out = 0

    @property
    def total(self) -> int:
        """Number of requests counted since the last reset."""
        with self._lock:
            return sum(self.counts.values())

    @property
    def inflight(self) -> int:
        """Requests whose response has not been completely sent yet."""
        return self._inflight

    def wait_idle(self, timeout: float = 10.0, settle: float = 0.0) -> bool:
        """Wait until no request is in flight (for *settle* seconds in a row, if given)."""
        deadline = time.monotonic() + timeout
        quiet_since: float | None = None
        while time.monotonic() < deadline:
            if self._inflight == 0:
                now = time.monotonic()
                quiet_since = quiet_since or now
                if now - quiet_since >= settle:
                    return True
            else:
                quiet_since = None
            time.sleep(0.01)
        return False

    def paths(self, kind: str | None = None) -> list[str]:
        """Paths of logged requests, optionally only those of one kind."""
        want = None if kind is None else _canon_kind(kind)
        with self._lock:
            return [e.path for e in self.log if want is None or e.kind == want]

    # ----------------------------------------------------------------- rules
    def add_rule(
        self,
        kind: str | Iterable[str] | None = None,
        action: str = "status",
        *,
        key: str | None = None,
        method: str | None = None,
        where: Callable[[RequestInfo], bool] | None = None,
        times: int | None = None,
        after: int = 0,
        phase: str = "request",
        status: int = 503,
        code: str | None = None,
        message: str | None = None,
        headers: dict[str, str] | None = None,
        seconds: float = 0.0,
        at_byte: int | None = None,
        skew: float | None = None,
        date: str | None = None,
    ) -> Rule:
        """Script a fault; returns the Rule (its ``seen``/``fired`` count matches).

        Selection: *kind* (a kind, several, or None/"*" for any), *key* (substring of the
        decoded path "/bucket/key"), *method*, *where* (predicate on RequestInfo). The fault
        applies to matches number after+1 .. after+times (times=None: forever).

        Actions:
          status  answer with an S3 XML error: *status*, *code* (default from status, e.g.
                  503 SlowDown), *message*, extra *headers* (e.g. Retry-After).
          drop    close the connection without any response.
          delay   wait *seconds*: before forwarding (phase="request"), before answering
                  (phase="response"), or after *at_byte* bytes of the response body.
          cut     forward the response head unchanged (Content-Length kept) but close the
                  connection after *at_byte* body bytes (default 0).
          date    replace the response Date header: now + *skew* seconds, or the literal *date*.
          hold    keep the request (phase="request": not yet forwarded) or its answer
                  (phase="response": the server has acted) until ``rule.release()``;
                  ``rule.wait_held()`` returns once one is held. Released after HOLD_LIMIT s.
        For status and drop, phase="request" (default) means the request never reaches the
        server; phase="response" forwards it (it takes effect) and replaces the answer.
        Several rules may apply to one request: delays add up, the first status/drop wins
        (later rules are then not consulted), cut/date modify the forwarded response.
        """
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; expected one of {sorted(ACTIONS)}")
        if phase not in PHASES:
            raise ValueError(f"phase must be 'request' or 'response', got {phase!r}")
        if action == "date" and skew is None and date is None:
            raise ValueError("action 'date' needs skew= or date=")
        if times is not None and times < 0:
            raise ValueError("times must be >= 0 or None")
        kinds: frozenset[str] | None
        if kind is None or kind == "*":
            kinds = None
        elif isinstance(kind, str):
            kinds = frozenset({_canon_kind(kind)})
        else:
            kinds = frozenset(_canon_kind(k) for k in kind)
        if action == "cut" and at_byte is None:
            at_byte = 0
        rule = Rule(
            kinds=kinds,
            action=action,
            key=key,
            method=method.upper() if method else None,
            where=where,
            times=times,
            after=after,
            phase=phase,
            status=status,
            code=code,
            message=message,
            headers=headers,
            seconds=seconds,
            at_byte=at_byte,
            skew=skew,
            date=date,
        )
        with self._lock:
            self._rules.append(rule)
        return rule

    def refuse_copy(self, times: int | None = None) -> Rule:
        """Answer CopyObject and UploadPartCopy with 501 NotImplemented.

        Filebase documents CopyObject as "currently disabled" without saying how it answers;
        501 NotImplemented is what S3 services return for an operation they do not offer.
        """
        return self.add_rule(
            kind=("CopyObject", "UploadPartCopy"),
            action="status",
            status=501,
            code="NotImplemented",
            times=times,
        )

    def remove_rule(self, rule: Rule) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._rules.remove(rule)

    def clear_rules(self) -> None:
        with self._lock:
            self._rules.clear()

    @property
    def rules(self) -> list[Rule]:
        with self._lock:
            return list(self._rules)

    def _plan(self, info: RequestInfo) -> _Plan:
        plan = _Plan()
        with self._lock:
            for rule in self._rules:
                if not rule._consider(info):
                    continue
                if rule.action in ("status", "drop"):
                    plan.terminal = rule
                    break
                if rule.action == "delay":
                    if rule.at_byte is not None:
                        plan.body_delay = plan.body_delay or rule
                    elif rule.phase == "response":
                        plan.delay_response += rule.seconds
                    else:
                        plan.delay_request += rule.seconds
                elif rule.action == "cut":
                    plan.cut = plan.cut or rule
                elif rule.action == "date":
                    plan.date = plan.date or rule
                elif rule.action == "hold":
                    plan.holds.append(rule)
        return plan

    @staticmethod
    async def _hold(plan: _Plan, phase: str) -> None:
        """Keep the request (before forwarding) or its answer (after the server acted) until
        the test releases the rule, so two operations can be driven into one interleaving."""
        for rule in plan.holds:
            if rule.phase == phase:
                rule.arrived.set()
                await asyncio.to_thread(rule.gate.wait, HOLD_LIMIT)

    # ----------------------------------------------------------------- event loop
    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # reported to start() or lost at shutdown
            self._error = exc
            self._ready.set()
        finally:
            try:
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for t in pending:
                    t.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(asyncio.sleep(0))  # let transports finish closing
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(
            self._handle, self._host, self._port, limit=_HEAD_LIMIT, reuse_address=True
        )
        self._port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            for conn in list(self._conns):
                conn.abort()
            for transport in list(self._transports):
                transport.abort()  # e.g. still flushing after a graceful close
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = _Conn(reader, writer)
        self._conns.add(conn)
        self._transports.add(writer.transport)
        try:
            while await self._serve_one(conn):
                pass
        except (_Dropped, ConnectionError, asyncio.IncompleteReadError, OSError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # a malformed message or a proxy bug: keep it for debugging
            self.errors.append(repr(exc))
        finally:
            conn.close()
            self._conns.discard(conn)
            self._tasks.discard(task)

    # ----------------------------------------------------------------- one exchange
    async def _serve_one(self, conn: _Conn) -> bool:
        """Relay one request/response; returns whether the client connection stays open."""
        try:
            head = await conn.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        request_line, headers = _parse_head(head)
        method, target, version = request_line.split(" ", 2)
        split = urlsplit(target)
        query = dict(parse_qsl(split.query, keep_blank_values=True))
        info = RequestInfo(method.upper(), target, unquote(split.path), query, headers, version)
        info.kind = classify(info.method, info.path, query, headers)
        record = Record(info.kind, info.method, info.path, query)
        with self._lock:
            counts = _KindCounter(self.counts)
            counts[info.kind] += 1
            self.counts = counts
            self.records.append(record)
            self._inflight += 1
        try:
            return await self._exchange(conn, info, record)
        finally:
            record.finished = time.monotonic()
            with self._lock:
                self._inflight -= 1

    async def _exchange(self, conn: _Conn, info: RequestInfo, record: Record) -> bool:
        headers = info.headers
        chunked = _has_token(headers, "transfer-encoding", "chunked")
        length = int(_get(headers, "content-length") or 0) if not chunked else -1
        has_body = chunked or length > 0
        expect = (_get(headers, "expect") or "").lower() == "100-continue"
        client_close = _has_token(headers, "connection", "close") or info.version == "HTTP/1.0"
        plan = self._plan(info)
        record.fault = plan.names

        if plan.delay_request:
            await asyncio.sleep(plan.delay_request)
        await self._hold(plan, "request")
        term = plan.terminal
        if term is not None and term.phase == "request":
            if term.action == "drop":
                self._log(info, record, 0)
                raise _Dropped
            # Answer early. Without Expect the client sends its body anyway: read and discard
            # it so the connection stays usable. With Expect it may or may not: close after.
            if has_body and not expect:
                await self._relay_body(conn.reader, None, chunked, length, record, "in")
            early_close = client_close or (has_body and expect)
            await self._send_error(conn, info, record, term, plan, early_close)
            if early_close:
                await self._linger(conn)
                return False
            return True

        # Forward the request.
        fwd_headers = headers
        if expect and not _expect_signed(info):
            fwd_headers = [(k, v) for k, v in headers if k.lower() != "expect"]
        up_head = _build_head(f"{info.method} {info.target} {info.version}", fwd_headers)
        if expect:
            conn.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await conn.writer.drain()
        try:
            status, resp_line, resp_headers = await self._send_request(
                conn, info, up_head, chunked, length, record
            )
        except _UpstreamGone:
            await self._send_error(conn, info, record, None, plan, True, status=502)
            await self._linger(conn)
            return False

        record.upstream_status = status
        resp_chunked = _has_token(resp_headers, "transfer-encoding", "chunked")
        resp_len_s = _get(resp_headers, "content-length")
        no_body = info.method == "HEAD" or status in (204, 304) or 100 <= status < 200
        if no_body:
            resp_len, eof_body = 0, False
        elif resp_chunked:
            resp_len, eof_body = -1, False
        elif resp_len_s is not None:
            resp_len, eof_body = int(resp_len_s), False
        else:
            resp_len, eof_body = -1, True
        up_close = _has_token(resp_headers, "connection", "close") or eof_body

        if term is not None:  # phase == "response": the server acted, the client never learns
            if plan.delay_response:
                await asyncio.sleep(plan.delay_response)
            if not no_body:
                await self._relay_body(conn.up_reader, None, resp_chunked, resp_len, None, "")
            if up_close:
                conn.close_upstream()
            if term.action == "drop":
                self._log(info, record, 0)
                raise _Dropped
            await self._send_error(conn, info, record, term, plan, client_close)
            return not client_close

        if plan.date is not None:
            resp_headers = [(k, v) for k, v in resp_headers if k.lower() != "date"]
            resp_headers.append(("Date", self._date_value(plan.date)))
        self._log(info, record, status)
        if plan.delay_response:
            await asyncio.sleep(plan.delay_response)
        await self._hold(plan, "response")
        conn.writer.write(_build_head(resp_line, resp_headers))
        cut = None
        if plan.cut is not None and not no_body:
            cut = plan.cut.at_byte or 0
        delay_at = None
        if plan.body_delay is not None and not no_body:
            delay_at = (plan.body_delay.at_byte or 0, plan.body_delay.seconds)
        if cut == 0:
            await conn.writer.drain()
            raise _Dropped
        if not no_body:
            await self._relay_body(
                conn.up_reader,
                conn.writer,
                resp_chunked,
                resp_len,
                record,
                "out",
                cut=cut,
                delay_at=delay_at,
            )
        else:
            await conn.writer.drain()
        if up_close:
            conn.close_upstream()
        return not (client_close or up_close)

    async def _send_request(
        self,
        conn: _Conn,
        info: RequestInfo,
        up_head: bytes,
        chunked: bool,
        length: int,
        record: Record,
    ) -> tuple[int, str, list[tuple[str, str]]]:
        """Send head and body upstream; return the final response head (1xx skipped)."""
        has_body = chunked or length > 0
        for attempt in (0, 1):
            reused = conn.up_writer is not None and conn.up_used
            if conn.up_reader is not None and conn.up_reader.at_eof():
                conn.close_upstream()
                reused = False
            if conn.up_writer is None:
                try:
                    conn.up_reader, conn.up_writer = await asyncio.open_connection(
                        self._up_host, self._up_port, limit=_HEAD_LIMIT
                    )
                except OSError as exc:
                    raise _UpstreamGone from exc
                conn.up_used = False
            assert conn.up_reader is not None and conn.up_writer is not None
            conn.up_used = True
            body_error: BaseException | None = None
            try:
                conn.up_writer.write(up_head)
                if has_body:
                    await self._relay_body(
                        conn.reader, conn.up_writer, chunked, length, record, "in"
                    )
                else:
                    await conn.up_writer.drain()
            except (ConnectionError, OSError) as exc:
                # The server may have answered early and closed; try to read that answer.
                body_error = exc
            try:
                while True:
                    head = await conn.up_reader.readuntil(b"\r\n\r\n")
                    resp_line, resp_headers = _parse_head(head)
                    status = int(resp_line.split(" ", 2)[1])
                    if status >= 200 or status == 101:
                        break
                if body_error is not None:
                    # The client's body was not fully consumed: the connection cannot go on.
                    resp_headers = [(k, v) for k, v in resp_headers if k.lower() != "connection"]
                    resp_headers.append(("Connection", "close"))
                return status, resp_line, resp_headers
            except (asyncio.IncompleteReadError, ConnectionError, OSError, ValueError) as exc:
                conn.close_upstream()
                if attempt == 0 and reused and not has_body:
                    continue  # stale keep-alive connection: replay once on a fresh one
                raise _UpstreamGone from exc
        raise _UpstreamGone

    async def _relay_body(
        self,
        src: asyncio.StreamReader | None,
        dst: asyncio.StreamWriter | None,
        chunked: bool,
        length: int,
        record: Record | None,
        direction: str,
        *,
        cut: int | None = None,
        delay_at: tuple[int, float] | None = None,
    ) -> None:
        """Copy one message body (raw framing kept) in bounded pieces; dst None discards."""
        assert src is not None
        sent = 0
        delayed = delay_at is None

        async def emit(data: bytes) -> None:
            nonlocal sent, delayed
            if not delayed and delay_at is not None and sent + len(data) > delay_at[0]:
                split = max(0, delay_at[0] - sent)
                await emit(data[:split])
                if dst is not None:
                    await dst.drain()
                delayed = True
                await asyncio.sleep(delay_at[1])
                data = data[split:]
                if not data:
                    return
            if cut is not None and sent + len(data) > cut:
                data = data[: cut - sent]
                self._count(record, direction, len(data))
                sent += len(data)
                if dst is not None:
                    dst.write(data)
                    await dst.drain()
                raise _Dropped
            self._count(record, direction, len(data))
            sent += len(data)
            if dst is not None:
                dst.write(data)
                await dst.drain()

        async def copy_exact(n: int) -> None:
            while n > 0:
                data = await src.read(min(n, _BUF))
                if not data:
                    raise asyncio.IncompleteReadError(b"", n)
                n -= len(data)
                await emit(data)

        if chunked:
            while True:
                line = await src.readuntil(b"\r\n")
                await emit(line)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers, then the empty line that ends the body
                        trailer = await src.readuntil(b"\r\n")
                        await emit(trailer)
                        if trailer == b"\r\n":
                            break
                    break
                await copy_exact(size + 2)
        elif length >= 0:
            await copy_exact(length)
        else:  # delimited by the server closing the connection
            while True:
                data = await src.read(_BUF)
                if not data:
                    break
                await emit(data)
        if dst is not None:
            await dst.drain()

    def _count(self, record: Record | None, direction: str, n: int) -> None:
        if record is None or not n:
            return
        with self._lock:
            if direction == "in":
                record.bytes_in += n
                self.bytes_in += n
            else:
                record.bytes_out += n
                self.bytes_out += n

    def _log(self, info: RequestInfo, record: Record, status: int) -> None:
        record.status = status
        with self._lock:
            self.log.append(LogEntry(info.kind, info.method, info.path, status))

    @staticmethod
    def _date_value(rule: Rule) -> str:
        if rule.date is not None:
            return rule.date
        return email.utils.formatdate(time.time() + (rule.skew or 0.0), usegmt=True)

    async def _send_error(
        self,
        conn: _Conn,
        info: RequestInfo,
        record: Record,
        rule: Rule | None,
        plan: _Plan,
        close: bool,
        status: int | None = None,
    ) -> None:
        """Write an S3-style XML error response to the client."""
        if status is None:
            status = rule.status if rule is not None else 502
        default_code, default_msg = _DEFAULT_CODES.get(status, ("InternalError", "Error"))
        code = (rule.code if rule is not None else None) or (
            "BadGateway" if status == 502 else default_code
        )
        message = (rule.message if rule is not None else None) or (
            "The proxy could not reach the server." if status == 502 else default_msg
        )
        request_id = uuid.uuid4().hex[:16].upper()
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{_xml(code)}</Code><Message>{_xml(message)}</Message>"
            f"<Resource>{_xml(info.path)}</Resource><RequestId>{request_id}</RequestId>"
            "</Error>"
        ).encode()
        if info.method == "HEAD":
            body = b""
        date = (
            self._date_value(plan.date)
            if plan.date is not None
            else email.utils.formatdate(usegmt=True)
        )
        headers = [
            ("Date", date),
            ("Server", "FaultProxy"),
            ("x-amz-request-id", request_id),
            ("Content-Type", "application/xml"),
            ("Content-Length", str(len(body))),
        ]
        headers += list((rule.headers or {}).items()) if rule is not None else []
        if close:
            headers.append(("Connection", "close"))
        self._log(info, record, status)
        reason = _REASONS.get(status, "Error")
        conn.writer.write(_build_head(f"HTTP/1.1 {status} {reason}", headers) + body)
        self._count(record, "out", len(body))
        await conn.writer.drain()

    @staticmethod
    async def _linger(conn: _Conn) -> None:
        """Half-close, then discard what the client still sends, so that closing with unread
        data does not reset the connection before the client has read the answer."""
        with contextlib.suppress(OSError, RuntimeError):
            if conn.writer.can_write_eof():
                conn.writer.write_eof()
        deadline = time.monotonic() + _LINGER
        with contextlib.suppress(OSError, asyncio.TimeoutError, ConnectionError):
            while (left := deadline - time.monotonic()) > 0:
                if not await asyncio.wait_for(conn.reader.read(_BUF), left):
                    break


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
