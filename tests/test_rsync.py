"""rsync, cp -a and tar into a real mount, with every S3 request counted.

The peers' failures this guards against (docs: /work/shared/FIELD-NOTES.md): s3fs turned
rsync's temp-file + rename + chmod + utime into ~30 requests per file and still made 410
requests on an unchanged re-run; `cp -a` lost directory times; rsync exited 23 on
directory permissions. fbmount stages the file locally, applies rename/chmod/utime there,
and uploads once: one PutObject per file, no CopyObject, no multipart.

The measured request counts are printed (run with ``-s`` to see them) for the README.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import stat
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Mount, MountFactory
from faultproxy import FaultProxy
from helpers import journal_records

N_FILES = 300  # files in the rsync tree
FILES_PER_DIR = 50
BASE_MTIME_NS = 1_600_000_000 * 1_000_000_000  # 2020-09-13, far from "now"
FILE_MODES = (0o644, 0o600, 0o755, 0o640, 0o444)
MULTIPART_KINDS = (
    "CreateMultipartUpload",
    "UploadPart",
    "UploadPartCopy",
    "CompleteMultipartUpload",
    "AbortMultipartUpload",
)
Run = Callable[..., subprocess.CompletedProcess[str]]
SETTLE_TIMEOUT = 60.0  # seconds for staged uploads to reach S3 (bound, not an assertion)


# --------------------------------------------------------------------------- helpers
def file_bytes(i: int) -> bytes:
    """Deterministic content of varied small sizes (one empty file)."""
    if i == 0:
        return b""
    seed = hashlib.sha256(str(i).encode()).digest()
    return (seed * 200)[: 16 + (i * 37) % 6000]


def make_tree(root: Path, n: int, symlink: bool = True) -> dict[str, Path]:
    """N small files spread over a few directories (one nested), varied modes and
    nanosecond mtimes, plus a symlink; directory modes/times are set last. Returns
    relative path → source path of every regular file."""
    files: dict[str, Path] = {}
    ndirs = max(1, (n + FILES_PER_DIR - 1) // FILES_PER_DIR)
    dirs = [f"d{j:02d}" for j in range(ndirs)]
    dirs.append("d00/nested")
    for d in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rel = f"{dirs[i % len(dirs)]}/f{i:04d}.bin"
        path = root / rel
        path.write_bytes(file_bytes(i))
        os.chmod(path, FILE_MODES[i % len(FILE_MODES)])
        mtime = BASE_MTIME_NS + i * 7_000_000_123
        os.utime(path, ns=(mtime, mtime))
        files[rel] = path
    if symlink:
        os.symlink("f0000.bin", root / "d00" / "link-to-f0000")
    for j, d in enumerate(sorted(dirs, key=len, reverse=True) + ["."]):
        path = root / d
        os.chmod(path, 0o750 if j % 2 else 0o755)
        t = BASE_MTIME_NS - (j + 1) * 86_400_000_000_000
        os.utime(path, ns=(t, t))
    return files


def run(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{args[0]} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def staging_dir(m: Mount) -> Path:
    dirs = list(m.cache_dir.glob("*/staging"))
    assert len(dirs) == 1, f"expected one staging dir under {m.cache_dir}: {dirs}"
    return dirs[0]


def wait_settled(
    m: Mount, run_fbmount: Run, proxy: FaultProxy | None = None, timeout: float = SETTLE_TIMEOUT
):
    """Wait until nothing is staged any more (every journal record uploaded and removed by
    the write-back itself), then `fbmount sync` (returns once everything, queued deletes
    included, is in S3), then until no request is in flight at the proxy."""
    staging = staging_dir(m)
    deadline = time.monotonic() + timeout
    while journal_records(staging):
        if time.monotonic() > deadline:
            left = sorted(p.name for p in staging.iterdir())
            pytest.fail(f"uploads did not settle in {timeout:.0f} s; staged: {left[:10]}")
        time.sleep(0.1)
    r = run_fbmount("sync", str(m.path), timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    if proxy is not None:
        assert proxy.wait_idle(timeout=30)


def summarize(proxy: FaultProxy, bucket: str) -> dict[str, Any]:
    """Counts by kind, and PUTs split into file objects and directory markers."""
    log = list(proxy.log)
    kinds = Counter(e.kind for e in log)
    puts = [e.path[len(bucket) + 2 :] for e in log if e.kind == "PutObject"]
    return {
        "kinds": dict(kinds),
        "total": len(log),
        "file_puts": Counter(k for k in puts if not k.endswith("/")),
        "marker_puts": Counter(k for k in puts if k.endswith("/")),
        "errors": [e for e in log if e.status >= 400 and e.kind != "HeadObject"],
    }


def report(label: str, summary: dict[str, Any], n: int) -> None:
    kinds = ", ".join(f"{k}={v}" for k, v in sorted(summary["kinds"].items()))
    print(
        f"\n[rsync counts] {label}: total={summary['total']} ({summary['total'] / n:.2f}/file) "
        f"{kinds}; file PUTs={sum(summary['file_puts'].values())}, "
        f"marker PUTs={sum(summary['marker_puts'].values())}"
    )


def s3_meta_ns(value: str) -> int:
    """s3fs time header ("sec" or "sec.nnnnnnnnn") → ns, parsed independently of fbmount."""
    sec, _, frac = value.partition(".")
    return int(sec) * 1_000_000_000 + int(frac.ljust(9, "0")[:9] or 0)


def check_files_in_s3(s3: Any, bucket: str, prefix: str, files: dict[str, Path]) -> None:
    """Every file's bytes, s3fs mode and mtime are right in S3; nothing else is there."""
    keys = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.update(o["Key"] for o in page.get("Contents", []))
    file_keys = {k for k in keys if not k.endswith("/")}
    expected = {prefix + rel for rel in files}
    stray = file_keys - expected - {k for k in file_keys if "link-to-" in k}
    assert not stray, f"unexpected objects (temp files?): {sorted(stray)[:10]}"
    missing = expected - file_keys
    assert not missing, f"missing in S3: {sorted(missing)[:10]}"
    for rel, src in files.items():
        obj = s3.get_object(Bucket=bucket, Key=prefix + rel)
        assert obj["Body"].read() == src.read_bytes(), rel
        st = src.stat()
        md = obj["Metadata"]
        assert int(md["mode"]) == st.st_mode, (rel, md)
        assert s3_meta_ns(md["mtime"]) == st.st_mtime_ns, (rel, md)


