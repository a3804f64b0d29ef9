"""The control socket: `fbmount status` and `fbmount sync` talk to a running mount.

Each mount serves a Unix socket (mode 0600, in a 0700 runtime directory of its user) named
after a hash of its mountpoint, so no network port is opened and only the mount's owner
(or root) can ask. Requests and answers are single JSON lines; `sync` streams progress
lines and ends with a result line.

Next to the socket each daemon keeps a small record (pid, state dir, where it logs), so that
when the daemon is gone and nothing answers, `fbmount status MOUNTPOINT` can still find its
state dir and the `last-exit` note it left there (LAST_EXIT) and say why it died.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from fbmount.tasks import open_nursery

if TYPE_CHECKING:
    from fbmount.daemon import Daemon
    from fbmount.fs import Filesystem


def runtime_dir() -> Path:
    if os.getuid() == 0:
        return Path("/run/fbmount")
    base = os.environ.get("XDG_RUNTIME_DIR")
    return Path(base) / "fbmount" if base else Path(f"/tmp/fbmount-{os.getuid()}")


def _mount_id(mountpoint: Path) -> str:
    return hashlib.sha256(str(Path(mountpoint).absolute()).encode()).hexdigest()[:16]


def socket_path(mountpoint: Path) -> Path:
    return runtime_dir() / f"{_mount_id(mountpoint)}.sock"


# The note a daemon leaves in its state dir when it dies of an unexpected error (daemon.py).
LAST_EXIT = "last-exit"


def record_path(mountpoint: Path) -> Path:
    """Where the daemon serving `mountpoint` says who it is: survives the daemon's death."""
    return runtime_dir() / f"{_mount_id(mountpoint)}.json"


def write_record(mountpoint: Path, record: dict[str, Any]) -> None:
    """Atomically replace the mount's record (a reader never sees half of one)."""
    path = record_path(mountpoint)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)


def read_record(mountpoint: Path) -> dict[str, Any] | None:
    return _read_json(record_path(mountpoint))


def remove_record(mountpoint: Path, pid: int) -> None:
    """Forget the record, unless another daemon has since taken over the mountpoint."""
    record = read_record(mountpoint)
    if record is not None and record.get("pid") == pid:
        record_path(mountpoint).unlink(missing_ok=True)


def all_records() -> list[dict[str, Any]]:
    folder = runtime_dir()
    found = (_read_json(p) for p in sorted(folder.glob("*.json"))) if folder.is_dir() else ()
    return [r for r in found if r is not None and "mountpoint" in r]


def read_last_exit(state_dir: Path) -> dict[str, Any] | None:
    return _read_json(Path(state_dir) / LAST_EXIT)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class Throughput:
    """Bytes per second over the last minute, sampled once a second."""

    def __init__(self) -> None:
        self.samples: deque[tuple[float, int, int]] = deque(maxlen=61)

    def sample(self, up: int, down: int) -> None:
        self.samples.append((time.monotonic(), up, down))

    def rates(self) -> tuple[float, float]:
        if len(self.samples) < 2:
            return 0.0, 0.0
        (t0, u0, d0), (t1, u1, d1) = self.samples[0], self.samples[-1]
        span = max(t1 - t0, 1e-9)
        return (u1 - u0) / span, (d1 - d0) / span


