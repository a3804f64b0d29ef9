"""A far link on loopback: a TCP proxy that delays every byte by a fixed time each way.

    python3 bench/farlink.py --target http://127.0.0.1:8333 --delay-ms 15
    python3 bench/farlink.py --selftest [--delay-ms 15]

The kernel here has no netem, so the benchmark puts this proxy between each mount and the
server (bench/run.py --far-ms).  Each chunk read from one side is stamped on arrival and
written to the other side at arrival + delay, by a separate writer task, so the delay is
a latency, not a throttle: chunks in flight overlap and keep their order.  A new
connection also pays one round trip before its first byte goes on, as a TCP handshake
would (the client's connect() returns at once on loopback, so the proxy holds its first
bytes instead).  Buffers are bounded (QUEUE chunks of at most CHUNK bytes per direction
and connection); a full queue stops reading, which pushes back on the sender.

The proxy runs in a process of its own (``FarLink``), so that the benchmark's own Python
work cannot hold it up.  It prints ``listening http://HOST:PORT`` once it accepts, and on
SIGTERM writes its counters (connections, bytes each way) as JSON to --stats.
Loopback only: it refuses to listen on or forward to any other address.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

CHUNK = 256 * 1024
QUEUE = 64  # chunks buffered per direction and connection: at most 16 MiB
_EOF = b""


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _split(url: str) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if not parts.hostname or not _loopback(parts.hostname):
        raise ValueError(f"farlink forwards to loopback addresses only, not {url!r}")
    return parts.hostname, parts.port or 80


# ------------------------------------------------------------------------- the proxy
class Stats:
    def __init__(self) -> None:
        self.connections = 0
        self.open = 0
        self.max_open = 0
        self.bytes_up = 0  # client -> server
        self.bytes_down = 0  # server -> client
        self.errors = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


async def _pump(
    src: asyncio.StreamReader,
    dst: asyncio.StreamWriter,
    delay: float,
    not_before: float,
    count: list[int],
) -> None:
    """Forward src to dst, each chunk released at max(arrival, not_before) + delay."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE)

    async def reader() -> None:
        try:
            while True:
                data = await src.read(CHUNK)
                await queue.put((max(loop.time(), not_before) + delay, data))
                if not data:
                    return
                count[0] += len(data)
        except (ConnectionError, OSError):
            await queue.put((loop.time(), _EOF))

    async def writer() -> None:
        while True:
            release, data = await queue.get()
            wait = release - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if dst.can_write_eof():
                    with contextlib.suppress(OSError):
                        dst.write_eof()
                return
            dst.write(data)
            await dst.drain()

    rtask = asyncio.ensure_future(reader())
    try:
        await writer()
    finally:
        rtask.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await rtask


