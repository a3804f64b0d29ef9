"""Crash-and-race soak: random operations from several processes, kill -9 of the daemon at
random moments, remount with the same cache dir, and a model of what was acknowledged.

Worker processes (long-lived, one subdirectory of the mount each) run seeded random
operations — create (also over an existing file), append, overwrite at an offset (also past
the end), truncate by path and through an fd, rename (also over an existing file), unlink
(also while open, reading and writing the open fd afterwards), chmod, fsync — and check
every change reads back through the mount. The test itself runs ``fbmount sync MNT`` at
random moments and, in every round but the last, SIGKILLs the daemon: at a random time,
while an upload is in flight (polled from the control socket), while a worker is inside a
rename, or while a ``fbmount sync`` is waiting. Workers stop at the first ENOTCONN /
ECONNABORTED ("round over"), the dead mount is detached, and the bucket is mounted again
with the same endpoint and cache dir: the next round starts on what recovery left.

The model, per path (kept here from the workers' event logs, stamped with CLOCK_MONOTONIC,
which all processes share):
- the last *acknowledged* state: the state an fsync() on it returned with, or the state the
  last operation completed (closed) before a ``fbmount sync`` started that then returned 0;
- every state written since (closed operations, in order), and for the operation that the
  kill interrupted, every byte-wise mix of its before and after contents (a write cut short);
- for every piecewise write since the ack, every such mix too: an upload that ran during it
  (``fbmount sync`` uploads files open for writing) stored one, the next upload replaces
  it, but a rename or unlink of the path leaves it in S3 until the old key's delete, and
  the README allows a crash inside that window (close-durable below still wants the exact
  state of a closed write).
After a kill -9 every path must show one of those — so an acknowledged unlink never comes
back and an acknowledged chmod sticks — in S3 and through the new mount alike (recovery
uploads before the mount serves). The README promises more: a close() that returned is in
the journal, so a path whose last change was a closed write/truncate/chmod must show
exactly that state; checked separately ("close-durable"). The last round ends with a clean
unmount instead, after which S3 and a fresh mount (new cache dir) must hold exactly the
model, byte for byte and mode for mode, with no multipart upload left open.

Seeded: FBMOUNT_CRASH_SOAK_SEED (default CRASH_SOAK_SEED) fixes every operation, the kill
strategies and times; the interleaving with the daemon's background uploads is not
deterministic, so rerun a failing seed a few times. FBMOUNT_CRASH_SOAK_ROUNDS overrides
the number of rounds. A failure prints the seed, the round, the kill, the path's states
with the operations that made them, the worker's last operations and the daemon's log lines
for the key. The file doubles as the worker program:
``python3 tests/test_crash_soak.py ROOT SEED LOGDIR NAME`` (commands on stdin).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import select
import stat
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from test_soak import Mismatch, Worker, tree_of

CRASH_SOAK_SEED = 20251202
WORKERS = 3
ROUNDS = 5  # kill -9 ends every round but the last, which ends with a clean unmount
KILL_WINDOW = (1.5, 6.0)  # seconds after a round starts
FINAL_SECONDS = 4.0
MIB = 1024 * 1024
PART_MIB = 5
MOUNT_ARGS = ("--upload-delay", "0.3", "--part-size", str(PART_MIB))
if os.environ.get("FBMOUNT_CRASH_SOAK_DEBUG"):  # every request in the daemon's log
    MOUNT_ARGS += ("--debug",)
NAMES = [f"f{i}" for i in range(5)]
MODES = [0o600, 0o640, 0o644, 0o660, 0o664, 0o700, 0o750, 0o755]
CREATE_MODE = 0o644  # with umask 022
LOST = (errno.ENOTCONN, errno.ECONNABORTED)  # the daemon is gone: the round is over

State = tuple[str, int, int] | None  # (sha256, size, mode); None: no such file


def state_of(data: bytes | bytearray | None, mode: int | None) -> list | None:
    if data is None:
        return None
    return [hashlib.sha256(data).hexdigest(), len(data), mode]


# --------------------------------------------------------------------------- the worker
class LineReader:
    """Lines from a pipe fd, with a timeout (select), never reading past what is there."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""

    def readline(self, timeout: float | None) -> str | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.fd], [], [], left)[0]:
                return None
            chunk = os.read(self.fd, 4096)
            if not chunk:
                return ""
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def ready(self) -> bool:
        return b"\n" in self.buf or bool(select.select([self.fd], [], [], 0)[0])


