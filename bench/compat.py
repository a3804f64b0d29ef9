#!/usr/bin/env python3
"""Count pjdfstest results on a mounted filesystem: `python3 bench/compat.py PJDFSTEST MNT
[DIR ...]`.

PJDFSTEST is a checkout of pjd/pjdfstest that you built yourself (its `pjdfstest` binary
beside `tests/`); nothing is downloaded. Runs `prove -r` (as root: many cases switch user)
in a fresh directory inside MNT, over every tests/ directory or the DIRs named
(`chmod rename ...`), and prints passed/total per directory and overall. Mount with
`-o allow_other` (which brings `default_permissions`) for the cases run as other users; see
README.md, "Semantics". Why a script: the figures in the README must be reproducible.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

PLAN = re.compile(r"^1\.\.(\d+)")
RESULT = re.compile(r"^(not ok|ok)\b(.*)")


def run_file(t: Path, cwd: Path) -> tuple[int, int]:
    """(passed, planned) for one .t file, counted as prove counts: `not ok ... # TODO` is
    no failure; a case never reported (the script stopped) is one."""
    out = subprocess.run(
        ["sh", str(t)], cwd=cwd, capture_output=True, text=True, check=False
    ).stdout
    planned = passed = 0
    for line in out.splitlines():
        if m := PLAN.match(line):
            planned = int(m.group(1))
        elif (m := RESULT.match(line)) and (m.group(1) == "ok" or "# TODO" in m.group(2)):
            passed += 1
    return passed, planned


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pjdfstest", type=Path, help="a built pjd/pjdfstest checkout")
    ap.add_argument("mount", type=Path, help="the mounted filesystem to test")
    ap.add_argument("dirs", nargs="*", help="tests/ subdirectories (default: all)")
    args = ap.parse_args()
    tests = args.pjdfstest / "tests"
    if not (args.pjdfstest / "pjdfstest").is_file() or not tests.is_dir():
        sys.exit(f"{args.pjdfstest}: no built pjdfstest binary and tests/ beside it")
    dirs = [tests / d for d in args.dirs] or sorted(p for p in tests.iterdir() if p.is_dir())
    work = Path(tempfile.mkdtemp(prefix="compat-", dir=args.mount))
    work.chmod(0o755)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    try:
        for d in dirs:
            for t in sorted(d.glob("*.t")):
                passed, planned = run_file(t, work)
                counts[d.name][0] += passed
                counts[d.name][1] += planned
                print(f"{d.name}/{t.name}: {passed}/{planned}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = [sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())]
    print()
    for name, (passed, planned) in sorted(counts.items()):
        print(f"{name:16} {passed:6} / {planned}")
    print(f"{'total':16} {total[0]:6} / {total[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
