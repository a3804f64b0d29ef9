#!/usr/bin/env python3
"""`ls -l` of one big prefix, cold and again: `python3 bench/scale.py [--keys 1000,10000,100000]`.

For each size, N one-byte objects are seeded under `p/` of a `fbmount --local` bucket
(boto3 straight to its SeaweedFS, 32 threads), then a fresh mount with an empty cache dir
times `ls -l MNT/p` three times: cold; warm, at once; and again once `--dir-ttl` (30 s
here) has passed, so the listing is fetched again. Printed per size: seconds, the S3 requests the
mount sent (`fbmount status --json`), the daemon's CPU seconds and its peak RSS (VmHWM).
Time and memory should grow linearly with N; README's Benchmark section has the figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cpu import cpu_seconds, mount, requests, sent_between, unmount  # noqa: E402

DIR_TTL = 30.0


def start(data: Path, mnt: Path, *extra: str) -> subprocess.Popen:
    mnt.mkdir(exist_ok=True)
    return mount(data, mnt, *extra)


def seed(data: Path, n: int) -> None:
    import boto3  # the bench extra

    port = json.loads((data / "seaweedfs" / "ports.json").read_text())["s3"]
    key, secret = (data / "credentials").read_text().strip().split(":", 1)
    s3 = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name="us-east-1",
    )
    with ThreadPoolExecutor(32) as pool:
        list(
            pool.map(
                lambda i: s3.put_object(Bucket="local", Key=f"p/k{i:07d}", Body=b"x"), range(n)
            )
        )


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def timed_ls(path: Path) -> float:
    t0 = time.monotonic()
    subprocess.run(["ls", "-l", str(path)], stdout=subprocess.DEVNULL, check=True)
    return time.monotonic() - t0


def one(n: int, base: Path) -> dict:
    data, mnt = base / f"data{n}", base / f"mnt{n}"
    proc = start(data, mnt)
    try:
        t0 = time.monotonic()
        seed(data, n)
        seeded = time.monotonic() - t0
    finally:
        unmount(mnt, proc)
    proc = start(data, mnt, "--cache-dir", str(base / f"cache{n}"), "--dir-ttl", str(DIR_TTL))
    out: dict = {"keys": n, "seed_s": round(seeded, 1)}
    try:
        for label in ("cold", "warm", "after_ttl"):
            if label == "after_ttl":
                time.sleep(DIR_TTL + 0.5)
            before, c0 = requests(mnt), cpu_seconds(proc.pid)
            out[f"{label}_s"] = round(timed_ls(mnt / "p"), 3)
            out[f"{label}_cpu_s"] = round(cpu_seconds(proc.pid) - c0, 2)
            out[f"{label}_requests"] = sent_between(before, requests(mnt))
        out["peak_rss_mib"] = round(peak_rss_mib(proc.pid), 1)
    finally:
        unmount(mnt, proc)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keys", default="1000,10000,100000", help="comma list of prefix sizes")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="fbmount-scale-") as tmp:
        for n in (int(k) for k in args.keys.split(",")):
            print(json.dumps(one(n, Path(tmp))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
