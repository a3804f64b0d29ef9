"""Whole-account mount costs: listing the top, opening a bucket, creating/deleting one.

    python3 bench/account.py [--buckets 50] [--repeat 3]

Starts a private SeaweedFS with identities (without them it lists no buckets), creates N
buckets, mounts the account, and times each step with the S3 requests it made (from
`fbmount status --json`). Median of --repeat fresh mounts. Prints one table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.s3 import client  # noqa: E402
from fbmount.localserver import LocalS3Server  # noqa: E402

KEY, SECRET = "benchkey", "benchsecret0123456789"


def fbmount(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET)
    env["PYTHONPATH"] = str(HERE.parent)
    return subprocess.run(
        [sys.executable, "-m", "fbmount", *args], env=env, capture_output=True, text=True
    )


def requests(mnt: Path) -> Counter[str]:
    return Counter(json.loads(fbmount("status", str(mnt), "--json").stdout)["requests"])


def one_run(endpoint: str, work: Path, n: int) -> dict[str, tuple[float, Counter[str]]]:
    mnt, out = work / "mnt", {}
    mnt.mkdir()
    r = fbmount(str(mnt), "--endpoint", endpoint, "--cache-dir", str(work / "cache"))
    if r.returncode:
        raise SystemExit(r.stderr)
    steps = {
        f"ls -l of the top ({n} buckets)": lambda: subprocess.run(
            ["ls", "-l", str(mnt)], capture_output=True, check=True
        ),
        "ls -l again (cached)": lambda: subprocess.run(
            ["ls", "-l", str(mnt)], capture_output=True, check=True
        ),
        "first ls of a bucket (loads it)": lambda: os.listdir(mnt / "bench-000"),
        "mkdir (CreateBucket)": lambda: (mnt / "bench-new").mkdir(),
        "rmdir (DeleteBucket)": lambda: (mnt / "bench-new").rmdir(),
    }
    try:
        for name, step in steps.items():
            before = requests(mnt)
            t = time.perf_counter()
            step()
            seconds = time.perf_counter() - t
            out[name] = (seconds, requests(mnt) - before)
    finally:
        fbmount("umount", str(mnt))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--buckets", type=int, default=50)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="fbmount-bench-account-") as tmp,
        LocalS3Server(Path(tmp) / "weed", identities={KEY: SECRET}, stop_timeout=2) as srv,
    ):
        s3 = client(srv.endpoint, KEY, SECRET)
        for i in range(args.buckets):
            s3.create_bucket(Bucket=f"bench-{i:03d}")
        s3.put_object(Bucket="bench-000", Key="a.txt", Body=b"x")
        runs = [
            one_run(srv.endpoint, Path(tempfile.mkdtemp(dir=tmp)), args.buckets)
            for _ in range(args.repeat)
        ]
    print(f"{'step':36} | {'median ms':>9} | requests")
    for name in runs[0]:
        ms = statistics.median(run[name][0] for run in runs) * 1000
        reqs = ", ".join(f"{k} {v}" for k, v in sorted(runs[-1][name][1].items())) or "none"
        print(f"{name:36} | {ms:9.1f} | {reqs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
