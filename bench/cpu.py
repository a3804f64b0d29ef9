#!/usr/bin/env python3
"""Daemon CPU per operation on a `fbmount --local` mount: `python3 bench/cpu.py [--files N]
[--stats N] [--repeat R]`.

Wall-clock times on a shared machine move by ±30 %; the CPU time the mount's own process
spends (utime + stime from /proc/PID/stat) per operation moves far less, so this is what
tells whether a change made fbmount cheaper. Per repeat it measures:

- create: N files of 4 KiB (open, write, close) and `fbmount sync`, CPU per file;
- cold stat: a fresh mount of the same data, `stat` of the N names, CPU per stat, with the
  S3 requests the mount made for them (`fbmount status --json`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def sent_between(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The requests of each kind sent between two `requests()` readings."""
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def requests(mnt: Path) -> dict[str, int]:
    out = subprocess.run(
        [BIN / "fbmount", "status", "--json", str(mnt)], capture_output=True, text=True
    )
    return json.loads(out.stdout).get("requests", {})


def mount(data: Path, mnt: Path, *extra: str) -> subprocess.Popen:
    """`fbmount --local DATA MNT -f EXTRA...`, once the mount is up."""
    with open(data.parent / "fbmount.log", "a") as log:  # the child keeps its own copy
        proc = subprocess.Popen(
            [BIN / "fbmount", "--local", str(data), str(mnt), "-f", *extra],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    for _ in range(600):
        if os.path.ismount(mnt):
            return proc
        if proc.poll() is not None:
            raise SystemExit(f"fbmount exited with {proc.returncode}")
        time.sleep(0.05)
    raise SystemExit("mount did not come up")


def unmount(mnt: Path, proc: subprocess.Popen) -> None:
    subprocess.run([BIN / "fbmount", "umount", str(mnt)], check=False)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
        proc.kill()
        proc.wait()


def one(files: int, base: Path, run: int) -> dict[str, float]:
    data, mnt = base / f"data{run}", base / f"mnt{run}"
    mnt.mkdir()
    proc = mount(data, mnt)
    try:
        d = mnt / "d"
        d.mkdir()
        (mnt / "warm").write_bytes(b"x")  # the bucket's first write grows its volumes
        subprocess.run([BIN / "fbmount", "sync", str(mnt)], check=True)
        block = os.urandom(4096)
        before_req = requests(mnt)
        c0 = cpu_seconds(proc.pid)
        for i in range(files):
            with open(d / f"f{i:05d}", "wb") as f:
                f.write(block)
        subprocess.run([BIN / "fbmount", "sync", str(mnt)], check=True)
        create_cpu = cpu_seconds(proc.pid) - c0
        after_req = requests(mnt)
    finally:
        unmount(mnt, proc)
    create_req = sent_between(before_req, after_req)
    proc = mount(data, mnt)
    try:
        before_req = requests(mnt)
        c0 = cpu_seconds(proc.pid)
        for i in range(files):
            os.stat(mnt / "d" / f"f{i:05d}")
        stat_cpu = cpu_seconds(proc.pid) - c0
        after_req = requests(mnt)
    finally:
        unmount(mnt, proc)
    stat_req = sent_between(before_req, after_req)
    return {
        "create_ms_per_file": 1000 * create_cpu / files,
        "create_requests": create_req,
        "cold_stat_ms_per_stat": 1000 * stat_cpu / files,
        "cold_stat_requests": stat_req,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="fbmount-cpu-") as tmp:
        for run in range(args.repeat):
            print(json.dumps(one(args.files, Path(tmp), run)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