class CrashWorker(Worker):
    """test_soak's Worker (model `files`, `check_path`, history) with modes, fsync and an
    event log: every change is announced before its syscalls (`will`), so when the daemon
    dies mid-operation the log says which states the interrupted operation may have left."""

    def __init__(self, root: Path, seed: int, logdir: Path, name: str) -> None:
        super().__init__(root, seed)
        self.logdir = logdir
        self.name = name
        self.modes: dict[str, int] = {}
        self.pending: dict[str, dict[str, Any]] = {}
        # Per path, the piecewise writes done since its last fsync, for `dump_partials`.
        self.partials: dict[str, list[dict[str, Any]]] = {}
        self.round = -1
        self.log: Any = None
        self.recent: deque[tuple[str, str, bytes]] = deque(maxlen=40)

    # ----- events
    def emit(self, **event: Any) -> None:
        self.log.write(json.dumps(event) + "\n")
        self.log.flush()

    def st(self, rel: str) -> list | None:
        return state_of(self.files.get(rel), self.modes.get(rel))

    def will(
        self,
        rel: str,
        new: bytes | None,
        mode: int | None,
        *,
        mix: bool = False,
        extra: tuple[bytes, ...] = (),
        minlen: int | None = None,
    ) -> None:
        """Announce that this operation takes `rel` to (`new`, `mode`). With `mix` its
        syscalls write data piecewise, so a cut-short operation may leave any byte-wise mix
        of the old bytes, the new ones, `extra` and zeros."""
        old = self.files.get(rel)
        self.pending[rel] = {
            "old": (None if old is None else bytes(old), self.modes.get(rel)),
            "new": (new, mode),
            "mix": mix,
            "extra": list(extra),
            "minlen": minlen,
        }

    def fsync(self, fd: int, rel: str) -> None:
        os.fsync(fd)
        self.emit(e="ack", n=self.ops, path=rel, st=self.st(rel), t=time.monotonic())
        self.partials.pop(rel, None)
        if rel in self.pending:  # acknowledged: the older state cannot come back any more
            data = self.files.get(rel)
            self.pending[rel]["old"] = (None if data is None else bytes(data), self.modes[rel])

    def mix_of(self, p: dict[str, Any]) -> dict[str, Any]:
        """The blobs and bounds of the byte-wise mixes a piecewise write `p` may leave."""
        (old, old_mode), (new, new_mode) = p["old"], p["new"]
        sources = [b for b in (old, new, *p["extra"]) if b is not None]
        blobs = []
        for data in sources:  # by content: one write's after is the next one's before
            blob = self.logdir / f"blob-{self.name}-{hashlib.sha256(data).hexdigest()[:20]}"
            if not blob.exists():
                blob.write_bytes(data)
            blobs.append(str(blob))
        lens = [len(b) for b in sources]
        return {
            "blobs": blobs,
            "minlen": p["minlen"] if p["minlen"] is not None else min(lens),
            "maxlen": max(lens),
            "modes": sorted({m for m in (old_mode, new_mode) if m is not None}),
        }

    def dump_inflight(self) -> None:
        for rel, p in self.pending.items():
            (old, old_mode), (new, new_mode) = p["old"], p["new"]
            event: dict[str, Any] = {
                "e": "inflight",
                "n": self.ops,
                "path": rel,
                "exact": [state_of(old, old_mode), state_of(new, new_mode)],
            }
            if p["mix"]:
                event["mix"] = self.mix_of(p)
            self.emit(**event)

    def dump_partials(self) -> None:
        """After a kill: the piecewise writes of each path since its last fsync. An upload
        that ran during one (a `fbmount sync` uploads files open for writing) stored a
        mix of its before and after in S3; the next upload replaces it, but a path renamed
        away or unlinked keeps it until its delete, and a crash inside that window (the
        README's) leaves it there. Only for paths gone now (or changing at the kill): a
        path whose last change was a closed write must show exactly that (close-durable)."""
        for rel, done in self.partials.items():
            if rel in self.files and rel not in self.pending:
                continue
            for p in done:
                self.emit(e="partial", n=p["n"], path=rel, t=p["t"], mix=self.mix_of(p))

    # ----- checks
    def verify(self, rel: str) -> None:
        try:
            self.check_path(rel)  # content and size, or absence
        except Mismatch as e:
            raise Mismatch(f"{e}\n{self.explain(rel)}") from None
        if rel in self.files:
            mode = stat.S_IMODE(os.stat(self.p(rel)).st_mode)
            if mode != self.modes[rel]:
                raise Mismatch(f"{rel}: mode {mode:o}, {self.modes[rel]:o} expected")

    def remember(self, label: str, rel: str) -> None:
        data = self.files.get(rel)
        if data is not None and len(data) <= 2 * MIB:
            self.recent.append((label, rel, bytes(data)))

    def explain(self, rel: str) -> str:
        """Where do the bytes read come from? Saved, and compared with recent states."""
        try:
            got = self.p(rel).read_bytes()
        except OSError as e:
            return f"    (reading it again: {e!r})"
        want = bytes(self.files.get(rel, b""))
        stem = self.logdir / f"mismatch-{self.name}-r{self.round}-{self.ops}-{rel}"
        stem.with_suffix(".got").write_bytes(got)
        stem.with_suffix(".want").write_bytes(want)
        lines = [f"    read and model saved as {stem}.got / .want"]
        step = 4096
        for start in range(0, max(len(got), len(want)), step):
            a, b = got[start : start + step], want[start : start + step]
            if a == b:
                continue
            same = [f"{lbl} {r}" for lbl, r, d in self.recent if d[start : start + step] == a]
            zero = " (zeros)" if a and not a.strip(b"\0") else ""
            lines.append(
                f"    bytes {start}..{start + len(a)} differ{zero}; equal there to: {same or '-'}"
            )
            if len(lines) > 8:
                break
        return "\n".join(lines)

    def load(self) -> dict[str, list | None]:
        """Adopt what the mount shows now (after a crash: whatever recovery left)."""
        self.files.clear()
        self.modes.clear()
        names = set(NAMES) | set(os.listdir(self.root))
        for rel in sorted(names):
            try:
                data = (self.root / rel).read_bytes()
            except FileNotFoundError:
                continue
            self.files[rel] = bytearray(data)
            self.modes[rel] = stat.S_IMODE(os.stat(self.root / rel).st_mode)
            self.remember(f"r{self.round} start", rel)
        return {rel: self.st(rel) for rel in sorted(names)}

    # ----- data
    def payload(self) -> bytes:
        if self.rng.random() < 0.12:  # multipart with --part-size 5; above 10 MiB streamed
            return self.rng.randbytes(self.rng.randrange(PART_MIB * MIB + 1, 12 * MIB))
        return self.data()

    def _pick(self) -> str | None:
        return self.rng.choice(sorted(self.files)) if self.files else None

    @staticmethod
    def _write_all(fd: int, data: bytes, offset: int | None = None) -> None:
        view = memoryview(data)
        while view:
            chunk = view[:MIB]
            n = os.write(fd, chunk) if offset is None else os.pwrite(fd, chunk, offset)
            if offset is not None:
                offset += n
            view = view[n:]

    # ----- operations: each returns (paths it changed, whether the change is close-durable)
    def op_create(self) -> tuple[list[str], bool]:
        rel = self.rng.choice(NAMES)
        data = self.payload()
        mode = self.modes.get(rel, CREATE_MODE)  # O_TRUNC keeps the mode of an existing file
        self.will(rel, data, mode, mix=True, minlen=0)
        fd = os.open(self.p(rel), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, CREATE_MODE)
        try:
            self._write_all(fd, data)
            self.files[rel], self.modes[rel] = bytearray(data), mode
            if self.rng.random() < 0.2:
                self.fsync(fd, rel)
        finally:
            os.close(fd)
        return [rel], True

    def op_append(self) -> tuple[list[str], bool]:
        rel = self._pick()
        if rel is None:
            return [], True
        old = self.files[rel]
        data = self.rng.randbytes(self.rng.choice([1, 333, 8192, 200_000]))
        self.will(rel, bytes(old + data), self.modes[rel], mix=True, minlen=len(old))
        fd = os.open(self.p(rel), os.O_WRONLY | os.O_APPEND)
        try:
            self._write_all(fd, data)
            old += data
        finally:
            os.close(fd)
        return [rel], True

    def op_overwrite(self) -> tuple[list[str], bool]:
        rel = self._pick()
        if rel is None:
            return [], True
        model = self.files[rel]
        if len(model) > PART_MIB * MIB and self.rng.random() < 0.5:  # across a part boundary
            off = PART_MIB * MIB - self.rng.randrange(5000)
        else:
            off = self.rng.randrange(len(model) + 5000)  # also past the end: a hole
        data = self.rng.randbytes(self.rng.choice([1, 10, 4096, 20000, 300_000]))
        new = bytearray(model)
        if off > len(new):
            new.extend(b"\0" * (off - len(new)))
        new[off : off + len(data)] = data
        self.will(rel, bytes(new), self.modes[rel], mix=True, minlen=len(model))
        fd = os.open(self.p(rel), os.O_WRONLY)
        try:
            self._write_all(fd, data, off)
            self.files[rel] = new
        finally:
            os.close(fd)
        return [rel], True

    def op_truncate(self) -> tuple[list[str], bool]:
        rel = self._pick()
        if rel is None:
            return [], True
        model = self.files[rel]
        size = self.rng.randrange(len(model) * 2 + 100)
        if self.rng.random() < 0.5:
            new = (bytes(model) + b"\0" * size)[:size]
            self.will(rel, new, self.modes[rel])
            os.truncate(self.p(rel), size)
        else:  # through an open fd, right after a write through it
            marked = b"T" + bytes(model[1:])
            new = (marked + b"\0" * size)[:size]
            self.will(
                rel, new, self.modes[rel], mix=True, extra=(marked,), minlen=min(size, len(model))
            )
            fd = os.open(self.p(rel), os.O_RDWR)
            try:
                os.pwrite(fd, b"T", 0)
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
        self.files[rel] = bytearray(new)
        return [rel], True

    def op_rename(self) -> tuple[list[str], bool]:
        src = self._pick()
        if src is None:
            return [], True
        others = [n for n in NAMES if n != src]
        over = sorted(set(others) & set(self.files))
        dst = self.rng.choice(over if over and self.rng.random() < 0.5 else others)
        self.will(src, None, None)
        self.will(dst, bytes(self.files[src]), self.modes[src])
        os.rename(self.p(src), self.p(dst))
        self.files[dst], self.modes[dst] = self.files.pop(src), self.modes.pop(src)
        return [src, dst], False

    def op_unlink(self) -> tuple[list[str], bool]:
        rel = self._pick()
        if rel is None:
            return [], True
        fd = os.open(self.p(rel), os.O_RDWR) if self.rng.random() < 0.6 else -1
        try:
            self.will(rel, None, None)
            os.unlink(self.p(rel))
            old = bytes(self.files.pop(rel))
            self.modes.pop(rel)
            if fd >= 0:  # the open handle keeps the data, also for writing
                got = os.pread(fd, len(old) + 1, 0)
                if got != old:
                    raise Mismatch(f"{rel}: reads {len(got)} bytes after unlink, not {len(old)}")
                os.pwrite(fd, b"after unlink", 0)
                if os.pread(fd, 12, 0) != b"after unlink":
                    raise Mismatch(f"{rel}: the unlinked file does not read back its write")
        finally:
            if fd >= 0:
                os.close(fd)
        return [rel], False

    def op_chmod(self) -> tuple[list[str], bool]:
        rel = self._pick()
        if rel is None:
            return [], True
        mode = self.rng.choice(MODES)
        self.will(rel, bytes(self.files[rel]), mode)
        os.chmod(self.p(rel), mode)
        self.modes[rel] = mode
        return [rel], True

    def op_fsync(self) -> tuple[list[str], bool]:
        rel = self._pick()
        if rel is None:
            return [], True
        write = self.rng.random() < 0.5
        fd = os.open(self.p(rel), os.O_RDWR if write or self.rng.random() < 0.5 else os.O_RDONLY)
        try:
            if write:
                model = self.files[rel]
                off = self.rng.randrange(len(model) + 1)
                data = self.rng.randbytes(self.rng.choice([1, 4096, 70000]))
                new = bytearray(model)
                new[off : off + len(data)] = data
                self.will(rel, bytes(new), self.modes[rel], mix=True, minlen=len(model))
                self._write_all(fd, data, off)
                self.files[rel] = new
            self.fsync(fd, rel)
        finally:
            os.close(fd)
        return [rel], True

    def op_read(self) -> tuple[list[str], bool]:
        rel = self._pick()
        if rel is not None:
            self.verify(rel)
        return [], True

    OPS = [
        ("create", 18), ("append", 10), ("overwrite", 14), ("truncate", 8), ("rename", 12),
        ("unlink", 7), ("chmod", 8), ("fsync", 9), ("read", 5),
    ]  # fmt: skip

    def run_round(self, rnd: int, commands: LineReader) -> str:
        self.round = rnd
        self.log = open(self.logdir / f"{self.name}-r{rnd}.jsonl", "w")  # noqa: SIM115
        try:
            self.emit(e="start", t=time.monotonic(), states=self.load())
            self.partials.clear()  # what the mount shows now is where S3 starts from
            print("ready", flush=True)
            names = [n for n, _ in self.OPS]
            weights = [w for _, w in self.OPS]
            while True:
                if commands.ready():
                    commands.readline(0)  # "stop"
                    reason = "stopped"
                    self.check_all()
                    for rel in self.files:
                        self.verify(rel)
                    break
                name = self.rng.choices(names, weights)[0]
                self.ops += 1
                self.history.append(f"r{rnd}#{self.ops} {name}")
                self.emit(e="op", n=self.ops, name=name, t=time.monotonic())
                self.pending.clear()
                try:
                    touched, durable = getattr(self, f"op_{name}")()
                except OSError as e:
                    if e.errno in LOST:
                        self.dump_inflight()
                        self.dump_partials()
                        reason = "lost"
                        break
                    raise
                states = {rel: self.st(rel) for rel in touched}
                t_done = time.monotonic()
                self.emit(e="done", n=self.ops, t=t_done, states=states, durable=durable)
                for rel, p in self.pending.items():
                    if p["mix"]:
                        self.partials.setdefault(rel, []).append({**p, "n": self.ops, "t": t_done})
                self.pending.clear()
                self.history[-1] += f" {touched}"
                for rel in touched:
                    self.remember(f"r{rnd}#{self.ops} {name}", rel)
                for rel in touched:
                    if len(self.files.get(rel, b"")) < MIB or self.rng.random() < 0.2:
                        self.verify(rel)
        except OSError as e:
            if e.errno not in LOST:
                where = traceback.format_exc(limit=-3).strip().splitlines()[-4:]
                msg = f"{e!r} in {' / '.join(x.strip() for x in where[:-1])}"
                self.emit(e="fail", n=self.ops, msg=msg, history=list(self.history))
                reason = "error"
            else:
                self.dump_partials()
                reason = "lost"
        except Mismatch as e:
            self.emit(e="fail", n=self.ops, msg=str(e), history=list(self.history))
            reason = "mismatch"
        self.emit(e="end", t=time.monotonic(), reason=reason, history=list(self.history))
        self.log.close()
        return reason