def check_files_in_mount(dst: Path, files: dict[str, Path]) -> None:
    for rel, src in files.items():
        a, b = (dst / rel).stat(), src.stat()
        assert stat.S_IMODE(a.st_mode) == stat.S_IMODE(b.st_mode), rel
        assert a.st_mtime_ns == b.st_mtime_ns, rel
        assert a.st_size == b.st_size, rel


def wait_group_gone(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Wait for every process of ``proc``'s process group (ours) to exit; kill on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is None and time.monotonic() > deadline:
            proc.kill()
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.1)
    proc.wait(timeout=10)


def rsync_stats(out: str) -> tuple[int, int]:
    """(Literal data, Total transferred file size) from ``rsync --stats``."""
    nums = {}
    for name in ("Literal data", "Total transferred file size"):
        m = re.search(rf"^{name}: ([\d,.]+)", out, re.M)
        assert m is not None, f"no {name!r} in rsync output:\n{out}"
        nums[name] = int(m.group(1).replace(",", "").replace(".", ""))
    return nums["Literal data"], nums["Total transferred file size"]


# --------------------------------------------------------------------------- tests
def test_rsync_tree_one_put_per_file(
    s3: Any,
    s3_endpoint: str,
    bucket: str,
    mount: MountFactory,
    tmp_path: Path,
    run_fbmount: Run,
) -> None:
    """rsync -a of N files: 1 PUT each, 0 COPY, 0 multipart; re-runs (same mount, fresh
    mount with the same cache dir, fresh mount with an empty cache dir) transfer 0 bytes
    and PUT nothing."""
    n = N_FILES
    src = tmp_path / "src"
    # Regular files only: a symlink whose time rsync preserves costs PUT + CopyObject
    # (its utime is a metadata-only change of an uploaded object); see test_cp_a_and_tar_x.
    files = make_tree(src, n, symlink=False)
    ndirs = sum(1 for p in src.rglob("*") if p.is_dir()) + 1  # + the destination root
    with FaultProxy(s3_endpoint) as proxy:
        m = mount(bucket, "--endpoint", proxy.endpoint)
        assert proxy.wait_idle()
        proxy.reset()
        dst = m.path / "tree"
        run("rsync", "-a", f"{src}/", f"{dst}/")
        wait_settled(m, run_fbmount, proxy)
        first = summarize(proxy, bucket)
        report(f"first rsync -a of {n} files", first, n)
        assert not proxy.errors
        assert not first["errors"], first["errors"][:5]
        assert set(first["file_puts"]) == {f"tree/{rel}" for rel in files}
        assert max(first["file_puts"].values()) == 1, "a file was uploaded twice"
        assert first["kinds"].get("CopyObject", 0) == 0, proxy.paths("CopyObject")
        assert first["kinds"].get("DeleteObject", 0) == 0  # no temp file ever reached S3
        for kind in MULTIPART_KINDS:
            assert first["kinds"].get(kind, 0) == 0, kind
        # mkdir makes one marker each; rsync's later chmod/utime of a directory may
        # rewrite it (its metadata lives on the marker).
        assert set(first["marker_puts"]) == {
            "tree/" + str(p.relative_to(src)) + "/" for p in src.rglob("*") if p.is_dir()
        } | {"tree/"}
        assert sum(first["marker_puts"].values()) <= 3 * ndirs
        check_files_in_s3(s3, bucket, "tree/", files)
        check_files_in_mount(dst, files)

        # The unchanged tree again, same mount: nothing to send, nothing to write.
        proxy.reset()
        out = run("rsync", "-a", "--stats", f"{src}/", f"{dst}/").stdout
        assert rsync_stats(out) == (0, 0), out
        wait_settled(m, run_fbmount, proxy)
        again = summarize(proxy, bucket)
        report("re-run, same mount", again, n)
        # README: at most one LIST per directory whose cached listing expired, nothing else.
        lists_allowed = ndirs  # ndirs counts tree/ and its subdirectories; + the mount root
        lists = again["kinds"].get("ListObjects", 0)
        assert lists <= lists_allowed + 1, again
        assert not again["file_puts"], again["file_puts"]
        # A directory re-listed from S3 loses the mode/mtime its marker should carry
        # (SeaweedFS strips marker metadata), so rsync may set them again: at most a chmod
        # and a utime per directory re-listed, none while every listing is cached.
        markers = sum(again["marker_puts"].values())
        assert markers <= 2 * lists, again
        assert again["total"] == lists + markers, again["kinds"]
        assert m.unmount() == 0

        # Fresh processes: with the same cache dir (persistent metadata index), then
        # with an empty one (metadata from HEADs).
        # README: the persistent index makes a re-run cost one LIST per directory and no
        # HEAD per file (a lookup of a directory not listed yet may HEAD it: one per
        # directory). With an empty cache dir each file's metadata costs one HEAD, which
        # fills the index, so the run after that is back to no HEAD per file.
        for label, cache_dir, heads_per_file in (
            ("re-run, fresh mount, same cache dir", m.cache_dir, 0),
            ("re-run, fresh mount, empty cache dir", tmp_path / "empty-cache", 1),
            ("re-run, fresh mount, cache dir the HEADs filled", tmp_path / "empty-cache", 0),
        ):
            m2 = mount(bucket, "--endpoint", proxy.endpoint, cache_dir=cache_dir)
            assert proxy.wait_idle()
            proxy.reset()
            out = run("rsync", "-a", "--stats", f"{src}/", f"{m2.path}/tree/").stdout
            literal, transferred = rsync_stats(out)
            wait_settled(m2, run_fbmount, proxy)
            fresh = summarize(proxy, bucket)
            report(label, fresh, n)
            assert (literal, transferred) == (0, 0), out
            assert not fresh["file_puts"], fresh["file_puts"]
            assert fresh["kinds"].get("CopyObject", 0) == 0
            # Directory mode/mtime live on the "dir/" markers, which SeaweedFS strips (and
            # fbmount does not read back yet), so rsync resets them: at most a chmod and a
            # utime per directory.
            assert sum(fresh["marker_puts"].values()) <= 2 * ndirs, fresh["marker_puts"]
            kinds = fresh["kinds"]
            assert kinds.get("ListObjects", 0) <= lists_allowed + 1, kinds
            assert kinds.get("HeadObject", 0) <= heads_per_file * n + ndirs + 1, kinds
            others = fresh["total"] - kinds.get("ListObjects", 0) - kinds.get("HeadObject", 0)
            assert others == sum(fresh["marker_puts"].values()), kinds
            check_files_in_mount(m2.path / "tree", files)
            assert m2.unmount() == 0


