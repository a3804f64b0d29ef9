"""Direct S3 access for the benchmark: buckets, seeding, and checking what reached the server.

Seeding and verification go around the mounts on purpose: the data a tool must read is put
there by a plain client, and what a tool wrote is judged by what the server holds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
from botocore.config import Config as BotoConfig

RCLONE_REMOTE = "bench"
# rclone tuning shared by `rclone mount` and the native client, matching fbmount's defaults
# (8 parallel parts of 8 MiB) so that no tool gets a different amount of concurrency.
RCLONE_S3_FLAGS = ["--s3-upload-concurrency", "8", "--s3-chunk-size", "8M"]


def _drop_expect(request, **_: object) -> None:
    # SeaweedFS sometimes never answers Expect: 100-continue; the header is unsigned.
    if "Expect" in request.headers:
        del request.headers["Expect"]


def client(endpoint: str, access: str, secret: str, pool: int = 32):
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access,
        aws_secret_access_key=secret,
        region_name="us-east-1",
        config=BotoConfig(
            s3={"addressing_style": "path"},
            max_pool_connections=pool,
            retries={"max_attempts": 5, "mode": "standard"},
            connect_timeout=10,
            read_timeout=120,
        ),
    )
    s3.meta.events.register("before-send.s3", _drop_expect)
    return s3


def create_bucket(s3, bucket: str) -> None:
    """Create ``bucket`` and write one small object alone: SeaweedFS grows volumes on the
    first write and parallel writes during that growth can stall."""
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key=".bench-warmup", Body=b"warmup\n")


def put_many(s3, bucket: str, items: Iterable[tuple[str, bytes]], threads: int = 16) -> int:
    """PUT many small objects in parallel threads; returns how many were written."""
    items = list(items)

    def put(item: tuple[str, bytes]) -> None:
        s3.put_object(Bucket=bucket, Key=item[0], Body=item[1])

    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(put, items):
            pass
    return len(items)


def listing(s3, bucket: str, prefix: str) -> dict[str, int]:
    """key -> size of every object under ``prefix`` (directory markers left out)."""
    out: dict[str, int] = {}
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("/"):
                out[obj["Key"]] = obj["Size"]
    return out


def wait_for_count(
    s3, bucket: str, prefix: str, want: int, timeout: float, quiet: float = 0.0
) -> tuple[bool, float, int]:
    """Poll until exactly ``want`` objects are under ``prefix`` (and stayed so ``quiet`` s).

    Returns (reached, seconds waited, last count).
    """
    start = time.monotonic()
    since: float | None = None
    count = -1
    while True:
        count = len(listing(s3, bucket, prefix))
        now = time.monotonic()
        if count == want:
            since = since or now
            if now - since >= quiet:
                return True, now - start, count
        else:
            since = None
        if now - start >= timeout:
            return False, now - start, count
        time.sleep(0.25)


def object_size(s3, bucket: str, key: str) -> int | None:
    try:
        return s3.head_object(Bucket=bucket, Key=key)["ContentLength"]
    except s3.exceptions.ClientError:
        return None


def get_bytes(s3, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def rclone_env(tmp: Path, endpoint: str, access: str, secret: str) -> dict[str, str]:
    """Environment defining the rclone remote ``bench:`` without any config file."""
    conf = tmp / "rclone.conf"
    if not conf.exists():
        conf.write_text("")
    name = RCLONE_REMOTE.upper()
    env = dict(os.environ)
    env.update(
        {
            "RCLONE_CONFIG": str(conf),
            f"RCLONE_CONFIG_{name}_TYPE": "s3",
            f"RCLONE_CONFIG_{name}_PROVIDER": "Other",
            f"RCLONE_CONFIG_{name}_ENDPOINT": endpoint,
            f"RCLONE_CONFIG_{name}_ACCESS_KEY_ID": access,
            f"RCLONE_CONFIG_{name}_SECRET_ACCESS_KEY": secret,
            f"RCLONE_CONFIG_{name}_REGION": "us-east-1",
            f"RCLONE_CONFIG_{name}_FORCE_PATH_STYLE": "true",
        }
    )
    return env