def worker_main(argv: list[str]) -> int:
    root, seed, logdir, name = Path(argv[0]), int(argv[1]), Path(argv[2]), argv[3]
    os.umask(0o022)
    w = CrashWorker(root, seed, logdir, name)
    commands = LineReader(sys.stdin.fileno())
    while True:
        line = commands.readline(None)
        if not line or line == "quit":
            return 0
        rnd = int(line.split()[1])  # "go ROUND"
        reason = w.run_round(rnd, commands)
        print(f"over {rnd} {reason} {w.ops}", flush=True)


if __name__ == "__main__":
    raise SystemExit(worker_main(sys.argv[1:]))


# --------------------------------------------------------------------------- the test
import pytest  # noqa: E402 - the worker program above needs only the stdlib and test_soak
from conftest import REPO_ROOT, Mount, MountFactory  # noqa: E402

from fbmount import control  # noqa: E402


def short(st: State | list | None) -> str:
    if st is None:
        return "absent"
    return f"{st[0][:10]} {st[1]} B mode {st[2]:o}"


@dataclass
class PathModel:
    acked: State = None  # everything starts absent, and that is acknowledged
    acked_label: str = "initial (absent)"
    acked_t: float = float("-inf")
    hist: list[tuple[State, str]] = field(default_factory=list)  # states since the ack
    cur: State = None  # the state the worker left
    cur_t: float = float("-inf")
    mixes: list[tuple[dict, str]] = field(default_factory=list)  # cut-short writes
    # Piecewise writes since the ack: an upload during one may have stored a mix (see
    # CrashWorker.dump_partials), which a rename or unlink leaves in S3 until its delete.
    partials: list[tuple[dict, str]] = field(default_factory=list)
    exact: tuple[State, str] | None = (None, "initial")  # close-durable expectation
    trail: list[str] = field(default_factory=list)  # what happened to it, for reports

    def allowed(self, obs: State, obs_bytes: bytes | None) -> bool:
        if obs == self.acked or any(obs == s for s, _ in self.hist):
            return True
        if obs is None or obs_bytes is None:
            return False
        return any(mix_ok(obs_bytes, obs[2], mix) for mix, _ in self.mixes + self.partials)

    def describe(self) -> str:
        lines = [f"    acknowledged: {short(self.acked)}  [{self.acked_label}]"]
        lines += [f"    since then:   {short(s)}  [{label}]" for s, label in self.hist]
        lines += [
            f"    cut short:    bytes of {len(m['blobs'])} sources, {m['minlen']}..{m['maxlen']} B,"
            f" modes {[oct(x) for x in m['modes']]}  [{label}]"
            for m, label in self.mixes
        ]
        lines += [
            f"    mid-write:    bytes of {len(m['blobs'])} sources, {m['minlen']}..{m['maxlen']} B,"
            f" modes {[oct(x) for x in m['modes']]}  [{label}]"
            for m, label in self.partials
        ]
        return "\n".join(lines)


