"""Tiny file-system operations run as child processes of the benchmark.

Each one runs in its own process (``python3 bench/ops.py OP ...``) so the benchmark can kill
it when a mount hangs, and times itself so interpreter start-up is not counted.  It prints
one JSON object on stdout.  Standard library only; importable for the shared helpers.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time

BLOCK = 4096


def offsets(seed: int, count: int, size: int, block: int = BLOCK) -> list[int]:
    """Block-aligned random offsets; the benchmark recomputes them to check the data."""
    rng = random.Random(seed)
    blocks = max(1, size // block)
    return [rng.randrange(blocks) * block for _ in range(count)]


def small_content(index: int, size: int) -> bytes:
    """Deterministic content of small file ``index`` so it can be checked from S3."""
    unit = f"{index:08d}\n".encode()
    return (unit * (size // len(unit) + 1))[:size]


def small_name(index: int) -> str:
    return f"f{index:05d}"


def randread(path: str, count: int, seed: int, size: int) -> dict:
    offs = offsets(seed, count, size)
    digest = hashlib.sha256()
    short = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        start = time.perf_counter()
        for off in offs:
            data = os.pread(fd, BLOCK, off)
            short += len(data) != BLOCK
            digest.update(data)
        seconds = time.perf_counter() - start
    finally:
        os.close(fd)
    return {"seconds": seconds, "ops": count, "sha256": digest.hexdigest(), "short": short}


def create(directory: str, count: int, size: int) -> dict:
    os.makedirs(directory, exist_ok=True)
    start = time.perf_counter()
    for i in range(count):
        with open(os.path.join(directory, small_name(i)), "wb") as f:
            f.write(small_content(i, size))
    return {"seconds": time.perf_counter() - start, "files": count}


def statall(directory: str, count: int, size: int) -> dict:
    sizes: list[int] = []
    start = time.perf_counter()
    for i in range(count):
        try:
            sizes.append(os.stat(os.path.join(directory, small_name(i))).st_size)
        except FileNotFoundError:
            sizes.append(-1)
    seconds = time.perf_counter() - start
    wrong = [
        f"{small_name(i)}:{'missing' if s < 0 else s}" for i, s in enumerate(sizes) if s != size
    ]
    return {"seconds": seconds, "files": count, "wrong": len(wrong), "examples": wrong[:5]}


def main(argv: list[str]) -> int:
    op, args = argv[0], argv[1:]
    if op == "randread":
        out = randread(args[0], int(args[1]), int(args[2]), int(args[3]))
    elif op == "create":
        out = create(args[0], int(args[1]), int(args[2]))
    elif op == "statall":
        out = statall(args[0], int(args[1]), int(args[2]))
    else:
        print(f"unknown op {op}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