def test_rsync_inplace_delete_partial(
    s3: Any, bucket: str, mount: MountFactory, tmp_path: Path, run_fbmount: Run
) -> None:
    """--inplace rewrites in place, --delete removes from S3, --partial keeps an
    interrupted file and the next run completes it."""
    src = tmp_path / "src"
    files = make_tree(src, 20)
    m = mount(bucket)
    dst = m.path / "t"
    run("rsync", "-a", f"{src}/", f"{dst}/")

    # --inplace: change one file (same size and a longer one), rsync writes into the target.
    changed = files["d00/f0002.bin"]
    changed.write_bytes(changed.read_bytes()[::-1])
    grown = files["d00/nested/f0003.bin"]
    grown.write_bytes(grown.read_bytes() * 3)
    os.utime(changed, ns=(BASE_MTIME_NS, BASE_MTIME_NS))
    run("rsync", "-a", "--inplace", f"{src}/", f"{dst}/")
    assert (dst / "d00/f0002.bin").read_bytes() == changed.read_bytes()
    assert (dst / "d00/nested/f0003.bin").read_bytes() == grown.read_bytes()

    # --delete: files gone from the source go from the bucket.
    gone = files.pop("d00/f0004.bin")
    gone.unlink()
    run("rsync", "-a", "--delete", f"{src}/", f"{dst}/")
    assert not (dst / "d00/f0004.bin").exists()
    wait_settled(m, run_fbmount)
    check_files_in_s3(s3, bucket, "t/", files)
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix="t/d00/f0004.bin")

    # --partial: interrupt a slow transfer, the partial file stays under its final name.
    big = tmp_path / "big" / "big.bin"
    big.parent.mkdir()
    big.write_bytes(os.urandom(6 * 1024 * 1024))
    target = m.path / "partial" / "big.bin"
    proc = subprocess.Popen(
        ["rsync", "-a", "--partial", "--bwlimit=2000", f"{big.parent}/", f"{target.parent}/"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, interrupted like a terminal ^C
    )
    try:
        deadline = time.monotonic() + 20
        # Wait until rsync has sent some data into its temp file, then interrupt it.
        while time.monotonic() < deadline and proc.poll() is None:
            temps = list(target.parent.glob(".big.bin.*")) if target.parent.exists() else []
            if temps and temps[0].stat().st_size > 1024 * 1024:
                break
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        # rsync's generator/receiver children linger a few seconds after an interrupt,
        # with their cwd in the mount (which would make the unmount EBUSY): wait for the
        # whole group, which only this test started.
        wait_group_gone(proc)
    assert proc.returncode != 0, "rsync finished before it could be interrupted"
    kept = target.stat().st_size
    assert 0 < kept < big.stat().st_size, kept
    assert target.read_bytes() == big.read_bytes()[:kept]
    run("rsync", "-a", "--partial", f"{big.parent}/", f"{target.parent}/")
    assert target.read_bytes() == big.read_bytes()
    assert not list(target.parent.glob(".big.bin.*"))
    assert m.unmount() == 0
    assert s3.get_object(Bucket=bucket, Key="partial/big.bin")["Body"].read() == big.read_bytes()


def test_cp_a_and_tar_x(s3: Any, bucket: str, mount: MountFactory, tmp_path: Path) -> None:
    """`cp -a` keeps file modes and times (directory times must at least not fail the
    copy); `tar x` into the mount stores the same tree."""
    src = tmp_path / "src"
    files = make_tree(src, 30)
    dirs = {str(p.relative_to(src)): p for p in src.rglob("*") if p.is_dir()}
    m = mount(bucket)
    proc = run("cp", "-a", str(src), str(m.path / "cp"), check=False)
    assert proc.returncode == 0, proc.stderr  # s3fs: "preserving times ...: failed"
    assert proc.stderr == ""
    check_files_in_mount(m.path / "cp", files)
    for rel, d in dirs.items():  # same mount: directory metadata is held in memory
        a, b = (m.path / "cp" / rel).stat(), d.stat()
        assert stat.S_IMODE(a.st_mode) == stat.S_IMODE(b.st_mode), rel
        assert a.st_mtime_ns == b.st_mtime_ns, rel
    assert os.readlink(m.path / "cp/d00/link-to-f0000") == "f0000.bin"

    tarball = tmp_path / "tree.tar"
    # GNU tar's POSIX format keeps nanosecond times (Python's tarfile rounds via float).
    tar_args = ["--format=posix", "--transform", "s,^src,x,", "-C", str(tmp_path)]
    run("tar", *tar_args, "-cf", str(tarball), "src")
    (m.path / "tarx").mkdir()
    run("tar", "-xf", str(tarball), "-C", str(m.path / "tarx"))
    check_files_in_mount(m.path / "tarx/x", files)
    assert os.readlink(m.path / "tarx/x/d00/link-to-f0000") == "f0000.bin"
    assert m.unmount() == 0
    check_files_in_s3(s3, bucket, "cp/", files)
    check_files_in_s3(s3, bucket, "tarx/x/", files)

    # After a remount the files' metadata comes from S3. Directory metadata lives on the
    # "dir/" markers, which SeaweedFS strips; report what held instead of failing.
    m2 = mount(bucket)
    check_files_in_mount(m2.path / "cp", files)
    check_files_in_mount(m2.path / "tarx/x", files)
    held = sum(
        (m2.path / "cp" / rel).stat().st_mtime_ns == d.stat().st_mtime_ns for rel, d in dirs.items()
    )
    # rsync -a straight into the mount root (s3fs exited 23: it could not set the
    # permissions of the target directory, which here has no marker to carry them).
    run("rsync", "-a", f"{src}/", f"{m2.path}/")
    check_files_in_mount(m2.path, files)
    marker = s3.head_object(Bucket=bucket, Key="cp/d00/")
    print(
        f"\n[cp -a] directory mtimes kept after remount: {held}/{len(dirs)}; "
        f"marker metadata on the server: {marker.get('Metadata')}"
    )
    assert m2.unmount() == 0
