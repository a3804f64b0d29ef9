"""`fbmount status | sync | umount | doctor`: living with a mount.

status and sync talk to the running daemon over its control socket (control.py);
doctor checks a setup piece by piece and prints a one-line fix for each failure.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import time
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
        raise StartupError(
            f"{mountpoint} is not an fbmount mount of this user (no control socket {path})"
        )
    return path


# ----- status -----------------------------------------------------------------------------
def cmd_status(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fbmount status", description="show running mounts")
    p.add_argument("mountpoint", nargs="?")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    paths = [_socket_for(args.mountpoint)] if args.mountpoint else control.live_sockets()
    results = []
    for path in paths:
        try:
            results.extend(control.request(path, "status"))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)  # a mount that died: its socket is stale
            continue
        except OSError as e:
            print(f"fbmount: {path}: {e}", file=sys.stderr)
    if args.json:
        print(json.dumps(results if not args.mountpoint else (results or [{}])[0], indent=2))
        return 0 if results else 1
    if not results and args.mountpoint:
        print(
            f"fbmount: the mount at {args.mountpoint} is not running; if ls says "
            f"'Transport endpoint is not connected', run: fusermount3 -uz {args.mountpoint}",
            file=sys.stderr,
        )
        return 1
    if not results:
        print("no fbmount mounts running for this user")
        return 0
    for st in results:
        print(format_status(st))
    return 0


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
        raise StartupError(f"lost the mount's control socket: {e}") from None
    if tty:
        print(file=sys.stderr)
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
    return 0


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
    stale = []
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "fuse.fbmount":
            mnt = fields[1].replace("\\040", " ")
            try:
                os.statvfs(mnt)  # stat() may answer from the kernel's attr cache
            except OSError as e:
                if e.errno == errno.ENOTCONN:
                    stale.append(mnt)
    for mnt in stale:
        rep.fail(
            "stale mount", f"{mnt}: Transport endpoint is not connected", f"fusermount3 -uz {mnt}"
        )
    if not stale:
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
