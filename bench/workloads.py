"""The workloads: what each one runs on a mount, how it is timed, and how it is checked.

A workload function gets a live mount, a time budget and ``rec(metric, value, status, note)``.
It raises StepTimeout / StepFailed to abandon the rest of the workload; the runner then marks
every metric it did not record yet.  Data is always checked against the local source or
against what the server holds, never only against what the mount says.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import ops
from bench import s3 as s3u
from bench.common import MB, MIB, Budget, StepFailed, StepTimeout, drop_caches, run
from bench.mounts import Mount

OPS = str(Path(ops.__file__).resolve())
Rec = Callable[..., None]


@dataclass(frozen=True)
class Sizes:
    """Every size the workloads use; ``quick()`` scales them down for a < 5 minute run."""

    big: int = 1024 * MIB  # sequential and random read object
    par_n: int = 4
    par_size: int = 256 * MIB
    write: int = 1024 * MIB
    rand_n: int = 1000
    seed: int = 20240601
    small_n: int = 2000
    small_size: int = 4096
    list_n: int = 10_000
    tree_files: int = 2000
    tree_bytes: int = 100 * MIB
    raw: int = 1024 * MIB
    timeout: float = 600.0  # per workload and tool

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            big=128 * MIB,
            par_size=32 * MIB,
            write=128 * MIB,
            rand_n=300,
            small_n=300,
            list_n=2000,
            tree_files=300,
            tree_bytes=15 * MIB,
            raw=128 * MIB,
            timeout=90.0,
        )


@dataclass(frozen=True)
class Metric:
    key: str
    workload: str
    label: str
    unit: str
    higher_is_better: bool


def metrics_for(z: Sizes) -> list[Metric]:
    def sz(n: int) -> str:
        return f"{n / 1024**3:g} GiB" if n >= 1024**3 else f"{n / MIB:g} MiB"

    return [
        Metric("seqread", "seqread", f"1a seq read {sz(z.big)}, cold, dd bs=1M", "MB/s", True),
        Metric(
            "parread",
            "seqread",
            f"1b {z.par_n} parallel readers, {z.par_n} x {sz(z.par_size)}",
            "MB/s",
            True,
        ),
        Metric("seqwrite", "seqwrite", f"2a seq write {sz(z.write)}, dd conv=fsync", "MB/s", True),
        Metric("seqwrite_s3", "seqwrite", "2b   same, until the object is in S3", "MB/s", True),
        Metric(
            "randread",
            "randread",
            f"3a {z.rand_n} random 4 KiB preads in {sz(z.big)}",
            "ops/s",
            True,
        ),
        Metric("randread_gets", "randread", "3b   GET requests for those reads", "GETs", False),
        Metric("create", "smallfiles", f"4a create {z.small_n} x 4 KiB files", "files/s", True),
        Metric("create_s3", "smallfiles", "4b   same, until all are in S3", "s", False),
        Metric("small_ls", "smallfiles", f"4c ls -l of the {z.small_n} files", "s", False),
        Metric("small_stat", "smallfiles", f"4d stat the {z.small_n} files", "stat/s", True),
        Metric("ls_cold", "listing", f"5a ls -l {z.list_n}-object prefix, cold", "s", False),
        Metric("ls_warm", "listing", "5b   same, warm", "s", False),
        Metric(
            "stat_cold",
            "listing",
            f"5c stat {z.small_n} small files another client wrote, fresh mount",
            "stat/s",
            True,
        ),
        Metric(
            "rsync", "rsync", f"6a rsync -a {z.tree_files} files, {sz(z.tree_bytes)}", "s", False
        ),
        Metric("rsync_sent", "rsync", "6b   rsync bytes sent", "MB", False),
        Metric("rsync_settle", "rsync", "6c   rsync end until all objects in S3", "s", False),
        Metric("rsync2", "rsync", "6d rsync -a re-run (unchanged)", "s", False),
        Metric("rsync2_sent", "rsync", "6e   re-run bytes sent", "MB", False),
        Metric("rm", "rm", f"7  rm -rf of the {z.tree_files}-file tree", "s", False),
        Metric(
            "raw_read", "raw", f"8a native read {sz(z.raw)} (rclone cat, no mount)", "MB/s", True
        ),
        Metric("raw_write", "raw", f"8b native write {sz(z.raw)} (rclone copyto)", "MB/s", True),
    ]


WORKLOADS = ("seqread", "seqwrite", "randread", "smallfiles", "listing", "rsync", "rm", "raw")
WRITE_WORKLOADS = {"seqwrite", "smallfiles", "rsync", "rm"}  # rclone: --vfs-cache-mode writes


@dataclass
class Ctx:
    """Everything the workloads share: the server, the sources, the per-tool buckets."""

    tmp: Path
    sizes: Sizes
    endpoint: str
    access: str
    secret: str
    s3: object
    env: dict[str, str]
    buckets: dict[str, str] = field(default_factory=dict)
    _sources: dict[tuple[str, int], Path] = field(default_factory=dict)

    @property
    def src(self) -> Path:
        return self.tmp / "src"

    def source(self, name: str, size: int) -> Path:
        """A local file of ``size`` random bytes (made once); what tools read and write."""
        key = (name, size)
        if key not in self._sources:
            path = self.src / f"{name}-{size}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                left = size
                while left:
                    chunk = os.urandom(min(left, 8 * MIB))
                    f.write(chunk)
                    left -= len(chunk)
            self._sources[key] = path
        return self._sources[key]

    @property
    def tree(self) -> Path:
        """The rsync source tree: ``tree_files`` files in 100-file directories (made once)."""
        root = self.src / "tree"
        if root.exists():
            return root
        z = self.sizes
        import random

        rng = random.Random(z.seed)
        avg = z.tree_bytes // z.tree_files
        lo = min(1024, avg)
        for i in range(z.tree_files):
            d = root / f"d{i // 100:03d}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"file{i:05d}.dat").write_bytes(os.urandom(rng.randint(lo, 2 * avg - lo)))
        return root

    def tree_listing(self) -> dict[str, int]:
        root = self.tree
        return {
            "tree/" + str(p.relative_to(root)): p.stat().st_size
            for p in root.rglob("*")
            if p.is_file()
        }


# ---------------------------------------------------------------------------- helpers
def _mbps(nbytes: int, seconds: float) -> float:
    return nbytes / MB / max(seconds, 1e-9)


def _cmp(a: Path, b: Path, budget: Budget, mount: Mount | None) -> str:
    """'ok' if the files are byte-identical, else 'bad' (a timeout raises)."""
    res = run(["cmp", str(a), str(b)], budget.step(), on_hang=mount.abort if mount else None)
    res.check("verify (cmp)", ok_codes=(0, 1))
    return "ok" if res.rc == 0 else "bad"


def _ops(op: str, *args: object, budget: Budget, mount: Mount) -> dict:
    res = run([sys.executable, OPS, op, *map(str, args)], budget.step(), on_hang=mount.abort)
    res.check(f"ops {op}")
    return json.loads(res.stdout)


def _ls_count(path: Path, budget: Budget, mount: Mount) -> tuple[float, int]:
    res = run(
        f"ls -l --color=never '{path}' | tail -n +2 | wc -l", budget.step(), on_hang=mount.abort
    )
    res.check("ls -l")
    return res.seconds, int(res.stdout.strip() or 0)


_SENT = re.compile(r"Total bytes sent: ([\d,.]+)")


# ---------------------------------------------------------------------------- seeding
def seed_bucket(ctx: Ctx, bucket: str, workloads: set[str], budget: float) -> None:
    """Put the objects the read workloads need into ``bucket`` with plain clients."""
    z = ctx.sizes
    uploads: list[tuple[Path, str]] = []
    if workloads & {"seqread", "randread"}:
        uploads.append((ctx.source("big", z.big), "big.bin"))
    if "seqread" in workloads:
        uploads += [(ctx.source(f"par{i}", z.par_size), f"par{i}.bin") for i in range(z.par_n)]
    for path, key in uploads:
        run(
            [
                "rclone",
                "copyto",
                str(path),
                f"{s3u.RCLONE_REMOTE}:{bucket}/{key}",
                *s3u.RCLONE_S3_FLAGS,
            ],
            budget,
            env=ctx.env,
        ).check(f"seed {bucket}/{key}")
    if "listing" in workloads:
        body = b"x" * 256
        s3u.put_many(ctx.s3, bucket, ((f"list/o{i:05d}", body) for i in range(z.list_n)))
        # Under 4,096 bytes, so a mount cannot tell them from symlinks without their headers.
        names = (f"stat/{ops.small_name(i)}" for i in range(z.small_n))
        s3u.put_many(ctx.s3, bucket, ((key, body) for key in names))


# ---------------------------------------------------------------------------- workloads
def w_seqread(ctx: Ctx, m: Mount, b: Budget, rec: Rec) -> None:
    z = ctx.sizes
    f = m.mnt / "big.bin"
    drop_caches()
    res = run(["dd", f"if={f}", "of=/dev/null", "bs=1M"], b.step(), on_hang=m.abort)
    res.check("dd read")
    status = _cmp(f, ctx.source("big", z.big), b, m)
    rec("seqread", _mbps(z.big, res.seconds), status)

    files = [m.mnt / f"par{i}.bin" for i in range(z.par_n)]
    drop_caches()
    script = (
        'pids=(); for f in "$@"; do dd if="$f" of=/dev/null bs=1M status=none & pids+=($!); '
        'done; rc=0; for p in "${pids[@]}"; do wait $p || rc=1; done; exit $rc'
    )
    res = run(["bash", "-c", script, "par", *map(str, files)], b.step(), on_hang=m.abort)
    res.check("parallel dd read")
    status = "ok"
    for i, f in enumerate(files):
        if _cmp(f, ctx.source(f"par{i}", z.par_size), b, m) != "ok":
            status = "bad"
    rec("parread", _mbps(z.par_n * z.par_size, res.seconds), status)


def w_seqwrite(ctx: Ctx, m: Mount, b: Budget, rec: Rec) -> None:
    z = ctx.sizes
    src = ctx.source("big", z.write)
    run(["cat", str(src)], b.step(), stdout_path=Path("/dev/null"))  # warm the source
    key = "write.bin"
    start = time.monotonic()
    res = run(
        ["dd", f"if={src}", f"of={m.mnt / key}", "bs=1M", "conv=fsync"], b.step(), on_hang=m.abort
    )
    res.check("dd write")
    rec("seqwrite", _mbps(z.write, res.seconds), "ok")
    while s3u.object_size(ctx.s3, m.bucket, key) != z.write:
        if b.left() <= 0:
            raise StepTimeout("object not in S3 within the budget", time.monotonic() - start)
        time.sleep(0.1)
    in_s3 = time.monotonic() - start
    check = run(
        f"rclone cat '{s3u.RCLONE_REMOTE}:{m.bucket}/{key}' | cmp - '{src}'", b.step(), env=ctx.env
    )
    check.check("verify write via rclone cat", ok_codes=(0, 1))
    rec("seqwrite_s3", _mbps(z.write, in_s3), "ok" if check.rc == 0 else "bad")


def w_randread(ctx: Ctx, m: Mount, b: Budget, rec: Rec, metric: str = "randread") -> dict:
    z = ctx.sizes
    drop_caches()
    out = _ops("randread", m.mnt / "big.bin", z.rand_n, z.seed, z.big, budget=b, mount=m)
    expect = hashlib.sha256()
    with open(ctx.source("big", z.big), "rb") as f:
        for off in ops.offsets(z.seed, z.rand_n, z.big):
            expect.update(os.pread(f.fileno(), ops.BLOCK, off))
    status = "ok" if out["sha256"] == expect.hexdigest() and not out["short"] else "bad"
    if metric:
        rec(metric, z.rand_n / max(out["seconds"], 1e-9), status)
    return out | {"status": status}


def w_smallfiles(ctx: Ctx, m: Mount, b: Budget, rec: Rec) -> None:
    z = ctx.sizes
    d = m.mnt / "small"
    start = time.monotonic()
    out = _ops("create", d, z.small_n, z.small_size, budget=b, mount=m)
    rec("create", z.small_n / out["seconds"], "ok")
    reached, _, count = s3u.wait_for_count(ctx.s3, m.bucket, "small/", z.small_n, b.step())
    if not reached:
        seconds = time.monotonic() - start
        rec("create_s3", seconds, "timeout", f"{count}/{z.small_n} objects in S3 when cut off")
    else:
        sample = range(0, z.small_n, max(1, z.small_n // 7))
        good = all(
            s3u.get_bytes(ctx.s3, m.bucket, f"small/{ops.small_name(i)}")
            == ops.small_content(i, z.small_size)
            for i in sample
        )
        rec("create_s3", time.monotonic() - start, "ok" if good else "bad")
    seconds, count = _ls_count(d, b, m)
    good = count == z.small_n
    rec("small_ls", seconds, "ok" if good else "bad", "" if good else f"{count} entries")
    out = _ops("statall", d, z.small_n, z.small_size, budget=b, mount=m)
    note = f"{out['wrong']} wrong, e.g. {' '.join(out['examples'])}" if out["wrong"] else ""
    rec("small_stat", z.small_n / out["seconds"], "bad" if out["wrong"] else "ok", note)


def w_listing(ctx: Ctx, m: Mount, b: Budget, rec: Rec) -> None:
    z = ctx.sizes
    # First, while the mount knows nothing: `stat` by name (rsync, tar, a backup's check).
    out = _ops("statall", m.mnt / "stat", z.small_n, 256, budget=b, mount=m)
    note = f"{out['wrong']} wrong, e.g. {' '.join(out['examples'])}" if out["wrong"] else ""
    rec("stat_cold", z.small_n / out["seconds"], "bad" if out["wrong"] else "ok", note)
    for metric in ("ls_cold", "ls_warm"):
        seconds, count = _ls_count(m.mnt / "list", b, m)
        good = count == z.list_n
        rec(metric, seconds, "ok" if good else "bad", "" if good else f"{count} entries")


def _rsync(ctx: Ctx, m: Mount, b: Budget) -> tuple[float, float, int]:
    res = run(
        ["rsync", "-a", "--stats", f"{ctx.tree}/", f"{m.mnt}/tree/"], b.step(), on_hang=m.abort
    )
    # 23/24: some attributes could not be set / files vanished; the data is checked below.
    res.check("rsync", ok_codes=(0, 23, 24))
    sent = _SENT.search(res.stdout)
    nbytes = float(sent.group(1).replace(",", "")) if sent else float("nan")
    return res.seconds, nbytes, res.rc or 0


def _settle_tree(ctx: Ctx, m: Mount, b: Budget, want: int, since: float) -> tuple[bool, float]:
    """Wait until the server holds ``want`` objects under tree/ (returns how long after
    ``since`` that was), then until at least 5 s have passed since ``since`` and the count
    held for 1 s: fbmount and rclone upload after a settle delay, and a re-run must not
    race their pending metadata updates."""
    reached, _, _ = s3u.wait_for_count(ctx.s3, m.bucket, "tree/", want, b.step())
    at = time.monotonic() - since
    if reached:
        s3u.wait_for_count(ctx.s3, m.bucket, "tree/", want, b.step(), quiet=1.0)
    rest = 5.0 - (time.monotonic() - since)
    if rest > 0:
        time.sleep(min(rest, max(0.0, b.left())))
    return reached, at


def w_rsync(ctx: Ctx, m: Mount, b: Budget, rec: Rec) -> None:
    expect = ctx.tree_listing()
    seconds, sent, rc = _rsync(ctx, m, b)
    note = f"rsync exit {rc}" if rc else ""
    rec("rsync", seconds, "ok", note)
    rec("rsync_sent", sent / MB, "ok")
    reached, settle = _settle_tree(ctx, m, b, len(expect), time.monotonic())
    got = s3u.listing(ctx.s3, m.bucket, "tree/")
    status = "ok" if got == expect else "bad"
    rec(
        "rsync_settle",
        settle,
        status if reached else "timeout",
        "" if status == "ok" else f"{len(got)}/{len(expect)} objects match in count",
    )
    seconds, sent, rc = _rsync(ctx, m, b)
    rec("rsync2", seconds, "ok", f"rsync exit {rc}" if rc else "")
    rec("rsync2_sent", sent / MB, "ok")


def w_rm(ctx: Ctx, m: Mount, b: Budget, rec: Rec) -> None:
    res = run(["rm", "-rf", str(m.mnt / "tree")], b.step(), on_hang=m.abort)
    res.check("rm -rf")
    reached, _, count = s3u.wait_for_count(ctx.s3, m.bucket, "tree/", 0, min(b.step(), 60))
    rec("rm", res.seconds, "ok" if reached else "bad", "" if reached else f"{count} objects left")


def prepare_rm(ctx: Ctx, m: Mount, b: Budget) -> None:
    """When rm runs without the rsync workload, put the tree there first (untimed)."""
    if s3u.listing(ctx.s3, m.bucket, "tree/"):
        return
    _rsync(ctx, m, b)
    _settle_tree(ctx, m, b, len(ctx.tree_listing()), time.monotonic())


def w_raw(ctx: Ctx, bucket: str, b: Budget, rec: Rec, env: dict[str, str] | None = None) -> None:
    """The ceiling: rclone as a plain S3 client against the same server, no FUSE.  The
    timed commands use ``env`` (a far link's endpoint, say); the check goes direct."""
    z = ctx.sizes
    env = env or ctx.env
    src = ctx.source("big", z.raw)
    run(["cat", str(src)], b.step(), stdout_path=Path("/dev/null"))
    remote = f"{s3u.RCLONE_REMOTE}:{bucket}/raw.bin"
    res = run(["rclone", "copyto", str(src), remote, *s3u.RCLONE_S3_FLAGS], b.step(), env=env)
    res.check("rclone copyto")
    rec("raw_write", _mbps(z.raw, res.seconds), "ok")
    res = run(["rclone", "cat", remote], b.step(), env=env, stdout_path=Path("/dev/null"))
    res.check("rclone cat")
    check = run(f"rclone cat '{remote}' | cmp - '{src}'", b.step(), env=ctx.env)
    check.check("verify raw via rclone cat", ok_codes=(0, 1))
    rec("raw_read", _mbps(z.raw, res.seconds), "ok" if check.rc == 0 else "bad")


WORKLOAD_FUNCS: dict[str, Callable[[Ctx, Mount, Budget, Rec], object]] = {
    "seqread": w_seqread,
    "seqwrite": w_seqwrite,
    "randread": w_randread,
    "smallfiles": w_smallfiles,
    "listing": w_listing,
    "rsync": w_rsync,
    "rm": w_rm,
}


def describe_failure(exc: BaseException) -> str:
    if isinstance(exc, StepFailed):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
