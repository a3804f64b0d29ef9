"""`fbmount status | sync | umount | doctor`: living with a mount.

status and sync talk to the running daemon over its control socket (control.py);
doctor checks a setup piece by piece and prints a one-line fix for each failure.
When a daemon is gone, status and doctor explain it from the record it left next to its
socket and the last-exit note in its state dir (see DeadDaemon).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import secrets
import select
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fbmount import control, credentials
from fbmount.config import DEFAULT_ENDPOINT
from fbmount.errors import FsError, StartupError


def main(command: str, argv: list[str]) -> int:
    try:
        if command == "status":
            return cmd_status(argv)
        if command == "sync":
            return cmd_sync(argv, unmount=False)
        if command in ("umount", "unmount"):
            return cmd_sync(argv, unmount=True)
        return cmd_doctor(argv)
    except StartupError as e:
        print(f"fbmount: {e}", file=sys.stderr)
        return 1


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _socket_for(mountpoint: str) -> Path:
    path = control.socket_path(Path(mountpoint).absolute())
    if not path.exists():
        dead = DeadDaemon.find(Path(mountpoint).absolute())
        if dead is not None:
            raise StartupError(f"{dead.summary()}; fix: {dead.fix}")
        raise StartupError(
            f"{mountpoint} is not an fbmount mount of this user (no control socket {path})"
        )
    return path


# ----- a daemon that is gone -------------------------------------------------------------
def fbmount_mounts() -> list[str]:
    """Mountpoints of fbmount filesystems, from the mount table (never touching them)."""
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "fuse.fbmount":
            found.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1]))
    return found


def not_connected(mountpoint: str, timeout: float = 5.0) -> bool:
    """Does the mount answer ENOTCONN (its daemon is gone)? Asked in a helper thread, so a
    daemon that is alive but stuck cannot hang the command."""
    answer: list[bool] = []

    def probe() -> None:
        try:
            os.statvfs(mountpoint)  # stat() may answer from the kernel's attr cache
            answer.append(False)
        except OSError as e:
            answer.append(e.errno == errno.ENOTCONN)

    worker = threading.Thread(target=probe, daemon=True, name="statvfs")
    worker.start()
    worker.join(timeout)
    return bool(answer and answer[0])


def daemon_alive(pid: int) -> bool:
    """Is `pid` a live (not zombie) fbmount process? A reused pid does not count."""
    proc = Path("/proc") / str(pid)
    try:
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = (proc / "cmdline").read_bytes()
    except (OSError, IndexError):
        return False
    return state != "Z" and b"fbmount" in cmdline


@dataclass
class DeadDaemon:
    """What is known about a mount whose daemon has gone: from the record it kept next to
    its control socket, the last-exit note it wrote on an unexpected error, and its log."""

    mountpoint: str
    pid: int | None  # None: no record (an older fbmount, or the runtime dir was cleared)
    reason: str | None  # None: it left no last words (SIGKILL, the OOM killer, a hard crash)
    died_at: str | None
    log: str | None  # "syslog", a file, or None
    last_log_line: str | None
    still_mounted: bool

    @classmethod
    def find(cls, mountpoint: Path) -> DeadDaemon | None:
        """The dead daemon of `mountpoint`, or None when it is alive or never was fbmount."""
        mnt = str(mountpoint)
        record = control.read_record(mountpoint)
        mounted = mnt in fbmount_mounts()
        if record is None:
            if mounted and not_connected(mnt):
                return cls(mnt, None, None, None, None, None, True)
            return None
        pid = int(record.get("pid", 0))
        if daemon_alive(pid):
            return None
        state_dir = Path(record.get("state_dir", "/nonexistent"))
        note = control.read_last_exit(state_dir)
        if note is None or note.get("pid") != pid:
            note = None
        log_target = record.get("log")
        last_line = None
        if log_target not in (None, "syslog", "stderr") and _lock_holder(state_dir) == pid:
            last_line = _last_line(Path(log_target))  # not after another daemon's lines
        return cls(
            mnt,
            pid,
            note["error"] if note else None,
            note.get("time") if note else None,
            log_target if log_target != "stderr" else None,
            last_line,
            mounted,
        )

    @property
    def fix(self) -> str:
        if self.still_mounted:
            return f"fusermount3 -uz {self.mountpoint}, then mount it again"
        return "mount it again (it is no longer mounted)"

    @property
    def cause(self) -> str:
        if self.reason:
            return f"died at {self.died_at}: {self.reason}"
        return "left no reason (killed by a signal such as SIGKILL or the OOM killer?)"

    def summary(self) -> str:
        """One line: which daemon, and why it is gone as far as anyone knows."""
        who = f"its fbmount daemon (pid {self.pid})" if self.pid else "its fbmount daemon"
        return f"{self.mountpoint}: {who} is gone; it {self.cause}"

    def report(self) -> list[str]:
        lines = [self.summary()]
        if self.last_log_line and not self.reason:  # a crash's last line is its reason
            lines.append(f"last log line: {self.last_log_line}")
        if self.log == "syslog":
            lines.append("its log: journalctl -t fbmount")
        elif self.log:
            lines.append(f"its log: {self.log}")
        lines.append(f"fix: {self.fix}")
        return lines

    def as_json(self) -> dict[str, Any]:
        return {
            "mountpoint": self.mountpoint,
            "running": False,
            "pid": self.pid,
            "reason": self.reason,
            "died_at": self.died_at,
            "log": self.log,
            "last_log_line": self.last_log_line,
            "still_mounted": self.still_mounted,
            "fix": self.fix,
        }


def _lock_holder(state_dir: Path) -> int | None:
    """The pid that last locked the state dir (daemon.lock_state_dir writes it)."""
    try:
        return int((state_dir / "lock").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _last_line(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    return next((line for line in reversed(lines) if line.strip()), None)


def dead_daemons() -> list[DeadDaemon]:
    """Every mount of this user whose daemon is gone: those still in the mount table (they
    answer ENOTCONN until detached) and those whose daemon left a record."""
    found: dict[str, DeadDaemon] = {}
    for record in control.all_records():
        mnt = str(record["mountpoint"])
        if not os.path.isdir(os.path.dirname(mnt)):
            control.record_path(Path(mnt)).unlink(missing_ok=True)  # long gone (a tmp dir)
            continue
        dead = DeadDaemon.find(Path(mnt))
        if dead is not None:
            found[mnt] = dead
    for mnt in fbmount_mounts():
        if mnt not in found and not_connected(mnt):
            found[mnt] = DeadDaemon(mnt, None, None, None, None, None, True)
    return list(found.values())


# ----- status -----------------------------------------------------------------------------
def cmd_status(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fbmount status", description="show running mounts")
    p.add_argument("mountpoint", nargs="?")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    if args.mountpoint:
        return _status_of_one(Path(args.mountpoint).absolute(), args.json)
    results = []
    for path in control.live_sockets():
        try:
            results.extend(control.request(path, "status"))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)  # a mount that died: its socket is stale
        except OSError as e:
            print(f"fbmount: {path}: {e}", file=sys.stderr)
    # Only the dead mounts that still need a hand: those left in the mount table.
    dead = [d for d in dead_daemons() if d.still_mounted]
    if args.json:
        print(json.dumps(results + [d.as_json() for d in dead], indent=2))
        return 1 if dead else 0
    for d in dead:
        print("\n".join(f"fbmount: {line}" for line in d.report()), file=sys.stderr)
    if not results:
        print("no fbmount mounts running for this user")
    for st in results:
        print(format_status(st))
    return 1 if dead else 0


def _status_of_one(mnt: Path, as_json: bool) -> int:
    path = control.socket_path(mnt)
    had_socket = path.exists()
    results: list[dict] = []
    if had_socket:
        try:
            results = list(control.request(path, "status"))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)  # its daemon died: the socket is stale
        except OSError as e:
            print(f"fbmount: {mnt}: its daemon does not answer: {e}", file=sys.stderr)
            return 1
    if results:
        print(json.dumps(results[0], indent=2) if as_json else format_status(results[0]))
        return 0
    dead = DeadDaemon.find(mnt)
    if dead is not None:
        if as_json:
            print(json.dumps(dead.as_json(), indent=2))
        print("\n".join(f"fbmount: {line}" for line in dead.report()), file=sys.stderr)
        return 1
    if not had_socket:
        raise StartupError(f"{mnt} is not an fbmount mount of this user (no control socket {path})")
    if as_json:
        print(json.dumps({}))
    print(
        f"fbmount: the mount at {mnt} is not running; if ls says "
        f"'Transport endpoint is not connected', run: fusermount3 -uz {mnt}",
        file=sys.stderr,
    )
    return 1


def format_status(st: dict) -> str:
    lines = [
        f"{st['mountpoint']}: {st['source']} at {st['endpoint']} (pid {st['pid']}, "
        f"up {st['uptime_s']:.0f}s)",
        f"  waiting to upload: {st['pending_files']} file(s), {human(st['pending_bytes'])}"
        + (f", oldest {st['oldest_pending_s']:.0f}s" if st["pending_files"] else ""),
    ]
    for up in st["uploading"]:
        pct = 100 * up["sent"] / up["bytes"] if up["bytes"] else 0
        lines.append(
            f"  uploading {up['key']}: {human(up['sent'])} of {human(up['bytes'])} ({pct:.0f}%)"
        )
    for f in st["failed"]:
        lines.append(
            f"  FAILED {f['key']} ({f['failures']}x, retry in {f['retry_in_s']:.0f}s): {f['error']}"
        )
    lines.append(f"  uploaded since mount: {st['uploads_done']} file(s)")
    lines.append(
        f"  cache: {human(st['cache_used_bytes'])} staged in {st['cache_dir']}, "
        f"{human(st['cache_free_bytes'])} free on its disk"
    )
    reqs = ", ".join(f"{k} {v}" for k, v in sorted(st["requests"].items()))
    errs = ", ".join(f"{k} {v}" for k, v in sorted(st["errors"].items())) or "none"
    lines.append(f"  requests: {reqs or 'none'}")
    lines.append(f"  errors: {errs}")
    lines.append(
        f"  last minute: up {human(st['upload_rate_Bps'])}/s, "
        f"down {human(st['download_rate_Bps'])}/s"
    )
    return "\n".join(lines)


# ----- sync / umount ------------------------------------------------------------------------


def _daemon_gone(mountpoint: str, otherwise: str) -> StartupError:
    """The error for a sync that lost its daemon: the dead daemon and its fix when one is
    recorded, else `otherwise`."""
    dead = DeadDaemon.find(Path(mountpoint).absolute())
    if dead is not None:
        return StartupError(f"{dead.summary()}; fix: {dead.fix}")
    return StartupError(otherwise)


def cmd_sync(argv: list[str], unmount: bool) -> int:
    name = "umount" if unmount else "sync"
    p = argparse.ArgumentParser(
        prog=f"fbmount {name}",
        description="upload everything written so far" + (", then unmount" if unmount else ""),
    )
    p.add_argument("mountpoint")
    args = p.parse_args(argv)
    path = _socket_for(args.mountpoint)
    tty = sys.stderr.isatty()
    result: dict = {}
    try:
        for msg in control.request(path, "sync", timeout=None):
            if "progress" in msg and tty:
                done, total = msg["progress"]["done"], msg["progress"]["total"]
                width = 30
                filled = width * done // total if total else width
                print(
                    f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} uploaded",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )
            elif "result" in msg:
                result = msg
    except OSError as e:
        raise _daemon_gone(args.mountpoint, f"lost the mount's control socket: {e}") from None
    if tty:
        print(file=sys.stderr)
    if not result:  # the stream ended without an answer: the daemon died during the sync
        raise _daemon_gone(args.mountpoint, "the mount's daemon stopped before the sync finished")
    if result.get("result") != "ok":
        for f in result.get("failed", []):
            print(f"fbmount: not uploaded: {f['key']}: {f['error']}", file=sys.stderr)
        print(
            f"fbmount: {len(result.get('failed', []))} file(s) not in S3 yet; they stay "
            "staged and are retried",
            file=sys.stderr,
        )
        return 1
    print(f"{result.get('total', 0)} file(s) uploaded; everything written is in S3")
    if unmount:
        r = subprocess.run(["fusermount3", "-u", args.mountpoint], capture_output=True, text=True)
        if r.returncode:
            print(f"fbmount: {r.stderr.strip()}", file=sys.stderr)
            return 1
        # Return only once the daemon is gone (its cache dir unlocked, a --local server
        # stopped), so that mounting the same thing again at once just works.
        pid = result.get("pid")
        limit = float(result.get("flush_timeout_s", 600)) + 60
        if isinstance(pid, int) and not wait_for_exit(pid, limit):
            print(
                f"fbmount: unmounted, but its daemon (pid {pid}) is still running after "
                f"{limit:.0f}s; see its log",
                file=sys.stderr,
            )
            return 1
    return 0


def wait_for_exit(pid: int, timeout: float) -> bool:
    """Block until process `pid` (not our child) has exited; False after `timeout` s."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:  # no pidfd (Linux < 5.3): look every 50 ms
        deadline = time.monotonic() + timeout
        while daemon_alive(pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)  # readable once the process has exited
        return bool(poller.poll(int(timeout * 1000)))
    finally:
        os.close(fd)


