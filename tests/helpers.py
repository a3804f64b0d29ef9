"""Small helpers several test modules share: files through the mount, objects in S3,
processes and `fbmount status`. Fixtures live in conftest.py."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

MIB = 1024 * 1024
HANG_BOUND = 60.0  # seconds: a syscall still blocked after this is a hang


# ----- waiting, with a bound (never a timing) ----------------------------------------------
def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """Poll `predicate` until it is true and return its value; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def bounded(fn: Callable[..., Any], *args: Any, timeout: float = HANG_BOUND) -> Any:
    """Run fn(*args) in a thread; fail the test if it is still blocked after `timeout`.

    Returns the result, or the OSError it raised (so callers can check the errno)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args)
        except OSError as e:
            box["error"] = e
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            box["raise"] = e

    worker = threading.Thread(target=run, daemon=True, name=f"bounded-{fn.__name__}")
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        pytest.fail(f"{fn.__name__} still blocked after {timeout:.0f} s: a hang")
    if "raise" in box:
        raise box["raise"]
    return box.get("error", box.get("value"))


# ----- files through the mount -----------------------------------------------------------
def read_file(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_file(path: Path, data: bytes) -> None:
    """Write in 4 MiB calls; an error from close() (a strict-mode upload) is raised."""
    with open(path, "wb") as f:
        view = memoryview(data)
        while view:
            view = view[f.write(view[: 4 * MIB]) :]


def sync_path(path: Path) -> None:
    """fsync(2) through a fresh read-only descriptor: returns once pending data or
    metadata is in S3."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----- objects in S3 (asked directly, around the mount) --------------------------------
def body(s3: Any, bucket: str, key: str) -> bytes | None:
    """The object's bytes, or None when there is no such key."""
    try:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as e:
        if e.response["Error"]["Code"] in ("NoSuchKey", "404"):
            return None
        raise


def exists(s3: Any, bucket: str, key: str) -> bool:
    try:
        s3.head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if e.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
            return False
        raise
    return True


def open_uploads(s3: Any, bucket: str) -> list[dict]:
    return s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


# ----- processes and the control socket --------------------------------------------------
def pid_alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until none of `pids` is alive; returns those still alive after `timeout`."""
    deadline = time.monotonic() + timeout
    alive = [p for p in pids if pid_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if pid_alive(p)]
    return alive


def status_json(
    run_fbmount: Callable[..., subprocess.CompletedProcess[str]], mnt: Path
) -> dict[str, Any]:
    r = run_fbmount("status", str(mnt), "--json", timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def fail_lines(out: str, own_root: Path) -> list[str]:
    """doctor's FAIL lines, minus stale mounts of *other* test runs on this machine (the
    stale-mount check looks at every fbmount mount, not only ours)."""
    lines = []
    for line in out.splitlines():
        if not line.startswith("FAIL"):
            continue
        if line.startswith("FAIL  stale mount: ") and str(own_root) not in line:
            continue
        lines.append(line)
    return lines


def journal_records(staging: Path) -> dict[str, dict]:
    """The entries a staging directory's journal still holds, by id: the newest record of
    each (later in the log on a tie), tombstoned ones left out, as recover() reads them."""
    from fbmount.journal import read_records

    newest: dict[str, dict] = {}
    segments = sorted(staging.glob("journal-*.log"), key=lambda p: int(p.stem.split("-")[1]))
    for path in segments:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            continue  # cleaned meanwhile: its live records were copied forward first
        for _, _, payload, _ in read_records(raw)[0]:
            old = newest.get(payload["id"])
            if old is None or payload["seq"] >= old["seq"]:
                newest[payload["id"]] = payload
    return {sid: r for sid, r in newest.items() if not r.get("gone")}
