"""Mount life cycle: check, (daemonize), recover, mount, serve, flush, unmount.

Daemon mode forks *before* any thread exists (the asyncio thread, libfuse) and the parent
waits on a pipe: it exits 0 only once the child's mount answers, or prints the child's one
line of error and exits 1, so `fbmount ... && ls MOUNTPOINT` and mount(8) behave.
"""

from __future__ import annotations

import errno
import faulthandler
import fcntl
import json
import logging
import logging.handlers
import os
import signal
import ssl
import stat
import sys
import time
import traceback
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyfuse3
import trio

from fbmount import control, credentials, notify
from fbmount.account import AccountFilesystem
from fbmount.config import PROVIDERS, Config
from fbmount.errors import FsError, StartupError
from fbmount.fs import Filesystem
from fbmount.metaindex import MetaIndex
from fbmount.staging import StagingArea
from fbmount.store import S3Store
from fbmount.tasks import collapse, open_nursery

log = logging.getLogger("fbmount")


def setup_logging(cfg: Config, daemon: bool) -> str:
    """Send the log to syslog, the state dir's fbmount.log (a daemon) or stderr (-f).

    Returns where it goes ("syslog", the file's path, or "stderr"), for the mount's record:
    `fbmount status` points there when the daemon is gone.
    """
    level = logging.DEBUG if cfg.debug else logging.INFO
    root = logging.getLogger()
    root.handlers.clear()
    where = "stderr"
    if daemon and Path("/dev/log").exists():
        handler: logging.Handler = logging.handlers.SysLogHandler("/dev/log")
        handler.setFormatter(logging.Formatter("fbmount[%(process)d]: %(message)s"))
        where = "syslog"
    elif daemon:
        old_umask = os.umask(0o077)  # parents too (e.g. a --local DIR holding the data): 0700
        try:
            cfg.state_dir().mkdir(parents=True, exist_ok=True, mode=0o700)
        finally:
            os.umask(old_umask)
        file_handler = logging.FileHandler(cfg.state_dir() / "fbmount.log")
        # A crash below Python (libfuse, a C extension) leaves no exception to log: let
        # the interpreter write its stack to the same file.
        faulthandler.enable(file_handler.stream)
        handler = file_handler
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        where = str(cfg.state_dir() / "fbmount.log")
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(message)s" if os.environ.get("INVOCATION_ID") else "%(asctime)s %(message)s"
        handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(level)
    # botocore's debug dumps carry signed URLs, Authorization headers and the access key:
    # never enable them. --debug traces each request from store.py instead.
    for noisy in ("botocore", "aiobotocore", "urllib3", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return where


def check_mountpoint(path: Path) -> None:
    try:
        st = path.stat()
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise StartupError(
                f"{path}: a previous mount died (Transport endpoint is not connected); "
                f"run: fusermount3 -uz {path}"
            ) from None
        raise StartupError(f"mountpoint {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StartupError(f"mountpoint {path} is not a directory")
    if os.path.ismount(path):
        raise StartupError(f"{path} is already a mount point")


def try_lock_state_dir(state_dir: Path) -> int | None:
    """Lock a cache directory (creating it) for this process: staged files must have exactly
    one uploader. Returns the lock's fd, or None when another mount holds it."""
    old_umask = os.umask(0o077)  # every directory we create is private, parents too
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(state_dir, 0o700)
        fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise StartupError(f"cannot use the cache directory {state_dir}: {e.strerror}") from None
    finally:
        os.umask(old_umask)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)  # the holder's pid alone: `fbmount status` reads it (tools.py)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def holds_staged_files(state_dir: Path) -> bool:
    """Did a mount that used this directory leave files to upload (a bucket's, or one of an
    account's buckets)?"""
    return any(
        any(state_dir.glob(f"{where}/{name}"))
        for where in ("staging", "buckets/*/staging")
        for name in ("journal-*.log", "*.json")  # *.json: an older fbmount's records
    )


def claim_state_dir(cfg: Config) -> tuple[int, list[Path]]:
    """Take a cache directory of this bucket for this mount and point cfg.state_dir() at it.

    One mount per directory, not per bucket: when the bucket's directory is in use, a second
    mount takes a sibling of its own (NAME-2, NAME-3, ...). Among the free ones, one holding
    files staged by an earlier mount comes first, so that crash recovery, which is per
    directory, uploads them now. Returns the lock's fd and the directories found in use.
    --local refuses instead: its directory belongs to a SeaweedFS that cannot run twice.
    """
    cfg.state_instance = 1
    first = cfg.state_dir()
    instances = {1}
    if first.parent.is_dir():
        for sibling in first.parent.glob(f"{first.name}-*"):
            suffix = sibling.name[len(first.name) + 1 :]
            if suffix.isdigit() and int(suffix) >= 2:
                instances.add(int(suffix))
    busy: list[Path] = []
    free: tuple[int, int] | None = None  # (instance, fd) of the first free, empty one
    for instance in sorted(instances):
        cfg.state_instance = instance
        fd = try_lock_state_dir(cfg.state_dir())
        if fd is None:
            busy.append(cfg.state_dir())
            if cfg.local_dir is not None:
                raise StartupError(
                    f"{cfg.local_dir} is in use by another fbmount --local; unmount that "
                    "first (fbmount umount MOUNTPOINT)"
                )
        elif holds_staged_files(cfg.state_dir()):
            if free is not None:
                os.close(free[1])
            return fd, busy
        elif free is None:
            free = (instance, fd)
        else:
            os.close(fd)
    if free is not None:
        cfg.state_instance = free[0]
        return free[1], busy
    for instance in range(max(instances) + 1, max(instances) + 100):
        cfg.state_instance = instance
        fd = try_lock_state_dir(cfg.state_dir())  # a new one, unless a racing mount won it
        if fd is not None:
            return fd, busy
        busy.append(cfg.state_dir())
    raise StartupError(f"no free cache directory next to {first} (100 mounts of this bucket?)")


def fuse_options(cfg: Config) -> set[str]:
    opts = {f"fsname={cfg.fsname or cfg.source}", "subtype=fbmount", "noatime"}
    if cfg.allow_other:
        opts.add("allow_other")
    if cfg.default_permissions:
        opts.add("default_permissions")
    if cfg.read_only:
        opts.add("ro")
    opts.update(cfg.extra_fuse_options)
    return opts


def raise_read_ahead(mountpoint: Path, kib: int) -> None:
    """FUSE caps kernel read-ahead at 128 KiB unless the mount's bdi says more (root only)."""
    try:
        dev = os.stat(mountpoint).st_dev
        path = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
        path.write_text(str(kib))
    except OSError:
        pass


def _size(staged: Any) -> int:
    """A pending file's size for status: its local copy, else its node's (metadata only)."""
    try:
        return staged.size() if staged.has_data else (staged.node.size if staged.node else 0)
    except OSError:
        return 0


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.fs: Filesystem | AccountFilesystem | None = None
        self.store: S3Store | None = None
        self.failed_uploads = 0
        self.aborted = False  # the kernel aborted the FUSE connection: exit 1, as a failure
        self.started = time.monotonic()
        self.throughput = control.Throughput()
        self.local_server = None
        self.lock_fd: int | None = None
        self.busy_state_dirs: list[Path] = []

    def claim_state_dir(self) -> None:
        """Check the mountpoint, then take a cache directory: before logging is set up,
        because a daemon's log file lives in the directory it takes."""
        check_mountpoint(self.cfg.mountpoint)
        self.lock_fd, self.busy_state_dirs = claim_state_dir(self.cfg)

    def prepare(self) -> None:
        """Everything else that can fail before mounting, with a clear message."""
        cfg = self.cfg
        if self.lock_fd is None:
            self.claim_state_dir()
        state_dir = cfg.state_dir()
        if self.busy_state_dirs:
            log.info(
                "cache directory %s; in use by other mounts of this bucket: %s",
                state_dir,
                ", ".join(map(str, self.busy_state_dirs)),
            )
        elif holds_staged_files(state_dir):
            log.info("cache directory %s (holds files staged by an earlier mount)", state_dir)
        if cfg.local_dir is not None:
            creds = self.start_local_server()
        else:
            creds = credentials.resolve(cfg.passwd_file, cfg.profile, cfg.bucket)
        if cfg.ca_bundle and not cfg.ca_bundle.is_file():
            raise StartupError(f"CA bundle {cfg.ca_bundle} does not exist")
        self.store = S3Store(
            cfg.bucket,
            cfg.endpoint,
            cfg.region,
            creds,
            cfg.profile,
            str(cfg.ca_bundle) if cfg.ca_bundle else None,
            pool_size=max(32, cfg.parallel * 4),
            retries=cfg.retries,
            timeout=cfg.timeout,
            copy_mode=cfg.copy,
            addressing_style=PROVIDERS[cfg.provider].addressing_style,
            max_rps=cfg.max_rps or 0.0,
            flexible_checksums=PROVIDERS[cfg.provider].flexible_checksums,
        )
        self.store.open()
        if cfg.all_buckets:
            self.fs = AccountFilesystem(cfg, self.store)
        else:
            staging = StagingArea(state_dir / "staging")
            self.fs = Filesystem(cfg, self.store, staging, MetaIndex(state_dir / "meta.sqlite"))

    def filesystems(self) -> list[Filesystem]:
        """Every bucket served: one, or those an account mount has used so far."""
        if isinstance(self.fs, AccountFilesystem):
            return self.fs.filesystems()
        return [self.fs] if self.fs is not None else []

    def label(self, fs: Filesystem, key: str) -> str:
        """A staged file's name in logs and status: BUCKET/KEY on an account mount."""
        return f"{fs.store.bucket}/{key}" if self.cfg.all_buckets else key

    def status(self) -> dict[str, Any]:
        """Everything `fbmount status` shows, as plain data (served by control.py)."""
        store, cfg, filesystems = self.store, self.cfg, self.filesystems()
        assert store is not None
        now = time.monotonic()
        pending = [(fs, s) for fs in filesystems for s in fs.staging.entries.values() if s.dirty]
        sizes = {s.id: _size(s) for _, s in pending}
        uploading = [(fs, s) for fs in filesystems for s in fs.uploader.in_flight.values()]
        up, down = self.throughput.rates()
        state_dir = cfg.state_dir()
        disk = os.statvfs(state_dir)
        return {
            "mountpoint": str(cfg.mountpoint),
            "running": True,  # a dead mount's entry (tools.DeadDaemon) says False
            "source": cfg.source,
            "endpoint": cfg.endpoint,
            "pid": os.getpid(),
            "uptime_s": round(now - self.started, 1),
            "upload_delay_s": cfg.upload_delay,
            "pending_files": len(pending),
            "pending_bytes": sum(sizes.values()),
            "oldest_pending_s": round(max((now - s.last_change for _, s in pending), default=0), 1),
            "uploading": [
                {
                    "key": self.label(fs, s.key),
                    "bytes": sizes.get(s.id, 0),
                    "sent": s.in_flight_bytes,
                }
                for fs, s in uploading
            ],
            "failed": [
                {
                    "key": self.label(fs, s.key),
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

    async def sync(self, send: control.Send) -> dict[str, Any]:
        """`fbmount sync`: upload everything written so far, `send` progress meanwhile;
        returns the result line: ok, or the failures."""
        work = [
            (fs, [s for s in fs.staging.entries.values() if s.dirty]) for fs in self.filesystems()
        ]
        targets = [s for _, dirty in work for s in dirty]
        total = len(targets)
        failures: list[dict] = []

        async def sync_one(fs: Filesystem, dirty: list) -> None:
            for what, why in await fs.uploader.flush_all(dirty):
                failures.append({"key": self.label(fs, what), "error": why})

        async def progress() -> None:
            while True:
                left = sum(1 for s in targets if s.dirty)
                await send({"progress": {"total": total, "done": total - left}})
                await trio.sleep(0.5)

        async with open_nursery() as nursery:
            nursery.start_soon(progress)
            async with open_nursery() as syncs:
                for fs, dirty in work:
                    syncs.start_soon(sync_one, fs, dirty)
            nursery.cancel_scope.cancel()
        return {
            "result": "ok" if not failures else "failed",
            "total": total,
            "failed": failures,
            # `fbmount umount` waits for this process to exit (its final flush, a --local
            # server's shutdown), bounded by how long that flush may take.
            "pid": os.getpid(),
            "flush_timeout_s": self.cfg.flush_timeout,
        }

    async def _reachable(self) -> None:
        """Fail in a second, not after botocore's retries, when nothing listens there."""
        url = urlsplit(self.cfg.endpoint)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            with trio.fail_after(10):
                stream = await trio.open_tcp_stream(url.hostname or "", port)
                if url.scheme == "https":  # a bad certificate: say so now, not after retries
                    stream = trio.SSLStream(
                        stream, _tls_context(self.cfg.ca_bundle), server_hostname=url.hostname
                    )
                    await stream.do_handshake()
                await stream.aclose()
        except trio.BrokenResourceError as e:
            raise StartupError(_tls_failure(self.cfg, e.__cause__)) from None
        except (OSError, trio.TooSlowError) as e:
            reason = (
                "no answer within 10 s"
                if isinstance(e, trio.TooSlowError)
                else (e.strerror or str(e))
            )
            raise StartupError(f"cannot reach the endpoint {self.cfg.endpoint}: {reason}") from None

    def start_local_server(self) -> credentials.Credentials:
        """--local: a private SeaweedFS on loopback with its own keys, data kept in local_dir."""
        import secrets

        from fbmount.localserver import LocalS3Server, LocalServerError

        cfg = self.cfg
        assert cfg.local_dir is not None
        cfg.local_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        keys_path = cfg.local_dir / "credentials"
        if not keys_path.exists():
            fd = os.open(keys_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, f"{secrets.token_hex(10)}:{secrets.token_hex(20)}\n".encode())
            os.close(fd)
        creds = credentials.read_passwd_file(keys_path, None)
        server = LocalS3Server(
            cfg.local_dir / "seaweedfs",
            identities={creds.access_key: creds.secret_key},
            stop_timeout=5,
            die_with_parent=True,
        )  # kill -9: no orphan
        try:
            server.start()
        except (LocalServerError, OSError) as e:
            raise StartupError(f"cannot start the local S3 server: {e}") from None
        self.local_server = server
        cfg.endpoint = server.endpoint
        log.info("local S3 server %s (data in %s)", server.endpoint, cfg.local_dir)
        return creds

    async def check(self) -> None:
        assert self.store is not None
        await self._reachable()
        if self.local_server is not None and self.cfg.bucket is not None:
            try:
                await self.store.bucket_call(
                    "create_bucket", "create bucket", Bucket=self.cfg.bucket
                )
            except FsError as e:
                if e.errno != errno.EEXIST:
                    raise StartupError(f"cannot create the local bucket: {e.message}") from None
        try:
            if self.cfg.all_buckets:
                await self.store.list_buckets()
            else:
                await self.store.check_bucket(self.cfg.prefix)
        except FsError as e:
            raise StartupError(explain_startup_failure(self.cfg, e)) from None
        if isinstance(self.fs, Filesystem):
            await self.fs.adopt_bucket_acl()

    async def serve(self, on_ready) -> None:
        assert self.fs is not None
        cfg, fs = self.cfg, self.fs
        await self.check()
        if isinstance(fs, Filesystem):  # an account mount recovers each bucket on first use
            await fs.recover()
        try:
            pyfuse3.init(fs, str(cfg.mountpoint), fuse_options(cfg))
        except RuntimeError as e:
            raise StartupError(
                f"cannot mount {cfg.mountpoint}: {e} (is /dev/fuse usable and "
                "fusermount3 installed?)"
            ) from None
        log.info("mounted %s at %s (endpoint %s)", cfg.source, cfg.mountpoint, cfg.endpoint)
        closed = False

        def close_fuse() -> None:
            nonlocal closed
            if not closed:
                closed = True
                try:
                    pyfuse3.close(unmount=True)
                except Exception as e:  # noqa: BLE001 - report and go on flushing
                    log.error("unmount failed: %s", e)

        try:
            async with open_nursery() as nursery:
                fs.nursery = nursery
                if isinstance(fs, Filesystem):
                    nursery.start_soon(fs.uploader.run)
                nursery.start_soon(self._signals)
                nursery.start_soon(self._announce_ready, on_ready)
                await nursery.start(control.serve, self.cfg.mountpoint, self.status, self.sync)
                nursery.start_soon(self._sample_throughput)
                try:
                    await pyfuse3.main(min_tasks=4, max_tasks=128)
                except* ConnectionAbortedError:
                    # Not a bug of ours: `echo 1 > /sys/fs/fuse/connections/N/abort` (or
                    # `umount -f`) cut the mount off. Staged files are still stored first.
                    self.aborted = True
                    log.error(
                        "the kernel aborted the FUSE connection of %s (written to "
                        "/sys/fs/fuse/connections/*/abort, or umount -f); storing what is "
                        "staged, then exiting",
                        cfg.mountpoint,
                    )
                close_fuse()
                # Background work (streamed parts, uploads in flight) keeps running while
                # everything staged is flushed; only then is the nursery cancelled.
                await self._final_flush()
                nursery.cancel_scope.cancel()
        finally:
            close_fuse()
        log.info("unmounted %s", cfg.mountpoint)

    async def _final_flush(self) -> None:
        notify.stopping("flushing staged uploads")
        filesystems = self.filesystems()
        pending = sum(1 for fs in filesystems for s in fs.staging.entries.values() if s.dirty)
        if pending:
            log.info("unmounted; uploading %d staged file(s) before exit", pending)
        failed: list[tuple[Filesystem, list[tuple[str, str]]]] = []

        async def drain(fs: Filesystem) -> None:
            end = trio.current_time() + self.cfg.flush_timeout  # one bound for both waits
            left = await fs.uploader.flush_all(deadline=self.cfg.flush_timeout)
            if left:
                failed.append((fs, left))
            with trio.move_on_at(end):
                await fs.eager.settle()
            fs.staging.remove_settled()

        async with open_nursery() as nursery:
            nursery.start_soon(self._keep_systemd_waiting)
            async with open_nursery() as drains:
                for fs in filesystems:
                    drains.start_soon(drain, fs)
            nursery.cancel_scope.cancel()
        self.failed_uploads = sum(len(left) for _, left in failed)
        for fs, left in failed:
            log.error(
                "%d item(s) could not be stored in S3; staged files stay in %s and the next "
                "mount of this bucket uploads them",
                len(left),
                fs.staging.root,
            )
            for what, why in left:  # README: what is not uploaded is named in the log
                log.error("not stored: %s (%s)", self.label(fs, what), why)

    async def _sample_throughput(self) -> None:
        assert self.store is not None
        while True:
            self.throughput.sample(self.store.bytes_up, self.store.bytes_down)
            await trio.sleep(1)

    async def _keep_systemd_waiting(self) -> None:
        """While the final flush runs, ask systemd for more stop time, 30 s at a time."""
        while True:
            notify.extend_timeout(30_000_000)
            await trio.sleep(10)

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    continue
                log.info("received %s: unmounting", signal.Signals(signum).name)
                pyfuse3.terminate()
                return

    async def _announce_ready(self, on_ready) -> None:
        await trio.to_thread.run_sync(os.stat, str(self.cfg.mountpoint))
        await trio.to_thread.run_sync(
            raise_read_ahead, self.cfg.mountpoint, max(1024, self.cfg.read_ahead // 1024 // 4)
        )
        on_ready()
        notify.ready(f"mounted {self.cfg.source} at {self.cfg.mountpoint}")
        if os.environ.get("FBMOUNT_TEST_CRASH_AFTER_MOUNT"):  # test hook: a bug once mounted
            raise RuntimeError("FBMOUNT_TEST_CRASH_AFTER_MOUNT: a background task failed")

    def record(self, log_target: str) -> dict:
        """Who serves this mountpoint, kept next to its control socket (control.py) so
        that `fbmount status` can explain the mount after this process is gone."""
        return {
            "pid": os.getpid(),
            "mountpoint": str(self.cfg.mountpoint),
            "source": self.cfg.source,
            "state_dir": str(self.cfg.state_dir()),
            "log": log_target,
            "started": time.time(),
        }

    def leave_last_words(self, raised: BaseException, error: BaseException) -> None:
        """Log an unexpected, fatal error with its traceback and note it in the state dir's
        last-exit file: a background daemon has no terminal to print it on."""
        log.critical(
            "fbmount stops: unexpected error (a bug): %s", describe(error), exc_info=raised
        )
        tail = "".join(traceback.format_exception(raised)).splitlines()[-40:]
        note = {
            "time": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "pid": os.getpid(),
            "mountpoint": str(self.cfg.mountpoint),
            "error": describe(error),
            "traceback": tail,
        }
        path = self.cfg.state_dir() / control.LAST_EXIT
        try:
            tmp = path.with_name(f"{path.name}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(note, f, indent=1)
            os.replace(tmp, path)
        except OSError as e:
            log.error("cannot write %s: %s", path, e)

    def close(self) -> None:
        for fs in self.filesystems():
            fs.index.close()
        if self.store is not None:
            self.store.close()
        if self.local_server is not None:
            self.local_server.stop()


def _tls_context(ca_bundle: Path | None) -> ssl.SSLContext:
    """The trust botocore will use: the --ca-bundle, else its default bundle (certifi)."""
    from botocore.httpsession import get_cert_path

    return ssl.create_default_context(cafile=str(ca_bundle) if ca_bundle else get_cert_path(True))


def _tls_failure(cfg: Config, cause: BaseException | None) -> str:
    if isinstance(cause, ssl.SSLCertVerificationError):
        fix = (
            "renew the server's certificate"
            if "expired" in str(cause.verify_message)
            else "pass --ca-bundle CA.pem if the endpoint uses a private CA"
        )
        return (
            f"the TLS certificate of {cfg.endpoint} does not verify ({cause.verify_message}); {fix}"
        )
    reason = getattr(cause, "reason", None) or cause or "connection closed"
    return (
        f"TLS handshake with {cfg.endpoint} failed ({reason}); check that the port speaks "
        "HTTPS (http:// vs https://)"
    )


def explain_startup_failure(cfg: Config, e: FsError) -> str:
    msg = e.message
    if urlsplit(cfg.endpoint).scheme == "http" and msg.endswith(": 400: Bad Request"):
        # An S3 server answers an S3 error code; a bare 400 is an HTTPS port's answer.
        return (
            f"the endpoint {cfg.endpoint} answered plain HTTP with 400 Bad Request; "
            f"it probably speaks HTTPS: use --endpoint https://{urlsplit(cfg.endpoint).netloc}"
        )
    if "InvalidAccessKeyId" in msg or "SignatureDoesNotMatch" in msg:
        return f"the endpoint {cfg.endpoint} refused the credentials ({msg.split(': ', 1)[-1]})"
    if cfg.all_buckets and e.errno == errno.EACCES:
        return (
            f"the endpoint {cfg.endpoint} refused to list the account's buckets ({msg}); "
            "a key limited to one bucket can mount that bucket: fbmount BUCKET MOUNTPOINT"
        )
    if "NoSuchBucket" in msg:
        return f"bucket {cfg.bucket!r} does not exist at {cfg.endpoint}"
    if e.errno == errno.EACCES:
        return f"access to bucket {cfg.bucket!r} denied: {msg}"
    return msg


def run(cfg: Config) -> int:
    """Mount and serve until unmounted. Returns the process exit code."""
    ready_w = -1
    if not cfg.foreground:
        read_fd, ready_w = os.pipe()
        pid = os.fork()
        if pid:
            os.close(ready_w)
            return _wait_for_child(read_fd, pid)
        os.close(read_fd)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1):
            os.dup2(devnull, fd)
    daemon = Daemon(cfg)

    def report(message: str) -> None:
        nonlocal ready_w
        if ready_w >= 0:
            os.write(ready_w, message.encode() + b"\n")
            os.close(ready_w)
            ready_w = -1

    recorded = False
    try:
        daemon.claim_state_dir()
        log_target = setup_logging(cfg, daemon=not cfg.foreground)
        daemon.prepare()
        try:
            control.write_record(cfg.mountpoint, daemon.record(log_target))
            recorded = True
        except OSError as e:  # status can still ask the socket; only a post-mortem is lost
            log.warning("cannot write %s: %s", control.record_path(cfg.mountpoint), e)
        if ready_w >= 0:
            os.dup2(os.open(os.devnull, os.O_RDWR), 2)
        trio.run(daemon.serve, lambda: report("OK"))
    except BaseException as raised:  # noqa: BLE001 - each kind is handled or re-raised below
        error = collapse(raised) if isinstance(raised, BaseExceptionGroup) else raised
        if isinstance(error, StartupError):
            if ready_w >= 0:
                report(f"ERR {error}")  # the waiting parent prints it: one line, not two
            else:
                print(f"fbmount: {error}", file=sys.stderr)
            return 1
        if isinstance(error, KeyboardInterrupt):
            return 0
        if not isinstance(error, Exception):  # SystemExit and the like: not a crash
            raise
        daemon.leave_last_words(raised, error)
        recorded = False  # keep the record: `fbmount status` reads the last words through it
        report(f"ERR unexpected error: {describe(error)} (see the log)")
        return 1
    finally:
        daemon.close()
        if recorded:
            control.remove_record(cfg.mountpoint, os.getpid())
    return 1 if daemon.failed_uploads or daemon.aborted else 0


def describe(error: BaseException) -> str:
    """One line naming an unexpected error: its type and message."""
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _wait_for_child(read_fd: int, pid: int) -> int:
    with os.fdopen(read_fd) as pipe:
        line = pipe.readline().strip()
    if line == "OK":
        return 0
    if line.startswith("ERR "):
        print(f"fbmount: {line[4:]}", file=sys.stderr)
    else:
        _, status = os.waitpid(pid, 0)
        print(
            "fbmount: the mount process exited before the mount was ready "
            f"(status {status}); run with -f --debug to see why",
            file=sys.stderr,
        )
    return 1