# ----- doctor -----------------------------------------------------------------------------
class Report:
    def __init__(self) -> None:
        self.failures = 0

    def ok(self, what: str, detail: str = "") -> None:
        print(f"ok    {what}" + (f": {detail}" if detail else ""))

    def fail(self, what: str, detail: str, fix: str) -> None:
        self.failures += 1
        print(f"FAIL  {what}: {detail}\n      fix: {fix}")

    def warn(self, what: str, detail: str) -> None:
        print(f"warn  {what}: {detail}")


def cmd_doctor(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fbmount doctor", description="check a setup")
    p.add_argument("bucket", nargs="?", help="without it: check the account (ListBuckets)")
    p.add_argument("--endpoint", default=DEFAULT_ENDPOINT)
    p.add_argument("--region", default="us-east-1")
    p.add_argument("--profile")
    p.add_argument("--passwd-file", type=Path)
    p.add_argument("--ca-bundle", type=Path)
    p.add_argument("--allow-other", action="store_true", help="check for -o allow_other too")
    args = p.parse_args(argv)
    rep = Report()
    check_fuse(rep, args.allow_other)
    check_stale_mounts(rep)
    creds = check_credentials(rep, args)
    if check_endpoint(rep, args):
        (check_bucket if args.bucket else check_account)(rep, args, creds)
    print("all checks passed" if not rep.failures else f"{rep.failures} check(s) failed")
    return 1 if rep.failures else 0


def check_fuse(rep: Report, allow_other: bool) -> None:
    if os.path.exists("/dev/fuse") and os.access("/dev/fuse", os.R_OK | os.W_OK):
        rep.ok("/dev/fuse")
    else:
        rep.fail(
            "/dev/fuse",
            "missing or not accessible",
            "modprobe fuse; in a container add --device /dev/fuse",
        )
    if shutil.which("fusermount3"):
        rep.ok("fusermount3", shutil.which("fusermount3") or "")
    else:
        rep.fail("fusermount3", "not installed", "apt-get install fuse3")
    if allow_other and os.getuid() != 0:
        conf = Path("/etc/fuse.conf")
        text = conf.read_text() if conf.exists() else ""
        if any(line.strip() == "user_allow_other" for line in text.splitlines()):
            rep.ok("user_allow_other in /etc/fuse.conf")
        else:
            rep.fail(
                "allow_other",
                "/etc/fuse.conf lacks user_allow_other",
                "echo user_allow_other | sudo tee -a /etc/fuse.conf",
            )


def check_stale_mounts(rep: Report) -> None:
    """Mounts whose daemon is gone: a failure while still mounted (ENOTCONN to every
    program), a warning with the reason when it died of an error and the mount is gone."""
    dead = dead_daemons()
    for d in dead:
        if d.still_mounted:
            rep.fail(
                "stale mount",
                f"{d.mountpoint}: Transport endpoint is not connected; "
                f"its daemon{f' (pid {d.pid})' if d.pid else ''} {d.cause}",
                d.fix,
            )
        elif d.reason:
            rep.warn("dead daemon", f"{d.mountpoint}: its daemon (pid {d.pid}) {d.cause}")
    if not any(d.still_mounted for d in dead):
        rep.ok("no stale fbmount mounts")


def check_credentials(rep: Report, args: argparse.Namespace) -> credentials.Credentials | None:
    try:
        creds = credentials.resolve(args.passwd_file, args.profile, args.bucket)
    except StartupError as e:
        rep.fail("credentials", str(e), "fix the password file as the message says")
        return None
    if creds is None:
        rep.warn(
            "credentials",
            "none in env or password files; botocore's chain "
            "(profile, ~/.aws/credentials) will be tried",
        )
    else:
        rep.ok("credentials", f"access key {creds.access_key[:4]}…")
    return creds


def check_endpoint(rep: Report, args: argparse.Namespace) -> bool:
    url = urlsplit(args.endpoint)
    host, https = url.hostname or "", url.scheme == "https"
    port = url.port or (443 if https else 80)
    try:
        raw = socket.create_connection((host, port), timeout=10)
    except OSError as e:
        rep.fail(
            "endpoint",
            f"{host}:{port} unreachable: {e}",
            "check the --endpoint URL, DNS and firewall",
        )
        return False
    date_header = None
    try:
        sock: socket.socket = raw
        if https:
            ctx = ssl.create_default_context(cafile=str(args.ca_bundle) if args.ca_bundle else None)
            try:
                sock = ctx.wrap_socket(raw, server_hostname=host)
            except ssl.SSLCertVerificationError as e:
                rep.fail(
                    "TLS",
                    f"certificate of {host} does not verify: {e.verify_message}",
                    "use the right endpoint, or --ca-bundle CA.pem for a private CA",
                )
                return False
            except ssl.SSLError as e:
                rep.fail(
                    "TLS",
                    f"handshake with {host}:{port} failed: {e.reason}",
                    "the port may not speak TLS: check http:// vs https://",
                )
                return False
            rep.ok("TLS", f"certificate of {host} verifies")
        sock.settimeout(10)
        sock.sendall(f"HEAD / HTTP/1.1\r\nHost: {url.netloc}\r\nConnection: close\r\n\r\n".encode())
        head = sock.recv(65536).decode("latin-1")
        for line in head.split("\r\n"):
            if line.lower().startswith("date:"):
                date_header = line.split(":", 1)[1].strip()
        rep.ok("endpoint", f"{args.endpoint} answers")
    except OSError as e:
        rep.fail("endpoint", f"{args.endpoint}: {e}", "check the --endpoint URL")
        return False
    finally:
        raw.close()
    if date_header:
        try:
            skew = parsedate_to_datetime(date_header).timestamp() - time.time()
        except (TypeError, ValueError):
            skew = 0.0
        if abs(skew) > 15 * 60:
            rep.fail(
                "clock",
                f"this machine's clock is {skew:+.0f}s off the server's; SigV4 "
                "refuses requests past 15 minutes",
                "enable time sync: timedatectl set-ntp true",
            )
        elif abs(skew) > 60:
            rep.warn("clock", f"{skew:+.0f}s off the server's clock")
        else:
            rep.ok("clock", f"{skew:+.1f}s from the server's")
    return True


def _doctor_store(args: argparse.Namespace, creds: credentials.Credentials | None) -> Any:
    from fbmount.store import S3Store

    store = S3Store(
        args.bucket,
        args.endpoint,
        args.region,
        creds,
        args.profile,
        str(args.ca_bundle) if args.ca_bundle else None,
        retries=2,
        timeout=30,
    )
    store.open()
    return store


def check_account(
    rep: Report, args: argparse.Namespace, creds: credentials.Credentials | None
) -> None:
    """No bucket named: what `fbmount MOUNTPOINT` (the whole account) needs."""
    import trio

    store = _doctor_store(args, creds)
    try:
        buckets = trio.run(store.list_buckets)
        rep.ok("account", f"{len(buckets)} bucket(s) listable")
    except FsError as e:
        rep.fail(
            "account",
            e.message,
            "check the access key and secret; a key limited to one bucket needs "
            "`fbmount doctor BUCKET` and `fbmount BUCKET MOUNTPOINT`",
        )
    finally:
        store.close()


def check_bucket(
    rep: Report, args: argparse.Namespace, creds: credentials.Credentials | None
) -> None:
    import trio

    store = _doctor_store(args, creds)
    probe = f".fbmount-doctor-{secrets.token_hex(4)}"

    async def run() -> None:
        try:
            await store.check_bucket()
        except FsError as e:
            fix = (
                "check the access key and secret"
                if e.errno == errno.EACCES
                else "create the bucket or fix its name"
                if e.errno == errno.ENOENT
                else "see the message"
            )
            rep.fail("bucket", e.message, fix)
            return
        rep.ok("bucket", f"{args.bucket} is listable")
        try:
            upload_id = await store.create_multipart(probe, {}, "application/octet-stream")
            await store.abort_multipart(probe, upload_id)
            rep.ok("multipart uploads", "supported")
        except FsError as e:
            rep.fail(
                "multipart uploads",
                e.message,
                "large files need multipart; check the key's permissions",
            )
        try:
            await store.put(probe, b"fbmount doctor", {}, "text/plain")
            try:
                await store.copy(probe, probe + "-copy")
                rep.ok("CopyObject", "supported: renames are server-side copies")
                await store.delete(probe + "-copy")
            except FsError as e:
                rep.warn(
                    "CopyObject",
                    f"refused ({e.message}); renames and metadata changes "
                    "will stream objects through this machine",
                )
            await store.delete(probe)
        except FsError as e:
            rep.fail("write", e.message, "the key needs write access to the bucket")

    try:
        trio.run(run)
    finally:
        store.close()
