"""Minimal sd_notify(3) client: tell systemd (Type=notify) about fbmount's state.

No dependency on libsystemd or python-systemd: the protocol is one datagram of
newline-separated KEY=VALUE lines sent to the AF_UNIX socket named by $NOTIFY_SOCKET.
Every function is a cheap no-op returning False when $NOTIFY_SOCKET is unset, so the
daemon can call them unconditionally. They never raise: a lost notification must not
take the mount down (systemd's own start/stop timeouts cover that case).
"""

from __future__ import annotations

import os
import socket

__all__ = ["notify", "ready", "stopping", "status", "extend_timeout", "socket_address"]

# A full socket queue on systemd's side would block sendto(); bound the wait so a
# notification can never wedge the daemon's event loop for long.
_SEND_TIMEOUT = 2.0


def socket_address(value: str | None = None) -> str | bytes | None:
    """Return the address to send to, or None if notifications are off or unsupported.

    '@name' is an abstract socket (leading NUL byte on the wire); '/path' is a filesystem
    socket. Anything else (e.g. systemd >= 253's 'vsock:' addresses) is unsupported here.
    """
    if value is None:
        value = os.environ.get("NOTIFY_SOCKET")
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def _clean(text: str) -> str:
    """A newline would start a new KEY=VALUE assignment; keep free text on one line."""
    return " ".join(text.splitlines())


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1\\nSTATUS=...") to $NOTIFY_SOCKET; True if it was sent."""
    address = socket_address()
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(_SEND_TIMEOUT)
            sock.connect(address)
            sent = sock.send(state.encode())
    except (OSError, ValueError):
        return False
    return sent == len(state.encode())


def ready(status: str | None = None, *, mainpid: int | None = None) -> bool:
    """Report start-up finished. Call only once the mount answers requests.

    `mainpid` is for a daemon whose notifying process is not the one systemd started
    (needs NotifyAccess=all in the unit; fbmount@.service runs fbmount -f as the main PID).
    """
    lines = ["READY=1"]
    if status:
        lines.append(f"STATUS={_clean(status)}")
    if mainpid is not None:
        lines.append(f"MAINPID={int(mainpid)}")
    return notify("\n".join(lines))


def stopping(status: str | None = None) -> bool:
    """Report that shutdown (flush, unmount) has begun, so systemd shows 'deactivating'."""
    lines = ["STOPPING=1"]
    if status:
        lines.append(f"STATUS={_clean(status)}")
    return notify("\n".join(lines))


def status(text: str) -> bool:
    """Free-form one-line status shown by `systemctl status` (e.g. '3 files waiting upload')."""
    return notify(f"STATUS={_clean(text)}")


def extend_timeout(usec: int) -> bool:
    """Ask systemd for `usec` more microseconds before it times out the current start/stop.

    Useful while flushing staged writes on SIGTERM: send it repeatedly (e.g. every few
    seconds with 30 s) while progress is being made; systemd kills the service only
    when an extension runs out. Understood by systemd >= 236.
    """
    return notify(f"EXTEND_TIMEOUT_USEC={max(0, int(usec))}")
