"""Soak: several processes hammer one mount with random file operations, against a model.

Each worker process owns a subdirectory of the mount and runs seeded random operations —
create, overwrite, write at an offset (also past the end), append, truncate by path and by
fd, rename (also over an existing file, also of a directory), unlink, mkdir, rmdir (also of
a non-empty directory: ENOTEMPTY), read — for a bounded time. After every operation the
paths it touched are checked against an in-memory model of the tree, and every
FULL_CHECK_EVERY operations the whole subtree is. At the end the mount is unmounted (the
flush) and S3 must match the model byte for byte, and so must a fresh mount.

Seeds are fixed (SOAK_SEED, overridable with FBMOUNT_SOAK_SEED) and printed on failure
together with the last operations. The file doubles as the worker program:
``python3 tests/test_soak.py WORKDIR SEED SECONDS`` prints the final model as JSON.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import random
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

SOAK_SEED = 20241125
WORKERS = 3
RUN_SECONDS = 22.0  # per worker; the whole test stays around 45 s
FULL_CHECK_EVERY = 20
NAMES = [f"f{i}" for i in range(6)]
DIRS = [f"d{i}" for i in range(3)]


# --------------------------------------------------------------------------- the worker
class Mismatch(AssertionError):
    pass


class Worker:
    """Random operations in `root`, mirrored in `files` (rel path → bytes) and `dirs`."""

    def __init__(self, root: Path, seed: int) -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.files: dict[str, bytearray] = {}
        self.dirs: set[str] = {""}
        self.history: deque[str] = deque(maxlen=25)
        self.ops = 0

    def p(self, rel: str) -> Path:
        return self.root / rel if rel else self.root

    @staticmethod
    def join(d: str, name: str) -> str:
        return f"{d}/{name}" if d else name

    def data(self) -> bytes:
        size = self.rng.choice([0, 1, 100, 4096, 5000, 65536, 70000, self.rng.randrange(300_000)])
        return self.rng.randbytes(size)

    # ----- checks
    def check_path(self, rel: str) -> None:
        path = self.p(rel)
        if rel in self.files:
            with open(path, "rb") as f:
                got = f.read()
            want = bytes(self.files[rel])
            if got != want:
                first = next(
                    (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                    min(len(got), len(want)),
                )
                raise Mismatch(
                    f"{rel}: {len(got)} bytes read, {len(want)} expected, "
                    f"first difference at {first}"
                )
            if os.stat(path).st_size != len(want):
                raise Mismatch(f"{rel}: st_size {os.stat(path).st_size} != {len(want)}")
        elif rel in self.dirs:
            if not path.is_dir():
                raise Mismatch(f"{rel}: not a directory")
        elif os.path.lexists(path):
            raise Mismatch(f"{rel}: exists but the model says it does not")

    def check_all(self) -> None:
        seen_files, seen_dirs = set(), {""}
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel = os.path.relpath(dirpath, self.root)
            rel = "" if rel == "." else rel
            seen_dirs.update(self.join(rel, d) for d in dirnames)
            seen_files.update(self.join(rel, f) for f in filenames)
        if seen_files != set(self.files) or seen_dirs != self.dirs:
            raise Mismatch(
                f"tree differs: extra files {sorted(seen_files - set(self.files))}, missing "
                f"files {sorted(set(self.files) - seen_files)}, extra dirs "
                f"{sorted(seen_dirs - self.dirs)}, missing dirs {sorted(self.dirs - seen_dirs)}"
            )
        for rel in self.files:
            self.check_path(rel)

    # ----- operations (each returns the paths it touched)
    def op_create(self) -> list[str]:
        rel = self.join(self.rng.choice(sorted(self.dirs)), self.rng.choice(NAMES))
        if rel in self.dirs:
            return []
        data = self.data()
        with open(self.p(rel), "wb") as f:
            f.write(data)
        self.files[rel] = bytearray(data)
        return [rel]

    def _pick_file(self) -> str | None:
        return self.rng.choice(sorted(self.files)) if self.files else None

    def op_write(self) -> list[str]:
        rel = self._pick_file()
        if rel is None:
            return []
        model = self.files[rel]
        off = self.rng.randrange(len(model) + 5000)
        data = self.rng.randbytes(self.rng.choice([1, 10, 4096, 20000]))
        with open(self.p(rel), "r+b") as f:
            f.seek(off)
            f.write(data)
        if off > len(model):
            model.extend(b"\0" * (off - len(model)))
        model[off : off + len(data)] = data
        return [rel]

    def op_append(self) -> list[str]:
        rel = self._pick_file()
        if rel is None:
            return []
        data = self.rng.randbytes(self.rng.choice([1, 333, 8192]))
        with open(self.p(rel), "ab") as f:
            f.write(data)
        self.files[rel] += data
        return [rel]

    def op_truncate(self) -> list[str]:
        rel = self._pick_file()
        if rel is None:
            return []
        model = self.files[rel]
        size = self.rng.randrange(len(model) * 2 + 100)
        if self.rng.random() < 0.5:
            os.truncate(self.p(rel), size)
        else:  # through an open fd, with a write before it that is still unflushed
            with open(self.p(rel), "r+b") as f:
                f.write(b"T")
                model[0:1] = b"T"
                f.flush()
                os.ftruncate(f.fileno(), size)
        if size < len(model):
            del model[size:]
        else:
            model.extend(b"\0" * (size - len(model)))
        return [rel]

    def op_rename(self) -> list[str]:
        src = self._pick_file()
        if src is None:
            return []
        dst = self.join(self.rng.choice(sorted(self.dirs)), self.rng.choice(NAMES))
        if dst == src or dst in self.dirs:
            return []
        os.rename(self.p(src), self.p(dst))
        self.files[dst] = self.files.pop(src)
        return [src, dst]

    def op_unlink(self) -> list[str]:
        rel = self._pick_file()
        if rel is None:
            return []
        os.unlink(self.p(rel))
        del self.files[rel]
        return [rel]

    def op_mkdir(self) -> list[str]:
        parent = self.rng.choice(sorted(d for d in self.dirs if d.count("/") < 1))
        rel = self.join(parent, self.rng.choice(DIRS))
        if rel in self.files:
            return []
        if rel in self.dirs:
            try:
                os.mkdir(self.p(rel))
            except FileExistsError:
                return [rel]
            raise Mismatch(f"mkdir {rel}: succeeded although it exists")
        os.mkdir(self.p(rel))
        self.dirs.add(rel)
        return [rel]

    def _below(self, rel: str) -> list[str]:
        return [p for p in [*self.files, *self.dirs] if p.startswith(rel + "/")]

    def op_rmdir(self) -> list[str]:
        candidates = sorted(self.dirs - {""})
        if not candidates:
            return []
        rel = self.rng.choice(candidates)
        if self._below(rel):
            try:
                os.rmdir(self.p(rel))
            except OSError as e:
                if e.errno != errno.ENOTEMPTY:
                    raise
                return [rel]
            raise Mismatch(f"rmdir {rel}: succeeded although it is not empty")
        os.rmdir(self.p(rel))
        self.dirs.discard(rel)
        return [rel]

    def op_rename_dir(self) -> list[str]:
        candidates = sorted(self.dirs - {""})
        if not candidates:
            return []
        src = self.rng.choice(candidates)
        dst = self.rng.choice(DIRS) + "r"
        if dst in self.dirs or dst in self.files or dst == src:
            return []
        os.rename(self.p(src), self.p(dst))
        moved_files = {k: v for k, v in self.files.items() if k.startswith(src + "/")}
        for k, v in moved_files.items():
            del self.files[k]
            self.files[dst + k[len(src) :]] = v
        moved_dirs = {d for d in self.dirs if d == src or d.startswith(src + "/")}
        self.dirs -= moved_dirs
        self.dirs |= {dst + d[len(src) :] for d in moved_dirs}
        return [src, dst, *(dst + k[len(src) :] for k in moved_files)]

    def op_read(self) -> list[str]:
        rel = self._pick_file()
        return [rel] if rel is not None else []

    OPS = [
        ("create", 20), ("write", 14), ("append", 8), ("truncate", 8), ("rename", 10),
        ("unlink", 8), ("mkdir", 6), ("rmdir", 4), ("rename_dir", 1), ("read", 10),
    ]  # fmt: skip

    def run(self, seconds: float) -> None:
        os.mkdir(self.root)
        names = [n for n, _ in self.OPS]
        weights = [w for _, w in self.OPS]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            name = self.rng.choices(names, weights)[0]
            self.ops += 1
            self.history.append(f"#{self.ops} {name}")
            touched = getattr(self, f"op_{name}")()
            self.history[-1] += f" {touched}"
            for rel in touched:
                self.check_path(rel)
            if self.ops % FULL_CHECK_EVERY == 0:
                self.check_all()
        self.check_all()

    def model(self) -> dict[str, Any]:
        return {
            "ops": self.ops,
            "dirs": sorted(self.dirs),
            "files": {k: base64.b64encode(bytes(v)).decode() for k, v in self.files.items()},
        }


def worker_main(argv: list[str]) -> int:
    root, seed, seconds = Path(argv[0]), int(argv[1]), float(argv[2])
    w = Worker(root, seed)
    try:
        w.run(seconds)
    except (OSError, Mismatch) as e:
        print(
            f"worker {root.name} seed {seed}: operation {w.ops} failed: {e!r}\n"
            "last operations:\n  " + "\n  ".join(w.history),
            file=sys.stderr,
        )
        return 1
    print(json.dumps(w.model()))
    return 0


if __name__ == "__main__":
    raise SystemExit(worker_main(sys.argv[1:]))


# --------------------------------------------------------------------------- the test
import pytest  # noqa: E402 - the worker program above needs nothing but the stdlib
from conftest import MountFactory  # noqa: E402


def tree_of(root: Path) -> tuple[dict[str, bytes], set[str]]:
    files, dirs = {}, set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        prefix = "" if rel == "." else rel + "/"
        dirs.update(prefix + d for d in dirnames)
        for f in filenames:
            files[prefix + f] = (Path(dirpath) / f).read_bytes()
    return files, dirs


@pytest.mark.soak
def test_random_operations_from_several_processes(
    s3: Any, bucket: str, mount: MountFactory, tmp_path: Path
) -> None:
    base_seed = int(os.environ.get("FBMOUNT_SOAK_SEED", SOAK_SEED))
    seeds = {f"w{i}": base_seed + i for i in range(WORKERS)}
    banner = f"soak seeds {seeds} (rerun: FBMOUNT_SOAK_SEED={base_seed})"
    m = mount(bucket, "--upload-delay", "1")
    procs = {
        name: subprocess.Popen(
            [sys.executable, __file__, str(m.path / name), str(seed), str(RUN_SECONDS)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, seed in seeds.items()
    }
    results: dict[str, tuple[int, str, str]] = {}
    try:
        for name, proc in procs.items():
            try:
                out, err = proc.communicate(timeout=RUN_SECONDS + 90)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate(timeout=30)
                err += f"\nworker {name} hung (killed)"
            results[name] = (proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    failures = {n: r[2] for n, r in results.items() if r[0] != 0}
    assert not failures, f"{banner}\n" + "\n".join(failures.values())

    files: dict[str, bytes] = {}
    dirs: set[str] = set()
    for name, (_, out, _) in results.items():
        model = json.loads(out)
        assert model["ops"] > 50, f"{banner}: worker {name} did only {model['ops']} operations"
        files.update({f"{name}/{k}": base64.b64decode(v) for k, v in model["files"].items()})
        dirs.update(f"{name}/{d}" if d else name for d in model["dirs"])
    assert tree_of(m.path) == (files, dirs), banner
    assert "Traceback" not in m.log_text(), banner
    assert m.unmount() == 0, banner

    # S3 holds exactly the model: every file byte for byte, a marker per directory,
    # nothing left of deleted or renamed files.
    keys = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            keys[o["Key"]] = o["Size"]
    file_keys = {k for k in keys if not k.endswith("/")}
    assert file_keys == set(files), (
        f"{banner}: extra {sorted(file_keys - set(files))[:10]}, "
        f"missing {sorted(set(files) - file_keys)[:10]}"
    )
    for key, data in files.items():
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == data, f"{banner}: {key}"
    markers = {k[:-1] for k in keys if k.endswith("/")}
    assert markers <= dirs, f"{banner}: stale directory markers {sorted(markers - dirs)}"

    fresh = mount(bucket, cache_dir=tmp_path / "fresh-cache")
    assert tree_of(fresh.path) == (files, dirs), f"{banner}: a fresh mount sees another tree"
    assert fresh.unmount() == 0
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
