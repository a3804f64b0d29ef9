"""Process and timing helpers shared by the benchmark modules.

Every command runs in its own session so that a timeout can kill all of it; a process stuck
in a FUSE request cannot die until that FUSE connection is aborted, so ``run`` takes a hook
that aborts the mount under test before waiting again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MIB = 1024 * 1024
MB = 1_000_000  # rates are reported in MB/s (10^6 bytes), as dd does
CLK_TCK = os.sysconf("SC_CLK_TCK")


class StepTimeout(Exception):
    """A workload step ran out of its time budget; ``seconds``: how long the cut step ran
    (None when the budget was already used up before the step began)."""

    def __init__(self, msg: str, seconds: float | None = None) -> None:
        super().__init__(msg)
        self.seconds = seconds


class StepFailed(Exception):
    """A workload step failed (bad exit status, wrong data, mount error)."""


@dataclass
class CmdResult:
    argv: Sequence[str] | str
    rc: int | None
    seconds: float
    stdout: str
    stderr: str
    timed_out: bool = False

    def check(self, what: str, ok_codes: Sequence[int] = (0,)) -> CmdResult:
        """Raise StepTimeout / StepFailed unless the command ended with an accepted status."""
        if self.timed_out:
            raise StepTimeout(f"{what}: cut off after {self.seconds:.0f} s", self.seconds)
        if self.rc not in ok_codes:
            tail = (self.stderr or self.stdout).strip().splitlines()[-3:]
            raise StepFailed(f"{what}: exit {self.rc}: {' | '.join(tail)}")
        return self


@dataclass
class Budget:
    """Time left for one workload on one tool; each step gets what remains."""

    seconds: float
    start: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def step(self) -> float:
        left = self.left()
        if left <= 0:
            raise StepTimeout(f"workload budget of {self.seconds:.0f} s used up")
        return left


def run(
    argv: Sequence[str] | str,
    timeout: float,
    *,
    env: Mapping[str, str] | None = None,
    on_hang: Callable[[], None] | None = None,
    stdout_path: Path | None = None,
) -> CmdResult:
    """Run a command (a string goes through bash) with a hard timeout.

    On timeout the whole process group gets SIGKILL; if it still has not exited after a few
    seconds (blocked in a hung FUSE request), ``on_hang`` is called to abort the mount, then
    we wait again.  Never waits unboundedly.
    """
    shell = isinstance(argv, str)
    cmd: Sequence[str] = ["bash", "-c", argv] if shell else list(argv)  # type: ignore[list-item]
    out_f = open(stdout_path, "wb") if stdout_path else None  # noqa: SIM115
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out_f or subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=max(0.1, timeout))
            return CmdResult(
                argv, proc.returncode, time.monotonic() - start, _text(out), _text(err)
            )
        except subprocess.TimeoutExpired:
            seconds = time.monotonic() - start
            kill_group(proc.pid)
            out, err = b"", b""
            for attempt in range(3):
                try:
                    out, err = proc.communicate(timeout=5)
                    break
                except subprocess.TimeoutExpired:
                    if attempt == 0 and on_hang is not None:
                        on_hang()
                    kill_group(proc.pid)
            return CmdResult(argv, proc.returncode, seconds, _text(out), _text(err), True)
    finally:
        if out_f is not None:
            out_f.close()


def _text(data: bytes | None) -> str:
    return data.decode("utf-8", "replace") if data else ""


def kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal the process group we created for ``pid`` (start_new_session made pid its id)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def drop_caches() -> bool:
    """Drop the kernel page cache so the next read really goes to the mount (root only)."""
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def mount_entry(path: Path) -> tuple[int, int, str] | None:
    """(major, minor, fstype) of the mount at ``path`` from /proc/self/mountinfo.

    Reading mountinfo never touches the mount itself, so this cannot hang on a dead daemon
    the way os.path.ismount (an lstat) can.
    """
    want = str(path)
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:
        parts = line.split(" ")
        if len(parts) < 10:
            continue
        mnt = parts[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
        if mnt == want:
            major, minor = parts[2].split(":")
            sep = parts.index("-", 6)
            found = (int(major), int(minor), parts[sep + 1])  # the last one is on top
    return found


def abort_fuse(path: Path) -> bool:
    """Abort the FUSE connection of the mount at ``path`` so blocked readers return ENOTCONN."""
    entry = mount_entry(path)
    if entry is None or not entry[2].startswith("fuse"):
        return False
    conn = Path("/sys/fs/fuse/connections") / str(os.makedev(entry[0], entry[1])) / "abort"
    try:
        conn.write_text("1")
        return True
    except OSError:
        return False


def proc_stats(pid: int | None) -> dict[str, float] | None:
    """CPU seconds (utime+stime) and peak/current RSS in MiB of a live process."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)
    mem = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            mem[key] = int(value.split()[0]) / 1024
    return {"cpu_s": cpu, "hwm_mib": mem.get("VmHWM", 0.0), "rss_mib": mem.get("VmRSS", 0.0)}


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    """Poll ``pred`` until true or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
