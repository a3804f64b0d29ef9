"""S3 requests of `rsync -a` into each mount, counted at a proxy (issue: rsync, one PUT per file).

    python3 bench/rsync_requests.py [--files 2000] [--only fbmount,s3fs,rclone]

Starts a private SeaweedFS, puts the counting proxy of the test suite (tests/faultproxy.py)
in front of it, and for each tool: mounts it through the proxy, runs `rsync -a --stats` of
a tree of N small files, waits until everything is on the server, records the requests by
kind; then the unchanged re-run, and its requests and bytes sent. Prints one table.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

from faultproxy import FaultProxy  # noqa: E402

from bench.mounts import MOUNTS  # noqa: E402
from bench.s3 import client, create_bucket, rclone_env  # noqa: E402
from fbmount.localserver import LocalS3Server  # noqa: E402


def make_tree(root: Path, files: int) -> None:
    for i in range(files):
        d = root / f"d{i % 20:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05d}.txt").write_bytes(os.urandom(1024 + i % 4096))


def settle(proxy: FaultProxy, mnt: Path, tool: str) -> None:
    """Until the tool has nothing left to send (fbmount: its sync command)."""
    if tool == "fbmount":
        subprocess.run(
            [sys.executable, "-m", "fbmount", "sync", str(mnt)],
            check=True,
            capture_output=True,
            timeout=600,
        )
    deadline = time.monotonic() + 120
    last, quiet_since = proxy.total, time.monotonic()
    while time.monotonic() < deadline:  # rclone uploads ~5 s after close
        time.sleep(0.5)
        if proxy.total != last:
            last, quiet_since = proxy.total, time.monotonic()
        elif time.monotonic() - quiet_since > 8:
            return


def rsync(src: Path, dst: Path) -> tuple[float, int]:
    t = time.monotonic()
    out = subprocess.run(
        ["rsync", "-a", "--stats", f"{src}/", f"{dst}/"],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    sent = re.search(r"Total bytes sent: ([\d,]+)", out.stdout)
    return time.monotonic() - t, int(sent.group(1).replace(",", "")) if sent else -1


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--only", default="fbmount,s3fs,rclone")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fbmount-rsyncreq-"))
    server = LocalS3Server(tmp / "s3", stop_timeout=5.0)
    server.start()
    rows = []
    try:
        s3 = client(server.endpoint, server.access_key, server.secret_key)
        src = tmp / "src"
        make_tree(src, args.files)
        for tool in args.only.split(","):
            bucket = f"rsync-{tool}"
            create_bucket(s3, bucket)
            s3.put_object(Bucket=bucket, Key="warm", Body=b"x")
            s3.delete_object(Bucket=bucket, Key="warm")
            with FaultProxy(server.endpoint) as proxy:
                env = rclone_env(tmp, proxy.endpoint, server.access_key, server.secret_key)
                env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"] = (
                    server.access_key,
                    server.secret_key,
                )
                mount = MOUNTS[tool](
                    env, proxy.endpoint, bucket, tmp / f"mnt-{tool}", tmp / f"work-{tool}", "write"
                )
                mount.start()
                try:
                    proxy.reset()
                    secs, _ = rsync(src, mount.mnt / "dst")
                    settle(proxy, mount.mnt, tool)
                    first = dict(proxy.counts)
                    proxy.reset()
                    secs2, sent2 = rsync(src, mount.mnt / "dst")
                    settle(proxy, mount.mnt, tool)
                    second = dict(proxy.counts)
                finally:
                    mount.stop()
            rows.append((tool, secs, first, secs2, sent2, second))
    finally:
        server.stop()
    n = args.files
    print(f"rsync -a of {n} files (1-5 KiB, 20 directories), requests counted at a proxy\n")
    print(
        f"{'tool':8} | {'1st run s':>9} | {'requests':>8} | {'per file':>8} | "
        f"{'PUT':>5} | {'COPY':>5} | {'HEAD':>5} | {'LIST':>5} | {'DELETE':>6} | "
        f"{'re-run s':>8} | {'re-run req':>10} | {'re-run bytes sent':>17}"
    )
    for tool, secs, first, secs2, sent2, second in rows:
        total = sum(first.values())
        deletes = first.get("DeleteObject", 0) + first.get("DeleteObjects", 0)
        print(
            f"{tool:8} | {secs:9.1f} | {total:8} | {total / n:8.2f} | "
            f"{first.get('PutObject', 0):5} | {first.get('CopyObject', 0):5} | "
            f"{first.get('HeadObject', 0):5} | {first.get('ListObjects', 0):5} | "
            f"{deletes:6} | {secs2:8.2f} | {sum(second.values()):10} | {sent2:17,}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
