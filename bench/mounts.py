"""Mount and unmount the three file systems under test, each as our own foreground child.

Running every tool in the foreground (fbmount -f, s3fs -f, rclone mount without --daemon)
gives us its PID directly, for CPU/RSS accounting and for stopping exactly what we started.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import (
    StepFailed,
    abort_fuse,
    kill_group,
    mount_entry,
    proc_stats,
    run,
    wait_until,
)
from bench.s3 import RCLONE_REMOTE, RCLONE_S3_FLAGS

TOOLS = ("fbmount", "s3fs", "rclone")
MOUNT_TIMEOUT = 30.0
UNMOUNT_TIMEOUT = 120.0  # fbmount flushes staged writes on unmount


class Mount:
    """One live mount of ``bucket`` at ``mnt`` through ``endpoint`` (the server or a proxy).

    ``mode`` is "read" or "write"; only rclone uses it (--vfs-cache-mode off / writes).
    """

    tool = ""

    def __init__(
        self, env: dict[str, str], endpoint: str, bucket: str, mnt: Path, work: Path, mode: str
    ) -> None:
        self.env = env
        self.endpoint = endpoint
        self.bucket = bucket
        self.mnt = mnt
        self.work = work  # private scratch dir: cache, logs
        self.mode = mode
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = work / f"{self.tool}.log"
        self.cpu0 = 0.0
        self.link = None  # the runner's FarLink in front of endpoint, if any
        self.link_stats: dict[str, int] = {}

    def argv(self) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Write whatever files argv() refers to (called by start)."""

    def extra_env(self) -> dict[str, str]:
        return {}

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.prepare()
        env = dict(self.env)
        env.update(self.extra_env())
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        ok = wait_until(
            lambda: mount_entry(self.mnt) is not None or self.proc.poll() is not None,
            MOUNT_TIMEOUT,
            0.05,
        )
        if not ok or mount_entry(self.mnt) is None:
            self.stop()
            raise StepFailed(f"{self.tool} did not mount: {self.log_tail()}")
        # The mount is in the table; wait until it answers (bounded by the run() timeout).
        res = run(["stat", "-c", "%i", str(self.mnt)], MOUNT_TIMEOUT, on_hang=self.abort)
        if res.rc != 0:
            self.stop()
            raise StepFailed(f"{self.tool} mount does not answer: {res.stderr.strip()}")
        stats = proc_stats(self.pid)
        self.cpu0 = stats["cpu_s"] if stats else 0.0

    def stats(self) -> dict[str, float] | None:
        """CPU seconds since the mount answered, peak and current RSS of the daemon."""
        stats = proc_stats(self.pid)
        if stats is None:
            return None
        stats["cpu_s"] = round(stats["cpu_s"] - self.cpu0, 2)
        return stats

    def abort(self) -> None:
        abort_fuse(self.mnt)

    def stop(self, grace: float = UNMOUNT_TIMEOUT) -> float:
        """Unmount and reap the daemon; returns seconds it took.  Escalates: fusermount3 -u,
        wait ``grace`` s (fbmount uploads staged data after the unmount; a daemon that
        already hung a workload gets a short grace), SIGTERM, SIGKILL (our child's group
        only), fusermount3 -uz."""
        start = time.monotonic()
        proc = self.proc
        if mount_entry(self.mnt) is not None:
            run(["fusermount3", "-u", str(self.mnt)], 30, on_hang=self.abort)
        if proc is not None:
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                kill_group(proc.pid, 15)
                try:
                    proc.wait(min(10.0, grace))
                except subprocess.TimeoutExpired:
                    kill_group(proc.pid)
                    self.abort()
                    proc.wait(10)
        if mount_entry(self.mnt) is not None:
            self.abort()
            run(["fusermount3", "-uz", str(self.mnt)], 10)
        self.proc = None
        return time.monotonic() - start

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])


class FbmountMount(Mount):
    tool = "fbmount"

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "fbmount",
            self.bucket,
            str(self.mnt),
            "-f",
            "--endpoint",
            self.endpoint,
            "--cache-dir",
            str(self.work / "cache"),
        ]


class S3fsMount(Mount):
    tool = "s3fs"

    def prepare(self) -> None:
        fd = os.open(self.work / "passwd-s3fs", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{self.env['AWS_ACCESS_KEY_ID']}:{self.env['AWS_SECRET_ACCESS_KEY']}\n")
        (self.work / "tmp").mkdir(exist_ok=True)

    def argv(self) -> list[str]:
        passwd = self.work / "passwd-s3fs"
        tmpdir = self.work / "tmp"
        opts = [
            f"url={self.endpoint}",
            "use_path_request_style",
            f"passwd_file={passwd}",
            # Same upload concurrency and part size as fbmount's defaults (8 x 8 MiB).
            "parallel_count=8",
            "multipart_size=8",
            # Recommended by `s3fs --help` for performance: cache "does not exist" answers.
            "enable_noobj_cache",
            f"tmpdir={tmpdir}",
            "dbglevel=warn",
        ]
        return ["s3fs", self.bucket, str(self.mnt), "-f", "-o", ",".join(opts)]


class RcloneMount(Mount):
    tool = "rclone"

    def argv(self) -> list[str]:
        cache_mode = "writes" if self.mode == "write" else "off"
        return [
            "rclone",
            "mount",
            f"{RCLONE_REMOTE}:{self.bucket}",
            str(self.mnt),
            "--vfs-cache-mode",
            cache_mode,
            "--cache-dir",
            str(self.work / "cache"),
            *RCLONE_S3_FLAGS,
            "--log-level",
            "NOTICE",
        ]

    def extra_env(self) -> dict[str, str]:
        # The remote's endpoint may be a counting proxy rather than the server.
        return {f"RCLONE_CONFIG_{RCLONE_REMOTE.upper()}_ENDPOINT": self.endpoint}


MOUNTS: dict[str, type[Mount]] = {
    "fbmount": FbmountMount,
    "s3fs": S3fsMount,
    "rclone": RcloneMount,
}
