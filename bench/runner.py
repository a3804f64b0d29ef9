"""Benchmark driver: one private SeaweedFS, one bucket per tool, every workload on every tool.

Workloads run workload-major (all tools do workload 1, then all do workload 2, ...) so that
load from other users of the machine spreads over the tools instead of hitting one of them.
Every workload gets a fresh mount (a fresh cache directory too), so "cold" means cold.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench import report
from bench import s3 as s3u
from bench.common import MB, Budget, StepTimeout, run
from bench.farlink import FarLink
from bench.mounts import MOUNTS, TOOLS, Mount
from bench.workloads import (
    WORKLOAD_FUNCS,
    WORKLOADS,
    WRITE_WORKLOADS,
    Ctx,
    Metric,
    Sizes,
    describe_failure,
    metrics_for,
    prepare_rm,
    seed_bucket,
    w_randread,
    w_raw,
)
from fbmount.localserver import LocalS3Server, find_weed

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Benchmark fbmount against s3fs and rclone mount on a private SeaweedFS.",
    )
    p.add_argument("--quick", action="store_true", help="small sizes: whole run < 5 minutes")
    p.add_argument("--only", default=",".join(TOOLS), help="comma list of tools (default all)")
    p.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help=f"comma list of workloads (default all): {','.join(WORKLOADS)}",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=REPO / "bench" / "results",
        help="directory for the JSON, PNG and text table",
    )
    p.add_argument(
        "--timeout", type=float, help="seconds per workload and tool (default 600, --quick 90)"
    )
    p.add_argument(
        "--count-gets",
        default="fbmount",
        help="tools whose random-read GETs are counted through a proxy in an extra, "
        "untimed pass (comma list, 'none'; default fbmount)",
    )
    p.add_argument(
        "--far-ms",
        default="0",
        metavar="MS[,MS...]",
        help="put every mount behind bench/farlink.py, a proxy on 127.0.0.1 that delays "
        "each byte MS ms each way (so a 2*MS round trip, and one more for each new "
        "connection); seeding and checking stay direct (default 0: plain loopback). "
        "A list (0,15) runs the whole table once per link and prints them side by side",
    )
    p.add_argument("--tmp-dir", type=Path, help="parent of the scratch directory (default $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, data)")
    args = p.parse_args(argv)
    args.tools = [t for t in args.only.split(",") if t]
    bad = [t for t in args.tools if t not in TOOLS]
    if bad:
        p.error(f"unknown tool(s) {bad}; choose from {list(TOOLS)}")
    args.wl = [w for w in args.workloads.split(",") if w]
    bad = [w for w in args.wl if w not in WORKLOADS]
    if bad:
        p.error(f"unknown workload(s) {bad}; choose from {list(WORKLOADS)}")
    args.wl = [w for w in WORKLOADS if w in args.wl]  # canonical order
    args.count = [] if args.count_gets == "none" else args.count_gets.split(",")
    try:
        args.links = [float(ms) for ms in args.far_ms.split(",") if ms.strip()]
    except ValueError:
        p.error(f"--far-ms takes numbers, not {args.far_ms!r}")
    if not args.links or any(ms < 0 for ms in args.links):
        p.error("--far-ms must be >= 0")
    args.far_ms = args.links[0]
    return args


def link_label(far_ms: float) -> str:
    """Which link a table was measured on (printed above it)."""
    if not far_ms:
        return "link: loopback (mounts talk to SeaweedFS on 127.0.0.1 directly)"
    return (
        f"link: far, {far_ms:g} ms added each way ({2 * far_ms:g} ms round trip, one more "
        f"round trip per new connection) by bench/farlink.py on 127.0.0.1"
    )


def _version(argv: list[str]) -> str:
    res = run(argv, 20)
    return (res.stdout or res.stderr).strip().splitlines()[0] if res.rc == 0 else "?"


def _say(t0: float, msg: str) -> None:
    print(f"[{time.monotonic() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes = Sizes.quick() if args.quick else Sizes()
        if args.timeout:
            self.sizes = dataclasses.replace(self.sizes, timeout=args.timeout)
        self.metrics: list[Metric] = metrics_for(self.sizes)
        self.results: dict[str, dict[str, dict]] = {}
        self.stats: dict[str, dict[str, dict]] = {}
        self.load: dict[str, list[float]] = {}
        self.live: list[Mount] = []
        self.t0 = time.monotonic()
        self.tmp = Path(tempfile.mkdtemp(prefix="fbmount-bench-", dir=args.tmp_dir))
        self.server = LocalS3Server(self.tmp / "s3", stop_timeout=5.0)
        self.proxy = None
        self.ctx: Ctx | None = None
        self.links: list[FarLink] = []

    # ------------------------------------------------------------------ bookkeeping
    def rec(
        self, tool: str, metric: str, value: float | None, status: str = "ok", note: str = ""
    ) -> None:
        entry: dict = {"value": value, "status": status}
        if note:
            entry["note"] = note
        self.results.setdefault(metric, {})[tool] = entry

    def mark_rest(
        self,
        workload: str,
        tool: str,
        status: str,
        note: str,
        skip: tuple[str, ...] = ("randread_gets",),
        seconds: float | None = None,
    ) -> None:
        """Mark what ``workload`` did not record.  A timeout puts ``seconds`` (how long the
        cut step ran, shown as "> N s") on the metric that step was measuring and marks
        the ones after it skipped."""
        cut = False
        for m in self.metrics:
            done = tool in self.results.get(m.key, {})
            if m.workload != workload or m.key in skip or done:
                continue
            if status != "timeout":
                self.rec(tool, m.key, None, status, note)
            elif not cut and seconds is not None:
                self.rec(tool, m.key, seconds, "timeout", note)
            else:
                self.rec(tool, m.key, None, "skipped", f"not run: {note}")
            cut = True

    def new_mount(
        self, tool: str, workload: str, endpoint: str, tag: str = "", link: bool = True
    ) -> Mount:
        """A mount of the tool's bucket through ``endpoint``; with --far-ms (and ``link``)
        a far link of its own is started in front of ``endpoint`` first."""
        assert self.ctx is not None
        name = f"{tool}-{workload}{tag}"
        mode = "write" if workload in WRITE_WORKLOADS else "read"
        far = None
        if self.args.far_ms and link:
            far = FarLink(endpoint, self.args.far_ms, self.tmp / "work" / name).start()
            self.links.append(far)
            endpoint = far.endpoint
        m = MOUNTS[tool](
            self.ctx.env,
            endpoint,
            self.ctx.buckets[tool],
            self.tmp / "mnt" / name,
            self.tmp / "work" / name,
            mode,
        )
        m.link = far
        return m

    def start(self, m: Mount) -> Mount:
        self.live.append(m)
        m.start()
        return m

    def stop(self, m: Mount, hung: bool = False) -> float:
        try:
            return m.stop(grace=5.0) if hung else m.stop()
        finally:
            if m in self.live:
                self.live.remove(m)
            if m.link is not None:
                m.link_stats = m.link.stop()
                self.links.remove(m.link)
                m.link = None

    def fbmount_requests(self, m: Mount) -> dict[str, int] | None:
        """The S3 requests fbmount made on this mount so far (`fbmount status --json`)."""
        if m.tool != "fbmount" or m.proc is None or m.proc.poll() is not None:
            return None
        res = run([sys.executable, "-m", "fbmount", "status", str(m.mnt), "--json"], 15)
        try:
            return dict(json.loads(res.stdout)["requests"])
        except (ValueError, KeyError, TypeError):
            return None

    # ------------------------------------------------------------------ phases
    def setup(self) -> None:
        self.server.start()
        access, secret = self.server.access_key, self.server.secret_key
        env = s3u.rclone_env(self.tmp, self.server.endpoint, access, secret)
        env.update({"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret})
        s3 = s3u.client(self.server.endpoint, access, secret)
        self.ctx = Ctx(self.tmp, self.sizes, self.server.endpoint, access, secret, s3, env)
        names = list(self.args.tools) + (["native"] if "raw" in self.args.wl else [])
        wl = set(self.args.wl)
        for name in names:
            bucket = f"bench-{name}"
            self.ctx.buckets[name] = bucket
            s3u.create_bucket(s3, bucket)
        for tool in self.args.tools:
            t = time.monotonic()
            seed_bucket(self.ctx, self.ctx.buckets[tool], wl, max(60.0, self.sizes.timeout))
            _say(self.t0, f"seeded {self.ctx.buckets[tool]} in {time.monotonic() - t:.1f} s")
        if {"rsync", "rm"} & wl:
            _ = self.ctx.tree
        if "randread" in wl and set(self.args.count) & set(self.args.tools):
            sys.path.insert(0, str(REPO))
            try:
                from tests.faultproxy import FaultProxy

                self.proxy = FaultProxy(self.server.endpoint).start()
            except Exception as e:  # the count is a bonus; never fail the run for it
                _say(self.t0, f"request-counting proxy unavailable ({e}); GETs not counted")

    def run_workload(self, workload: str, tool: str) -> None:
        assert self.ctx is not None
        budget = Budget(self.sizes.timeout)
        m = self.new_mount(tool, workload, self.ctx.endpoint)

        def rec(metric: str, value: float | None, status: str = "ok", note: str = "") -> None:
            self.rec(tool, metric, value, status, note)

        hung = False
        try:
            self.start(m)
            if workload == "rm" and "rsync" not in self.args.wl:
                prepare_rm(self.ctx, m, budget)
                self.stop(m)
                m = self.new_mount(tool, workload, self.ctx.endpoint, "-2")
                self.start(m)
            WORKLOAD_FUNCS[workload](self.ctx, m, budget, rec)
        except StepTimeout as e:
            hung = True
            self.mark_rest(workload, tool, "timeout", str(e), seconds=e.seconds)
        except KeyboardInterrupt:
            raise
        except Exception as e:
            note = describe_failure(e)
            tail = m.log_tail(3)
            self.mark_rest(workload, tool, "error", note + (f" [log: {tail}]" if tail else ""))
        finally:
            st = m.stats() or {}
            reqs = self.fbmount_requests(m)
            if reqs is not None:
                st["requests"] = reqs
            st["unmount_s"] = round(self.stop(m, hung), 2)
            if m.link_stats:
                st["link"] = m.link_stats
            self.stats.setdefault(workload, {})[tool] = st

    def count_gets(self, tool: str) -> None:
        """Untimed pass: the random reads again on a fresh mount through the counting proxy."""
        assert self.ctx is not None and self.proxy is not None
        budget = Budget(self.sizes.timeout)
        m = self.new_mount(tool, "randread", self.proxy.endpoint, "-count")
        hung = False
        try:
            self.start(m)
            self.proxy.reset()
            out = w_randread(self.ctx, m, budget, lambda *a, **k: None, metric="")
            self.proxy.wait_idle(timeout=5, settle=0.5)
            note = (
                f"{self.proxy.bytes_out / MB:.1f} MB downloaded, {self.proxy.total} "
                f"requests in all (through the counting proxy)"
            )
            self.rec(tool, "randread_gets", self.proxy.counts["GetObject"], out["status"], note)
        except StepTimeout as e:
            hung = True
            self.rec(tool, "randread_gets", None, "timeout", str(e))
        except KeyboardInterrupt:
            raise
        except Exception as e:
            self.rec(tool, "randread_gets", None, "error", describe_failure(e))
        finally:
            self.stop(m, hung)

    def run_raw(self) -> None:
        assert self.ctx is not None
        budget = Budget(self.sizes.timeout)

        def rec(metric: str, value: float | None, status: str = "ok", note: str = "") -> None:
            self.rec("native", metric, value, status, note)

        far = None
        env = self.ctx.env
        try:
            if self.args.far_ms:  # the ceiling over the same kind of link as the mounts
                far = FarLink(self.ctx.endpoint, self.args.far_ms, self.tmp / "work" / "raw")
                self.links.append(far.start())
                env = dict(
                    env, **{f"RCLONE_CONFIG_{s3u.RCLONE_REMOTE.upper()}_ENDPOINT": far.endpoint}
                )
            w_raw(self.ctx, self.ctx.buckets["native"], budget, rec, env)
        except StepTimeout as e:
            self.mark_rest("raw", "native", "timeout", str(e), seconds=e.seconds)
        except Exception as e:
            self.mark_rest("raw", "native", "error", describe_failure(e))
        finally:
            if far is not None:
                st = far.stop()
                self.links.remove(far)
                self.stats.setdefault("raw", {})["native"] = {"link": st}

    def progress(self, workload: str, tool: str) -> None:
        parts = []
        for m in self.metrics:
            if m.workload == workload and tool in self.results.get(m.key, {}):
                parts.append(f"{m.key}={report.cell(self.results[m.key][tool])}")
        st = self.stats.get(workload, {}).get(tool)
        if st and "cpu_s" in st:
            parts.append(f"cpu={st['cpu_s']}s hwm={st['hwm_mib']:.0f}MiB")
        if st and "link" in st:
            parts.append(f"connections={st['link'].get('connections')}")
        if st and "requests" in st:
            parts.append(f"requests={sum(st['requests'].values())}")
        _say(self.t0, f"{workload:<10} {tool:<8} " + " ".join(parts))

    def run_all(self) -> None:
        for workload in self.args.wl:
            self.load[workload] = list(os.getloadavg())
            if workload == "raw":
                self.run_raw()
                self.progress(workload, "native")
                continue
            for tool in self.args.tools:
                self.run_workload(workload, tool)
                self.progress(workload, tool)
            if workload == "randread" and self.proxy is not None:
                for tool in self.args.tools:
                    if tool in self.args.count:
                        self.count_gets(tool)
                        self.progress(workload, tool)

    def meta(self) -> dict:
        return {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "mode": "quick" if self.args.quick else "full",
            "link": link_label(self.args.far_ms),
            "far_ms": self.args.far_ms,
            "host": {
                "kernel": platform.release(),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
            },
            "versions": {
                "fbmount": _version([sys.executable, "-m", "fbmount", "--version"]),
                "s3fs": _version(["s3fs", "--version"]),
                "rclone": _version(["rclone", "version"]),
                "weed": _version([find_weed(), "version"]),
            },
            "sizes": dataclasses.asdict(self.sizes),
            "loadavg_before_each_workload": self.load,
            "elapsed_s": round(time.monotonic() - self.t0, 1),
            "mount_commands": self.mount_commands(),
        }

    def mount_commands(self) -> dict[str, list[str]]:
        out = {}
        if self.ctx is None:
            return out
        for tool in self.args.tools:
            for mode in ("read", "write"):
                wl = "rsync" if mode == "write" else "seqread"
                argv = self.new_mount(tool, wl, self.ctx.endpoint, link=False).argv()
                out[f"{tool} ({mode})"] = argv
        return out

    def write_report(self) -> str:
        tools = list(self.args.tools) + (["native"] if "raw" in self.args.wl else [])
        text = link_label(self.args.far_ms) + "\n"
        text += report.table(self.metrics, self.results, self.stats, tools)
        load = ", ".join(f"{w} {v[0]:.1f}" for w, v in self.load.items())
        text += f"\n1-min load average when each workload started (2 cores): {load}"
        counts = report.requests(self.stats, self.args.wl, tools)
        if counts:
            text += "\n" + counts
        extra = report.notes(self.metrics, self.results)
        out: Path = self.args.out
        out.mkdir(parents=True, exist_ok=True)
        stem = "bench-quick" if self.args.quick else "bench-full"
        if self.args.far_ms:
            stem += f"-far{self.args.far_ms:g}ms"
        meta = self.meta()
        payload = {
            "meta": meta,
            "metrics": [dataclasses.asdict(m) for m in self.metrics],
            "results": self.results,
            "fs_daemon_stats": self.stats,
            "table": text,
        }
        report.save_json(out / f"{stem}.json", payload)
        (out / f"{stem}.txt").write_text(text + ("\n\nnotes:\n" + extra if extra else "") + "\n")
        err = report.save_png(
            out / f"{stem}.png",
            self.metrics,
            self.results,
            tools,
            f"fbmount benchmark ({meta['mode']}, {meta['date']}, SeaweedFS, 2 cores)\n"
            + link_label(self.args.far_ms),
        )
        if err:
            _say(self.t0, err)
        _say(self.t0, f"wrote {out / stem}.json/.txt/.png")
        return text + ("\n\nnotes:\n" + extra if extra else "")

    def cleanup(self) -> None:
        for m in list(self.live):
            with contextlib.suppress(Exception):
                self.stop(m, hung=True)
        for link in list(self.links):
            with contextlib.suppress(Exception):
                link.stop()
        if self.proxy is not None:
            with contextlib.suppress(Exception):
                self.proxy.close()
        with contextlib.suppress(Exception):
            self.server.stop()
        if not self.args.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            _say(self.t0, f"kept {self.tmp}")


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    for binary in ("s3fs" if "s3fs" in args.tools else None, "rclone", "fusermount3", "rsync"):
        if binary and shutil.which(binary) is None:
            print(f"bench: {binary} not found on PATH", file=sys.stderr)
            return 1
    if os.geteuid() != 0:
        print(
            "bench: not root: cannot drop the page cache; 'cold' reads may be warm", file=sys.stderr
        )
    signal.signal(signal.SIGTERM, _sigterm)
    runs: list[Runner] = []
    for far_ms in args.links:  # one whole run per link, each with its own server
        runner = Runner(argparse.Namespace(**{**vars(args), "far_ms": far_ms}))
        _say(
            runner.t0,
            f"scratch {runner.tmp}; tools {args.tools}; workloads {args.wl}; "
            f"timeout {runner.sizes.timeout:.0f} s per workload and tool; " + link_label(far_ms),
        )
        try:
            runner.setup()
            _say(runner.t0, f"SeaweedFS at {runner.server.endpoint}")
            runner.run_all()
            print(runner.write_report(), flush=True)
            runs.append(runner)
        except KeyboardInterrupt:
            _say(runner.t0, "interrupted; cleaning up")
            return 130
        finally:
            runner.cleanup()
    if len(runs) > 1:
        print("\n" + write_links_report(args, runs))
    return 0


def link_name(far_ms: float) -> str:
    return f"far {2 * far_ms:g} ms RTT" if far_ms else "loopback"


def write_links_report(args: argparse.Namespace, runs: list[Runner]) -> str:
    """The runs of one command on several links, side by side (README's table)."""
    text = "Every link, one command: " + "; ".join(link_label(r.args.far_ms) for r in runs)
    text += "\n" + report.links_table(
        runs[0].metrics, [(link_name(r.args.far_ms), r.results) for r in runs]
    )
    stem = ("bench-quick" if args.quick else "bench-full") + "-links"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.txt").write_text(text + "\n")
    report.save_json(
        args.out / f"{stem}.json",
        {r.args.far_ms: {"meta": r.meta(), "results": r.results, "stats": r.stats} for r in runs},
    )
    return text


if __name__ == "__main__":
    raise SystemExit(main())