def status_of(daemon: Daemon) -> dict[str, Any]:
    """Everything `fbmount status` shows, as plain data."""
    store, cfg, filesystems = daemon.store, daemon.cfg, daemon.filesystems()
    assert store is not None
    now = time.monotonic()
    pending = [(fs, s) for fs in filesystems for s in fs.staging.entries.values() if s.dirty]
    sizes = {s.id: _size(s) for _, s in pending}
    uploading = [(fs, s) for fs in filesystems for s in fs.uploader.in_flight.values()]
    up, down = daemon.throughput.rates()
    state_dir = cfg.state_dir()
    disk = os.statvfs(state_dir)
    return {
        "mountpoint": str(cfg.mountpoint),
        "running": True,  # a dead mount's entry (tools.DeadDaemon) says False
        "source": cfg.source,
        "endpoint": cfg.endpoint,
        "pid": os.getpid(),
        "uptime_s": round(now - daemon.started, 1),
        "upload_delay_s": cfg.upload_delay,
        "pending_files": len(pending),
        "pending_bytes": sum(sizes.values()),
        "oldest_pending_s": round(max((now - s.last_change for _, s in pending), default=0), 1),
        "uploading": [
            {"key": daemon.label(fs, s.key), "bytes": sizes.get(s.id, 0), "sent": s.in_flight_bytes}
            for fs, s in uploading
        ],
        "failed": [
            {
                "key": daemon.label(fs, s.key),
                "error": s.last_error,
                "failures": s.failures,
                "retry_in_s": round(max(0.0, s.retry_at - now), 1),
            }
            for fs, s in pending
            if s.last_error
        ],
        "uploads_done": sum(fs.uploader.uploads_done for fs in filesystems),
        "pending_deletes": sum(
            len(fs.uploader.pending_deletes) + len(fs.uploader.deleting) for fs in filesystems
        ),
        "cache_dir": str(state_dir),
        "cache_used_bytes": sum(fs.staging.usage_bytes() for fs in filesystems),
        "cache_free_bytes": disk.f_bavail * disk.f_frsize,
        "requests": dict(store.requests),
        "errors": dict(store.errors),
        "bytes_up": store.bytes_up,
        "bytes_down": store.bytes_down,
        "upload_rate_Bps": round(up),
        "download_rate_Bps": round(down),
        "copy_supported": store.copy_supported,
        "provider": cfg.provider,
        "max_rps": store.rate.rate,
    }


def _size(staged: Any) -> int:
    try:
        return staged.size() if staged.has_data else (staged.node.size if staged.node else 0)
    except OSError:
        return 0


async def serve(daemon: Daemon, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    path = socket_path(daemon.cfg.mountpoint)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.unlink(missing_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old_umask)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    task_status.started()
    try:
        await trio.serve_listeners(lambda stream: _handle(daemon, stream), [listener])
    finally:
        path.unlink(missing_ok=True)


async def _handle(daemon: Daemon, stream: trio.SocketStream) -> None:
    async with stream:
        try:
            with trio.fail_after(5):
                raw = b""
                while not raw.endswith(b"\n"):
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    raw += chunk
            request = json.loads(raw)
            if request.get("cmd") == "status":
                await _send(stream, status_of(daemon))
            elif request.get("cmd") == "sync":
                await _sync(daemon, stream)
            else:
                await _send(stream, {"error": f"unknown command {request.get('cmd')!r}"})
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, ValueError):
            pass


async def _send(stream: trio.SocketStream, obj: dict) -> None:
    await stream.send_all(json.dumps(obj).encode() + b"\n")


async def _sync(daemon: Daemon, stream: trio.SocketStream) -> None:
    """Upload everything written so far; report progress; end with ok or the failures."""
    work = [
        (fs, [s for s in fs.staging.entries.values() if s.dirty]) for fs in daemon.filesystems()
    ]
    targets = [s for _, dirty in work for s in dirty]
    total = len(targets)
    failures: list[dict] = []

    async def sync_one(fs: Filesystem, dirty: list) -> None:
        for what, why in await fs.uploader.flush_all(dirty):
            failures.append({"key": daemon.label(fs, what), "error": why})

    async def progress() -> None:
        while True:
            left = sum(1 for s in targets if s.dirty)
            await _send(stream, {"progress": {"total": total, "done": total - left}})
            await trio.sleep(0.5)

    async with open_nursery() as nursery:
        nursery.start_soon(progress)
        async with open_nursery() as syncs:
            for fs, dirty in work:
                syncs.start_soon(sync_one, fs, dirty)
        nursery.cancel_scope.cancel()
    await _send(
        stream,
        {
            "result": "ok" if not failures else "failed",
            "total": total,
            "failed": failures,
            # `fbmount umount` waits for this process to exit (its final flush, a --local
            # server's shutdown), bounded by how long that flush may take.
            "pid": os.getpid(),
            "flush_timeout_s": daemon.cfg.flush_timeout,
        },
    )


# ----- client side (plain blocking sockets: the CLI has no event loop) --------------------
def request(path: Path, cmd: str, timeout: float | None = 10) -> Iterator[dict]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                yield json.loads(line)


def live_sockets() -> list[Path]:
    folder = runtime_dir()
    return sorted(folder.glob("*.sock")) if folder.is_dir() else []