def mix_ok(obs: bytes, mode: int, mix: dict) -> bool:
    """Is `obs` a byte-wise mix of the sources (or zeros), of a length in range?"""
    if not mix["minlen"] <= len(obs) <= mix["maxlen"] or mode not in mix["modes"]:
        return False
    sources = [Path(b).read_bytes() for b in mix["blobs"]]
    step = 4096
    for start in range(0, len(obs), step):
        chunk = obs[start : start + step]
        if any(src[start : start + step] == chunk for src in sources) or not chunk.strip(b"\0"):
            continue
        for i, byte in enumerate(chunk, start):
            if byte and all(i >= len(src) or src[i] != byte for src in sources):
                return False
    return True


@dataclass
class Sync:
    rnd: int
    t_start: float
    t_end: float = 0.0
    rc: int | None = None
    err: str = ""


class Soak:
    """The test's side: mounts, kills, syncs, the model and the report."""

    def __init__(self, s3: Any, bucket: str, mount: MountFactory, run_fbmount: Any, tmp: Path):
        self.s3, self.bucket, self.mount_factory, self.run_fbmount = s3, bucket, mount, run_fbmount
        self.seed = int(os.environ.get("FBMOUNT_CRASH_SOAK_SEED", CRASH_SOAK_SEED))
        self.rounds = int(os.environ.get("FBMOUNT_CRASH_SOAK_ROUNDS", ROUNDS))
        self.rng = random.Random(self.seed)
        self.logdir = tmp / "soak-logs"
        self.logdir.mkdir()
        self.tmp = tmp
        self.names = [f"w{i}" for i in range(WORKERS)]
        self.models = {f"{w}/{n}": PathModel() for w in self.names for n in NAMES}
        self.failures: list[str] = []
        self.mounts: list[Mount] = []
        self.syncs: list[Sync] = []
        self.sync_thread: threading.Thread | None = None
        self.round_notes: list[str] = []
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.readers: dict[str, LineReader] = {}
        strategies = ["upload", "rename", "sync", "random"]
        self.rng.shuffle(strategies)
        self.plan = [strategies[r % len(strategies)] for r in range(self.rounds - 1)]
        self.t0 = 0.0
        self.rnd = -1

    @property
    def banner(self) -> str:
        return f"crash soak seed {self.seed} (rerun: FBMOUNT_CRASH_SOAK_SEED={self.seed})"

    # ----- mounts, workers, syncs
    def mount(self, first: bool = False) -> Mount:
        if first:
            m = self.mount_factory(self.bucket, *MOUNT_ARGS)
        else:
            prev = self.mounts[-1]
            m = self.mount_factory(
                self.bucket, *MOUNT_ARGS, cache_dir=prev.cache_dir, mountpoint=prev.path
            )
            m.sync()  # recovery serves the staged files at once and uploads them meanwhile
        self.mounts.append(m)
        return m

    @property
    def m(self) -> Mount:
        return self.mounts[-1]

    def start_workers(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        for i, name in enumerate(self.names):
            err = open(self.logdir / f"{name}.stderr", "wb")  # noqa: SIM115
            proc = subprocess.Popen(
                [sys.executable, __file__, str(self.m.path / name), str(self.seed * 16 + i),
                 str(self.logdir), name],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, bufsize=0,
                env=env, cwd=self.tmp,
            )  # fmt: skip
            err.close()
            self.procs[name] = proc
            self.readers[name] = LineReader(proc.stdout.fileno())

    def tell(self, name: str, line: str) -> None:
        self.procs[name].stdin.write(line.encode() + b"\n")

    def answer(self, name: str, timeout: float) -> str:
        line = self.readers[name].readline(timeout)
        if not line:
            stderr = (self.logdir / f"{name}.stderr").read_text(errors="replace")
            what = "exited" if line == "" else f"did not answer in {timeout:.0f} s (hung?)"
            pytest.fail(f"{self.banner}: worker {name} {what}\n{stderr}\n{self.report_tail()}")
        return line

    def stop_workers(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is None:
                try:
                    self.tell(name, "quit")
                    proc.wait(timeout=10)
                except (OSError, subprocess.TimeoutExpired):
                    proc.kill()
                    proc.wait(timeout=10)

    def sync_running(self) -> bool:
        return self.sync_thread is not None and self.sync_thread.is_alive()

    def start_sync(self) -> None:
        sync = Sync(self.rnd, time.monotonic())  # before the request: what closed before is covered
        self.syncs.append(sync)

        def run() -> None:
            try:
                r = self.run_fbmount("sync", str(self.m.path), timeout=60)
                sync.rc, sync.err = r.returncode, r.stdout[-300:] + r.stderr[-500:]
            except subprocess.TimeoutExpired:
                sync.rc, sync.err = -1, "timed out after 60 s"
            sync.t_end = time.monotonic()

        self.sync_thread = threading.Thread(target=run, name="fbmount-sync", daemon=True)
        self.sync_thread.start()

    def wait_sync(self) -> None:
        if self.sync_thread is not None:
            self.sync_thread.join(90)

    # ----- kill triggers
    def uploading(self) -> list[dict]:
        try:
            for status in control.request(control.socket_path(self.m.path), "status", timeout=2):
                return status.get("uploading", [])
        except (OSError, ValueError):
            pass
        return []

    def in_rename(self, rnd: int) -> str | None:
        for name in self.names:
            try:
                with open(self.logdir / f"{name}-r{rnd}.jsonl", "rb") as f:
                    f.seek(max(0, os.fstat(f.fileno()).st_size - 300))
                    last = f.read().rstrip(b"\n").rsplit(b"\n", 1)[-1]
            except OSError:
                continue
            if b'"e": "op"' in last and b'"name": "rename"' in last:
                return f"{name}: {last.decode(errors='replace')}"
        return None

    def wait_for_kill(self, rnd: int, strategy: str) -> str:
        """Run syncs at random moments until the strategy's moment to kill; say what it hit."""
        start = self.t0
        kill_at = start + self.rng.uniform(*KILL_WINDOW)
        give_up = start + KILL_WINDOW[1] + 3.0
        next_sync = start + self.rng.uniform(0.3, 1.5)
        sync_kill_delay = self.rng.uniform(0.02, 0.4)
        sync_started = None
        while True:
            now = time.monotonic()
            if now >= next_sync and not self.sync_running():
                self.start_sync()
                next_sync = now + self.rng.uniform(0.7, 2.5)
            if now >= give_up:
                return f"{strategy}: trigger not seen, killed at the deadline"
            if strategy == "random" and now >= kill_at:
                return "random time"
            if strategy == "upload" and now >= start + KILL_WINDOW[0]:
                ups = self.uploading()
                big = [u for u in ups if u["bytes"] > PART_MIB * MIB and 0 < u["sent"] < u["bytes"]]
                if big or (ups and now >= kill_at):
                    u = (big or ups)[0]
                    return f"upload in flight: {u['key']} {u['sent']} of {u['bytes']} B sent"
                time.sleep(0.03)
            if strategy == "rename" and now >= start + KILL_WINDOW[0]:
                hit = self.in_rename(rnd)
                if hit:
                    return f"inside rename (worker op {hit})"
            if strategy == "sync" and now >= kill_at:
                if sync_started is None and not self.sync_running():
                    self.start_sync()
                    sync_started = now
                if sync_started is not None and now >= sync_started + sync_kill_delay:
                    state = "in flight" if self.sync_running() else "already returned"
                    return f"fbmount sync started {now - sync_started:.2f} s before, {state}"
            time.sleep(0.002)

    # ----- rounds
    def run_round(self, rnd: int) -> None:
        last = rnd == self.rounds - 1
        self.rnd = rnd
        # After a crash: what recovery left in S3, and the bytes the mount shows for paths
        # where a cut-short write allows mixes (the workers report the rest as they start).
        s3_view = self.s3_view() if rnd else {}
        shown = {}
        for path, pm in self.models.items():
            if (pm.mixes or pm.partials) and (self.m.path / path).exists():
                shown[path] = (self.m.path / path).read_bytes()
        for name in self.names:
            self.tell(name, f"go {rnd}")
        for name in self.names:
            assert self.answer(name, 120) == "ready"
        self.t0 = time.monotonic()
        t_kill = float("inf")
        if last:
            note = "clean unmount"
            while time.monotonic() < self.t0 + FINAL_SECONDS:
                if not self.sync_running() and self.rng.random() < 0.3:
                    self.start_sync()
                time.sleep(0.3)
            for name in self.names:
                self.tell(name, "stop")
        else:
            note = self.wait_for_kill(rnd, self.plan[rnd])
            t_kill = time.monotonic()
            self.m.kill9(unmount=False)
            note = f"kill -9 at {t_kill - self.t0:.2f} s: {note}"
        overs = {name: self.answer(name, 60) for name in self.names}
        self.wait_sync()
        for s in self.syncs:
            if s.rnd == rnd and s.rc != 0 and s.t_end < t_kill:
                self.fail(
                    rnd,
                    "",
                    f"fbmount sync at {s.t_start - self.t0:.2f} s exited {s.rc}"
                    f" with the daemon alive: {s.err.strip()}",
                )
        if last:
            rc = self.m.unmount()
            if rc != 0:
                self.fail(rnd, "", f"final unmount exited {rc}")
        else:
            self.m.kill9()  # detach the dead mount (no worker touches it any more)
        ops = ", ".join(f"{n} {o.split()[3]} ops ({o.split()[2]})" for n, o in overs.items())
        self.round_notes.append(f"round {rnd}: {note}; {ops}")
        print(self.round_notes[-1])
        self.absorb(rnd, s3_view, shown)

    def s3_view(self) -> dict[str, tuple[State, bytes | None]]:
        """Every key in the bucket as a state (mode from x-amz-meta-mode)."""
        out: dict[str, tuple[State, bytes | None]] = {}
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            for o in page.get("Contents", []):
                key = o["Key"]
                if key.endswith("/"):
                    out[key] = (None, None)
                    continue
                obj = self.s3.get_object(Bucket=self.bucket, Key=key)
                data = obj["Body"].read()
                meta = obj.get("Metadata", {}).get("mode")
                mode = stat.S_IMODE(int(meta)) if meta and meta.isdigit() else -1
                out[key] = ((hashlib.sha256(data).hexdigest(), len(data), mode), data)
        return out

    def absorb(
        self, rnd: int, s3_view: dict[str, tuple[State, bytes | None]], shown: dict[str, bytes]
    ) -> None:
        """Check the round's starting view against the model, then apply its events."""
        entries: list[tuple[float, int, str, str, State, str]] = []
        inflight: list[tuple[str, dict, str]] = []
        syncs = [s for s in self.syncs if s.rnd == rnd and s.rc == 0]
        for name in self.names:
            events = [json.loads(x) for x in (self.logdir / f"{name}-r{rnd}.jsonl").open()]
            ops = {e["n"]: e["name"] for e in events if e["e"] == "op"}
            start = events[0]
            assert start["e"] == "start", start
            for rel, st in start["states"].items():
                path = f"{name}/{rel}"
                obs = tuple(st) if st else None
                if path not in self.models:
                    self.fail(rnd, path, f"unexpected file {short(obs)} after the crash")
                    continue
                if rnd:
                    s3 = s3_view.pop(path, (None, None))
                    self.observe(rnd, path, obs, s3, shown.get(path), start["t"])
            for e in events:
                label = f"r{rnd}#{e.get('n')} {ops.get(e.get('n'), '')}".strip()
                if e["e"] == "done":
                    for rel, st in e["states"].items():
                        kind = "done" if e["durable"] else "done-ns"
                        entries.append(
                            (e["t"], 1, f"{name}/{rel}", kind, tuple(st) if st else None, label)
                        )
                elif e["e"] == "ack":
                    st = e["st"]
                    entries.append(
                        (
                            e["t"],
                            1,
                            f"{name}/{e['path']}",
                            "fsync",
                            tuple(st) if st else None,
                            label,
                        )
                    )
                elif e["e"] == "partial":
                    entries.append((e["t"], 2, f"{name}/{e['path']}", "partial", e["mix"], label))
                elif e["e"] == "inflight":
                    inflight.append((f"{name}/{e['path']}", e, label + " (cut short by the kill)"))
                elif e["e"] == "fail":
                    hist = "\n      ".join(e["history"][-12:])
                    self.fail(
                        rnd, "", f"worker {name}: {e['msg']}\n    last operations:\n      {hist}"
                    )
        if rnd:
            for key, (st, _) in s3_view.items():
                if key not in {f"{w}/" for w in self.names} and key not in self.models:
                    self.fail(rnd, key, f"unexpected key in S3 after the crash: {short(st)}")
        entries += [
            (s.t_start, 0, "", "sync", None, f"fbmount sync @{s.t_start - self.t0:.2f}s")
            for s in syncs
        ]
        for t, _, path, kind, st, label in sorted(entries, key=lambda x: (x[0], x[1])):
            if kind == "sync":
                for pm in self.models.values():
                    if pm.cur_t > pm.acked_t:
                        pm.acked, pm.acked_t, pm.acked_label = pm.cur, pm.cur_t, label
                        pm.hist.clear()
                        pm.partials.clear()
                continue
            if kind == "partial":
                self.models[path].partials.append((st, label + " (an upload mid-write)"))
                continue
            pm = self.models[path]
            pm.trail.append(f"{t - self.t0:+.3f}s {label}: {kind} {short(st)}")
            if kind == "fsync":
                pm.acked, pm.acked_t, pm.acked_label = st, t, label + " (fsync)"
                pm.hist.clear()
                pm.partials.clear()
                pm.exact = (st, label)
            else:
                pm.cur, pm.cur_t = st, t
                if st != pm.acked:
                    pm.hist.append((st, label))
                pm.exact = (st, label) if kind == "done" else None
        for path, e, label in inflight:
            pm = self.models[path]
            pm.trail.append(f"{label}: {[short(s) for s in e['exact']]}")
            for st in e["exact"]:
                st = tuple(st) if st else None
                if st != pm.acked and all(st != s for s, _ in pm.hist):
                    pm.hist.append((st, label))
            if "mix" in e:
                pm.mixes.append((e["mix"], label))
            pm.exact = None

    def observe(
        self,
        rnd: int,
        path: str,
        obs: State,
        s3: tuple[State, bytes | None],
        obs_bytes: bytes | None,
        t: float,
    ) -> None:
        """What the new mount shows (`obs`, and its bytes if a cut-short write allows
        mixes) and what S3 holds, right after recovery and its upload (`fbmount sync`),
        before anything else touched it."""
        pm = self.models[path]
        s3_st = s3[0]
        if not pm.allowed(obs, obs_bytes):
            self.fail(rnd, path, f"the mount shows {short(obs)}, not a state the model allows")
        elif s3_st != obs:
            self.fail(rnd, path, f"the mount shows {short(obs)} but S3 holds {short(s3_st)}")
        elif pm.exact is not None and pm.exact[0] != obs:
            self.fail(
                rnd, path, f"close-durable: {short(obs)} after the crash, but "
                f"[{pm.exact[1]}] had closed with {short(pm.exact[0])}",
            )  # fmt: skip
        # Adopt what recovery left: it is the state the next round starts from.
        if obs != pm.acked and all(obs != s for s, _ in pm.hist):
            pm.hist.append((obs, f"seen after the crash before round {rnd}"))
        pm.cur, pm.cur_t = obs, t
        pm.mixes.clear()
        pm.partials.clear()
        pm.exact = (obs, f"seen after the crash before round {rnd}")
        pm.trail.append(f"round {rnd} starts with {short(obs)}")

    # ----- reports
    def fail(self, rnd: int, path: str, what: str) -> None:
        lines = [f"round {rnd}: {path + ': ' if path else ''}{what}"]
        pm = self.models.get(path)
        if pm is not None:
            lines.append("  model:\n" + pm.describe())
            lines.append("  history of the path:\n    " + "\n    ".join(pm.trail[-15:]))
            key_lines = [
                f"    [{m.log_path.name}] {line}"
                for m in self.mounts
                for line in m.log_text().splitlines()
                if path in line
            ]
            if key_lines:
                lines.append("  fbmount log lines naming it:\n" + "\n".join(key_lines[-20:]))
        self.failures.append("\n".join(lines))

    def report_tail(self) -> str:
        return "\n".join(self.round_notes)

    def report(self) -> str:
        syncs = ", ".join(
            f"@{s.t_start:.1f}:{s.rc}" + (f" {s.err.strip()[:120]!r}" if s.rc else "")
            for s in self.syncs
        )
        return (
            f"{self.banner}\nkill plan {self.plan}\n" + "\n".join(self.round_notes)
            + f"\nsyncs (start: rc) {syncs}\n\n" + "\n\n".join(self.failures)
        )  # fmt: skip

    # ----- the end
    def final_checks(self) -> None:
        rnd = self.rounds
        want = {p: pm.cur for p, pm in self.models.items()}
        present = {p: st for p, st in want.items() if st is not None}
        view = self.s3_view()
        markers = {f"{w}/" for w in self.names}
        for key in sorted(set(view) - markers - set(present)):
            self.fail(
                rnd,
                key,
                f"in S3 after the clean unmount, the model says absent: {short(view[key][0])}",
            )
        for key in sorted(markers - set(view)):
            self.fail(rnd, key, "directory marker missing from S3")
        for path, st in present.items():
            got = view.get(path, (None, None))[0]
            if got != st:
                self.fail(
                    rnd, path, f"S3 holds {short(got)} after the clean unmount, not {short(st)}"
                )
        uploads = self.s3.list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])
        if uploads:
            self.fail(rnd, "", f"multipart uploads left open: {[u['Key'] for u in uploads]}")
        fresh = self.mount_factory(self.bucket, cache_dir=self.tmp / "fresh-cache")
        files, dirs = tree_of(fresh.path)
        if dirs != set(self.names):
            self.fail(rnd, "", f"a fresh mount shows directories {sorted(dirs)}")
        for path in sorted(set(files) | set(present)):
            data = files.get(path)
            got = None
            if data is not None:
                mode = stat.S_IMODE(os.stat(fresh.path / path).st_mode)
                got = (hashlib.sha256(data).hexdigest(), len(data), mode)
            if got != present.get(path):
                self.fail(
                    rnd, path, f"a fresh mount shows {short(got)}, not {short(present.get(path))}"
                )
        if fresh.unmount() != 0:
            self.fail(rnd, "", "the fresh mount did not unmount cleanly")
        for m in self.mounts:
            if "Traceback" in m.log_text():
                self.fail(rnd, "", f"Traceback in {m.log_path}")


@pytest.mark.soak
@pytest.mark.crashsoak
def test_crash_soak(
    s3: Any, bucket: str, mount: MountFactory, run_fbmount: Any, tmp_path: Path
) -> None:
    soak = Soak(s3, bucket, mount, run_fbmount, tmp_path)
    print(f"\n{soak.banner}, kill plan {soak.plan}")
    started = time.monotonic()
    m = soak.mount(first=True)
    for name in soak.names:
        (m.path / name).mkdir()
    r = run_fbmount("sync", str(m.path), timeout=60)
    assert r.returncode == 0, r.stderr
    soak.start_workers()
    try:
        for rnd in range(soak.rounds):
            if rnd:
                soak.mount()
            soak.run_round(rnd)
    finally:
        soak.stop_workers()
        soak.wait_sync()
    soak.final_checks()
    print(f"crash soak took {time.monotonic() - started:.1f} s")
    assert not soak.failures, soak.report()