async def serve(
    listen_host: str,
    listen_port: int,
    target: str,
    delay: float,
    stats: Stats,
    ready: asyncio.Future | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    if not _loopback(listen_host):
        raise ValueError(f"farlink listens on loopback only, not {listen_host!r}")
    up_host, up_port = _split(target)
    loop = asyncio.get_running_loop()

    async def handle(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        accepted = loop.time()
        stats.connections += 1
        stats.open += 1
        stats.max_open = max(stats.max_open, stats.open)
        s_writer = None
        try:
            s_reader, s_writer = await asyncio.open_connection(up_host, up_port, limit=CHUNK)
            up, down = [0], [0]
            # The handshake: the client's first byte could leave only one round trip after
            # its connect(), and then takes the one-way delay like any other.
            t_up = asyncio.ensure_future(_pump(c_reader, s_writer, delay, accepted + 2 * delay, up))
            t_down = asyncio.ensure_future(_pump(s_reader, c_writer, delay, 0.0, down))
            try:
                await asyncio.gather(t_up, t_down)
            finally:
                for t in (t_up, t_down):
                    t.cancel()
                stats.bytes_up += up[0]
                stats.bytes_down += down[0]
        except (ConnectionError, OSError):
            stats.errors += 1
        finally:
            stats.open -= 1
            for w in (c_writer, s_writer):
                if w is not None:
                    w.close()

    server = await asyncio.start_server(handle, listen_host, listen_port, limit=CHUNK)
    port = server.sockets[0].getsockname()[1]
    if ready is not None:
        ready.set_result(port)
    else:
        print(f"listening http://{listen_host}:{port}", flush=True)
    if stop is None:
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        await stop.wait()
    finally:
        server.close()  # open connections are cancelled by asyncio.run on the way out


# ------------------------------------------------------------ the runner's handle on it
class FarLink:
    """One far-link process in front of ``target``; ``endpoint`` is where clients go."""

    def __init__(self, target: str, delay_ms: float, work: Path) -> None:
        _split(target)
        self.target = target
        self.delay_ms = delay_ms
        self.work = work
        self.stats_path = work / "farlink-stats.json"
        self.log_path = work / "farlink.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoint = ""
        self.stats: dict[str, int] = {}

    def start(self, timeout: float = 10.0) -> FarLink:
        self.work.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--target",
            self.target,
            "--delay-ms",
            str(self.delay_ms),
            "--stats",
            str(self.stats_path),
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line.startswith("listening "):
            self.stop()
            raise RuntimeError(f"farlink did not start: {line!r} (log {self.log_path})")
        self.endpoint = line.split()[1]
        return self

    def stop(self) -> dict[str, int]:
        proc, self.proc = self.proc, None
        if proc is None:
            return self.stats
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
        with contextlib.suppress(OSError, ValueError):
            self.stats = json.loads(self.stats_path.read_text())
        return self.stats


# ------------------------------------------------------------------------- self-test
async def _selftest(delay_ms: float, mib: int) -> int:
    """Round trips and bulk transfers through a real proxy process to a local echo/sink."""
    loop = asyncio.get_running_loop()
    rtt_ms = 2 * delay_ms

    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Commands: b"p" -> echo b"p"; b"u" + 8-byte n -> read n bytes, answer b"k";
        # b"d" + 8-byte n -> send n bytes.
        try:
            while cmd := await reader.read(1):
                if cmd == b"p":
                    writer.write(b"p")
                elif cmd == b"u":
                    n = int.from_bytes(await reader.readexactly(8), "big")
                    while n:
                        n -= len(await reader.read(min(n, CHUNK)))
                    writer.write(b"k")
                elif cmd == b"d":
                    n = int.from_bytes(await reader.readexactly(8), "big")
                    block = b"\0" * CHUNK
                    while n:
                        writer.write(block[: min(n, CHUNK)])
                        n -= min(n, CHUNK)
                        await writer.drain()
                await writer.drain()
        finally:
            writer.close()

    srv = await asyncio.start_server(server, "127.0.0.1", 0)
    target = f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"farlink-selftest-{os.getpid()}"
    link = await loop.run_in_executor(None, lambda: FarLink(target, delay_ms, tmp).start())
    host, port = _split(link.endpoint)
    figures: dict[str, float] = {}
    try:
        # New connections: connect, one ping; a far TCP link costs two round trips.
        setups = []
        for _ in range(5):
            t = time.perf_counter()
            r, w = await asyncio.open_connection(host, port)
            w.write(b"p")
            await r.readexactly(1)
            setups.append((time.perf_counter() - t) * 1000)
            w.close()
        figures["connect + first round trip, ms (median of 5)"] = sorted(setups)[2]
        r, w = await asyncio.open_connection(host, port)
        w.write(b"p")
        await r.readexactly(1)
        rtts = []
        for _ in range(20):
            t = time.perf_counter()
            w.write(b"p")
            await r.readexactly(1)
            rtts.append((time.perf_counter() - t) * 1000)
        rtts.sort()
        figures["round trip, ms (median of 20)"] = rtts[10]
        figures["round trip, ms (min)"] = rtts[0]
        figures["round trip, ms (max)"] = rtts[-1]
        n = mib * 1024 * 1024
        for name, cmd in (("upload", b"u"), ("download", b"d")):
            t = time.perf_counter()
            w.write(cmd + n.to_bytes(8, "big"))
            if cmd == b"u":
                block = b"\0" * CHUNK
                for _ in range(n // CHUNK):
                    w.write(block)
                    await w.drain()
                await r.readexactly(1)
            else:
                left = n
                while left:
                    left -= len(await r.read(min(left, CHUNK)))
            seconds = time.perf_counter() - t
            # One round trip of the total is latency, the rest is the transfer.
            figures[f"bulk {name} {mib} MiB, MB/s"] = n / 1e6 / max(seconds - rtt_ms / 1000, 1e-6)
        w.close()
    finally:
        stats = await loop.run_in_executor(None, link.stop)
        srv.close()
        with contextlib.suppress(OSError):
            for p in tmp.iterdir():
                p.unlink()
            tmp.rmdir()
    print(f"farlink self-test: {delay_ms:g} ms each way (round trip {rtt_ms:g} ms)")
    for k, v in figures.items():
        print(f"  {k:46} {v:8.1f}")
    print(f"  proxy counters: {stats}")
    problems = []
    if abs(figures["round trip, ms (median of 20)"] - rtt_ms) > max(3.0, 0.1 * rtt_ms):
        problems.append("round trip is off")
    setup = figures["connect + first round trip, ms (median of 5)"]
    if abs(setup - 2 * rtt_ms) > max(5.0, 0.15 * rtt_ms):
        problems.append("connection set-up is not one round trip")
    if figures["round trip, ms (min)"] < rtt_ms - 0.5:
        problems.append("a round trip beat the delay")
    if stats.get("connections") != 6:
        problems.append(f"proxy counted {stats.get('connections')} connections, not 6")
    print("OK" if not problems else "FAILED: " + "; ".join(problems))
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/farlink.py", description=__doc__.splitlines()[0])
    p.add_argument("--target", help="http://127.0.0.1:PORT to forward to")
    p.add_argument("--delay-ms", type=float, default=15.0, help="delay each way (default 15)")
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (default 127.0.0.1:0)")
    p.add_argument("--stats", type=Path, help="write the counters here as JSON on exit")
    p.add_argument("--selftest", action="store_true", help="measure the proxy and exit")
    p.add_argument("--selftest-mib", type=int, default=256, help="bulk size (default 256)")
    args = p.parse_args(argv)
    if args.selftest:
        return asyncio.run(_selftest(args.delay_ms, args.selftest_mib))
    if not args.target:
        p.error("--target is required")
    host, _, port = args.listen.rpartition(":")
    stats = Stats()
    # The link stands in for a network, which the mounts' CPU use would not slow down:
    # ask for a little priority over them (works as root; harmless otherwise).
    with contextlib.suppress(OSError):
        os.nice(-5)
    try:
        asyncio.run(serve(host, int(port), args.target, args.delay_ms / 1000, stats))
    finally:
        if args.stats:
            args.stats.write_text(json.dumps(stats.as_dict()) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
