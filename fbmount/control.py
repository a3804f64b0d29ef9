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
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import trio

Send = Callable[[dict[str, Any]], Awaitable[None]]
# What the socket serves, passed in by the daemon (this module does not know it):
Status = Callable[[], dict[str, Any]]  # `status`: everything it shows, as plain data
Sync = Callable[[Send], Awaitable[dict[str, Any]]]  # `sync`: progress lines sent, result


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


async def serve(
    mountpoint: Path, status: Status, sync: Sync, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """Answer `status` and `sync` on the mountpoint's socket until cancelled."""
    path = socket_path(mountpoint)
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
        await trio.serve_listeners(lambda stream: _handle(status, sync, stream), [listener])
    finally:
        path.unlink(missing_ok=True)


async def _handle(status: Status, sync: Sync, stream: trio.SocketStream) -> None:
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
                await _send(stream, status())
            elif request.get("cmd") == "sync":
                await _send(stream, await sync(lambda obj: _send(stream, obj)))
            else:
                await _send(stream, {"error": f"unknown command {request.get('cmd')!r}"})
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, ValueError):
            pass


async def _send(stream: trio.SocketStream, obj: dict) -> None:
    await stream.send_all(json.dumps(obj).encode() + b"\n")


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
