"""Tiffin's benchmark: open-loop load stepped until p99 breaks, Tiffin and its peers in one run.

    python -m bench.run                       # everything (`make bench`), 11-14 minutes
    python -m bench.run --quick               # shorter steps, one refinement, ~7 minutes
    python -m bench.run --systems tiffin --workloads score_fraud   # iterate on one endpoint
    python -m bench.run --url http://127.0.0.1:3000 --workloads score_fraud  # a running Tiffin

Every system is started first, each its own process tree on 127.0.0.1 against one seeded
redis-server, and stays up side by side: `tiffin` (bentoml serve service:Tiffin), `seed`
(bench/baselines/seed_style.py), `reference` (bench/baselines/reference.py), `mlserver` (MLServer
1.7.1 in bench/.venvs/mlserver). Then, workload by workload, the systems that serve it are ramped
in lockstep (round by round each takes its next step), so bursts of outside load on this shared box
fall on all of them alike. A step offers a constant arrival rate (`bench.loadgen`: open loop,
latency from the scheduled send time, HDR histogram); a ramp doubles from the workload's start
rate until a step breaks (p99 over the workload's SLO, more than 0.1% errors, achieved rate under
95% of offered; every break is confirmed by a second try), then bisects between the last good and
the first bad rate. The highest good rate is the maximum sustained rate. Each step records CPU
seconds per request and RSS summed over the system's whole process tree, the shared Redis's CPU,
and the CPU used by processes outside the benchmark. Tiffin then holds half its maximum rate
twice as long, for the latency of a half-loaded server.
Results: a table on stdout, `bench/results/latest.json` and `bench/results/latest.md`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from bench import systems as sysmod
from bench.loadgen import StepResult, encode_post, run_step
from bench.workloads import WORKLOADS, Workload, bodies

MAX_ERROR_RATE = 0.001
MIN_ACHIEVED = 0.95
MAX_RATE = 20_000.0  # the generator's own ceiling on this box (python -m bench.loadgen --selftest)
SYSTEM_ORDER = ("tiffin", "tiffin_baseline", "tiffin_separate", "seed", "reference", "mlserver")
# A break is confirmed by running the same step once more: on a shared 2-core box one stall of
# another process (or of the system itself) can push a short step's p99 over the line. The
# knee is the highest rate that held in one of its two tries (`tries` in the JSON).
CONFIRM_TRIES = 2


@dataclass
class Step:
    result: StepResult
    cpu_ms_per_req: float
    redis_cpu_ms_per_req: float
    generator_cpu_ms_per_req: float
    rss_mb: float
    passed: bool
    why: str
    other_cores: float = 0.0  # CPU used by processes outside this benchmark (a shared box)
    tries: int = 1

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.result.as_dict(),
            "cpu_ms_per_req": self.cpu_ms_per_req,
            "redis_cpu_ms_per_req": self.redis_cpu_ms_per_req,
            "generator_cpu_ms_per_req": self.generator_cpu_ms_per_req,
            "rss_mb": self.rss_mb,
            "passed": self.passed,
            "why": self.why,
            "other_cores": self.other_cores,
            "tries": self.tries,
        }


@dataclass
class Ramp:
    system: str
    workload: str
    steps: list[Step] = field(default_factory=list)
    best: Step | None = None
    half: Step | None = None

    @property
    def max_rps(self) -> float:
        return self.best.result.offered_rps if self.best else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "workload": self.workload,
            "max_sustained_rps": self.max_rps,
            "best": self.best.as_dict() if self.best else None,
            "half_load": self.half.as_dict() if self.half else None,
            "steps": [s.as_dict() for s in self.steps],
            "errors_below_knee": sum(
                s.result.n_errors for s in self.steps if s.passed and s.result.offered_rps
            ),
        }


class Measured:
    """Runs steps against one system and charges CPU to it, to Redis and to the generator."""

    def __init__(self, system: sysmod.System | None, redis: sysmod.Redis | None) -> None:
        self.system = system
        self.redis = redis
        self.me = psutil.Process()
        self.peak_rss_mb = 0.0

    def settle(self, minimum: float, limit: float = 30.0) -> None:
        """Wait until the system is idle (< 10% of a core), so a broken step's queue is gone."""
        time.sleep(minimum)
        if self.system is None:
            return
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            before = sysmod.sample(self.system.processes()).cpu_s
            time.sleep(0.5)
            if sysmod.sample(self.system.processes()).cpu_s - before < 0.05:
                return

    def step(
        self, host: str, port: int, reqs: list[bytes], rate: float, duration: float, slo: float
    ) -> Step:
        procs = self.system.processes() if self.system else []
        before = sysmod.sample(procs)
        redis0 = self.redis.cpu_s() if self.redis else 0.0
        gen0 = sum(self.me.cpu_times()[:2])
        busy0, wall0 = _busy_s(), time.perf_counter()
        result = run_step(host, port, reqs, rate, duration)
        busy, wall = _busy_s() - busy0, time.perf_counter() - wall0
        gen = sum(self.me.cpu_times()[:2]) - gen0
        redis = (self.redis.cpu_s() if self.redis else 0.0) - redis0
        after = sysmod.sample(self.system.processes() if self.system else [])
        done = max(result.ok + result.n_errors, 1)
        rss_mb = after.rss_bytes / 2**20
        self.peak_rss_mb = max(self.peak_rss_mb, rss_mb)
        why = []
        if result.p99_ms >= slo:
            why.append(f"p99 {result.p99_ms:.1f} >= {slo:g} ms")
        if result.error_rate > MAX_ERROR_RATE:
            why.append(f"errors {result.error_rate:.2%} {dict(result.errors)}")
        if result.aborted:
            why.append("aborted: over 1 s of arrivals queued in the generator")
        elif result.achieved_rps < MIN_ACHIEVED * rate:
            why.append(f"achieved {result.achieved_rps:.0f} < {MIN_ACHIEVED:.0%} of offered")
        ours = (after.cpu_s - before.cpu_s) + redis + gen
        return Step(
            result,
            round((after.cpu_s - before.cpu_s) * 1000 / done, 3),
            round(redis * 1000 / done, 3),
            round(gen * 1000 / done, 3),
            round(rss_mb, 1),
            not why,
            "; ".join(why),
            round(max(busy - ours, 0.0) / wall, 2),
        )


def _busy_s() -> float:
    """CPU seconds the whole machine has spent busy (every process, every core)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def plan(start: float, refine: int) -> Generator[float, bool, None]:
    """The rates of one ramp: double until a step breaks, then bisect (geometric) `refine` times.

    Sent whether each step held; if even the start rate breaks, walk down by halves.
    """
    good: float | None = None
    bad: float | None = None
    rate = start
    while rate <= MAX_RATE:
        if (yield rate):
            good, rate = rate, rate * 2
        else:
            bad = rate
            break
    if good is None and bad is not None:
        rate = bad / 2
        for _ in range(4):
            if (yield rate):
                good = rate
                break
            bad, rate = rate, rate / 2
    if good is not None and bad is not None:
        for _ in range(refine):
            mid = math.sqrt(good * bad)
            if (yield mid):
                good = mid
            else:
                bad = mid


class Runner:
    """Runs one system's steps for one workload, confirming every break with a second try."""

    def __init__(
        self,
        measured: Measured,
        system: str,
        port: int,
        workload: Workload,
        host: str = "127.0.0.1",
    ) -> None:
        path, raw = bodies(workload, system)
        self.reqs = [encode_post(host, port, path, b) for b in raw]
        self.measured = measured
        self.host = host
        self.port = port
        self.system = system
        self.workload = workload
        self.ramp = Ramp(system, workload.name)

    def run(self, rate: float, seconds: float, label: str = "") -> Step:
        slo = self.workload.slo_p99_ms
        for attempt in range(1, CONFIRM_TRIES + 1):
            s = self.measured.step(self.host, self.port, self.reqs, rate, seconds, slo)
            s.tries = attempt
            if s.passed or attempt == CONFIRM_TRIES or label:
                break
            _log(
                f"  (step at {rate:.1f}/s broke: {s.why}; other processes used "
                f"{s.other_cores:.2f} cores; confirming)"
            )
            self.measured.settle(2.0)
        r = s.result
        _log(
            f"{label or '  '}{self.system:<10}{self.workload.name:<16}{rate:>9.1f}/s -> "
            f"{r.achieved_rps:>8.1f}/s "
            f"p50 {r.p50_ms:>7.2f} p99 {r.p99_ms:>8.2f} p99.9 {r.p999_ms:>8.2f} ms "
            f"err {r.n_errors:<5} cpu {s.cpu_ms_per_req:.2f} ms/req other {s.other_cores:.2f} "
            f"{'ok' if s.passed else 'BREAK: ' + s.why}"
        )
        self.measured.settle(0.5 if s.passed else 2.0)
        return s


def interleaved(
    runners: list[Runner], duration: float, refine: int, half_for: set[str]
) -> list[Ramp]:
    """Ramp every system of one workload in lockstep: round by round, each system takes its next
    step in turn, so a burst of outside load on this shared box falls on all of them alike."""
    for r in runners:
        r.run(r.workload.start_rps, min(2.0, duration), "w ")  # warm-up, not reported
    plans = {id(r): plan(r.workload.start_rps, refine) for r in runners}
    pending = {id(r): next(plans[id(r)]) for r in runners}
    while pending:
        for r in runners:
            rate = pending.get(id(r))
            if rate is None:
                continue
            step = r.run(rate, duration)
            r.ramp.steps.append(step)
            if step.passed and (r.ramp.best is None or rate > r.ramp.max_rps):
                r.ramp.best = step
            try:
                pending[id(r)] = plans[id(r)].send(step.passed)
            except StopIteration:
                del pending[id(r)]
    for r in runners:
        if r.system in half_for and r.ramp.best is not None:
            r.ramp.half = r.run(r.ramp.max_rps / 2, duration * 2)
    return [r.ramp for r in runners]


# --- report ---------------------------------------------------------------------------------------


def _row(r: Ramp) -> list[str]:
    b = r.best
    wl = WORKLOADS[r.workload]
    if b is None:
        return [r.workload, r.system, "0", "–", "–", "–", "–", "–", "–", "–", "–", "–"]
    res = b.result
    rate = f"{r.max_rps:,.0f}"
    if wl.rows_per_request > 1:
        rate += f" ({r.max_rps * wl.rows_per_request:,.0f} rows/s)"
    return [
        r.workload,
        r.system,
        rate,
        f"{res.achieved_rps:,.0f}",
        f"{res.p50_ms:.2f}",
        f"{res.p99_ms:.2f}",
        f"{res.p999_ms:.2f}",
        f"{res.n_errors}/{res.sent}",
        f"{b.cpu_ms_per_req:.2f}",
        f"{b.redis_cpu_ms_per_req:.3f}",
        f"{b.rss_mb:,.0f}",
        f"{b.other_cores:.2f}",
    ]


HEADERS = [
    "workload",
    "system",
    "max sustained req/s",
    "achieved req/s",
    "p50 ms",
    "p99 ms",
    "p99.9 ms",
    "errors/sent",
    "server CPU ms/req",
    "Redis CPU ms/req",
    "RSS MB",
    "other load, cores",
]


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |"]
    lines.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(headers))) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*headers), *(fmt.format(*r) for r in rows)])


def targets(
    ramps: dict[tuple[str, str], Ramp], rss: dict[str, float]
) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for each of issue 3's targets that this run measured."""
    out: list[tuple[str, str, str]] = []

    def mx(system: str, workload: str) -> float | None:
        r = ramps.get((system, workload))
        return r.max_rps if r else None

    def ratio(name: str, a: float | None, b: float | None, need: float) -> None:
        if a is None or b is None:
            return
        value = a / b if b else math.inf
        out.append(
            (name, f"{a:,.0f} / {b:,.0f} = {value:.2f}×", "met" if value >= need else "MISSED")
        )

    t = mx("tiffin", "score_fraud")
    ratio("/score/fraud ≥ 0.8× reference", t, mx("reference", "score_fraud"), 0.8)
    ratio("/score/fraud ≥ 3× seed-style", t, mx("seed", "score_fraud"), 3.0)
    ratio(
        "generic predict ≥ 5× MLServer",
        mx("tiffin", "predict_generic"),
        mx("mlserver", "predict_generic"),
        5.0,
    )
    for (system, workload), r in ramps.items():
        if system != "tiffin" or r.half is None:
            continue
        p99 = r.half.result.p99_ms
        errs = r.half.result.n_errors
        out.append(
            (
                f"{workload}: p99 ≤ 10 ms at half max ({r.half.result.offered_rps:,.0f}/s)",
                f"p99 {p99:.2f} ms, {errs} errors",
                "met" if p99 <= 10 and errs == 0 else "MISSED",
            )
        )
    b = mx("tiffin", "score_batch")
    if b is not None:
        rows = b * WORKLOADS["score_batch"].rows_per_request
        out.append(
            (
                "/score/batch 256 rows ≥ 50,000 rows/s",
                f"{rows:,.0f} rows/s",
                "met" if rows >= 50_000 else "MISSED",
            )
        )
    if "tiffin" in rss:
        out.append(
            (
                "whole bundle ≤ 600 MB RSS",
                f"{rss['tiffin']:,.0f} MB",
                "met" if rss["tiffin"] <= 600 else "MISSED",
            )
        )
    for (system, workload), r in ramps.items():
        if system != "tiffin":
            continue
        errs = sum(s.result.n_errors for s in r.steps if s.passed)
        out.append(
            (
                f"{workload}: zero failed requests below the knee",
                f"{errs} failed",
                "met" if errs == 0 else "MISSED",
            )
        )
    return out


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in (
        "bentoml",
        "fastapi",
        "starlette",
        "uvicorn",
        "uvloop",
        "pydantic",
        "onnxruntime",
        "xgboost",
        "redis",
        "hiredis",
        "orjson",
        "numpy",
        "hdrhistogram",
    ):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    import subprocess

    ml = sysmod.MLSERVER_VENV / "bin" / "python"
    if ml.exists():
        code = (
            "from importlib.metadata import version as v; "
            "print(v('mlserver'), v('mlserver-xgboost'), v('starlette'), v('uvloop'))"
        )
        got = subprocess.run([str(ml), "-c", code], capture_output=True, text=True)
        if got.returncode == 0:
            a, b, c, d = got.stdout.split()
            out["mlserver venv"] = f"mlserver {a}, mlserver-xgboost {b}, starlette {c}, uvloop {d}"
    try:
        redis_v = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
        out["redis-server"] = redis_v.stdout.split()[2].removeprefix("v=")
    except (OSError, IndexError):
        pass
    return out


def revision() -> str:
    """The commit measured, and any uncommitted changes to what is served (read-only git)."""
    import subprocess

    def git(*args: str) -> str:
        got = subprocess.run(["git", *args], cwd=sysmod.REPO, capture_output=True, text=True)
        return got.stdout.strip() if got.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = [
        line[3:]
        for line in git("status", "--porcelain").splitlines()
        if line[3:].startswith(("service.py", "tiffin/", "runners/", "models/", "bench/"))
    ]
    return head + (f" + uncommitted changes to {', '.join(dirty)}" if dirty else "")


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = psutil.virtual_memory().total / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, {platform.platform()}"


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # run the `finally` blocks: stop every server we started


def main(argv: list[str] | None = None) -> int:
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    parser = argparse.ArgumentParser(description="Open-loop benchmark of Tiffin and its peers")
    parser.add_argument(
        "--systems",
        default="tiffin,seed,reference,mlserver",
        help=f"any of {','.join(SYSTEM_ORDER)} (tiffin_separate: runners in their own processes)",
    )
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per load step")
    parser.add_argument("--refine", type=int, default=2, help="bisection steps after the break")
    parser.add_argument("--quick", action="store_true", help="2.5 s steps, 1 bisection")
    parser.add_argument("--url", help="measure an already running Tiffin (no CPU/RSS)")
    parser.add_argument("--workers", type=int, default=2, help="Tiffin entry workers")
    parser.add_argument("--reference-contribs", choices=("path", "treeshap"), default="path")
    parser.add_argument("--rss-exclude", default="llm", help="regex: processes left out of RSS")
    parser.add_argument(
        "--llm",
        action="store_true",
        help="load the LLM in Tiffin's entry workers too (default: tabular bundle only)",
    )
    parser.add_argument("--no-half", action="store_true", help="skip Tiffin's half-load step")
    parser.add_argument(
        "--half-systems",
        default="tiffin",
        help="systems that hold half their maximum rate (tiffin,reference: whose tails?)",
    )
    parser.add_argument(
        "--baseline",
        help="another Tiffin checkout (git worktree) served as tiffin_baseline, for an A/B",
    )
    parser.add_argument("--out", default=str(sysmod.RESULTS / "latest"))
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.refine = 2.5, 1
    chosen = [s for s in SYSTEM_ORDER if s in args.systems.split(",")]
    loads = [WORKLOADS[w] for w in args.workloads.split(",")]
    started = time.perf_counter()
    measured_revision = revision()  # before any server starts: what they import
    ramps: dict[tuple[str, str], Ramp] = {}
    rss: dict[str, float] = {}
    procs: dict[str, list[dict[str, object]]] = {}
    startup: dict[str, float] = {}
    redis: sysmod.Redis | None = None
    try:
        if args.url:
            from urllib.parse import urlsplit

            u = urlsplit(args.url)
            m = Measured(None, None)
            half = set() if args.no_half else {"tiffin"}
            for wl in loads:
                if "tiffin" in wl.routes:
                    one = Runner(m, "tiffin", u.port or 80, wl, u.hostname or "127.0.0.1")
                    (only,) = interleaved([one], args.duration, args.refine, half)
                    ramps[("tiffin", wl.name)] = only
        else:
            _log("starting a seeded redis-server ...")
            redis = sysmod.Redis()
            running: dict[str, sysmod.System] = {}
            measured: dict[str, Measured] = {}
            try:
                for name in chosen:  # every system up side by side, idle until its turn
                    if not any(name in wl.routes for wl in loads):
                        continue
                    if name == "tiffin":
                        system = sysmod.tiffin(
                            redis.url, args.workers, args.rss_exclude, llm=args.llm
                        )
                    elif name == "tiffin_baseline":
                        if not args.baseline:
                            raise SystemExit("tiffin_baseline needs --baseline DIR")
                        system = sysmod.tiffin(
                            redis.url,
                            args.workers,
                            args.rss_exclude,
                            llm=args.llm,
                            checkout=Path(args.baseline),
                        )
                    elif name == "tiffin_separate":
                        system = sysmod.tiffin(
                            redis.url,
                            args.workers,
                            args.rss_exclude,
                            llm=args.llm,
                            topology="separate",
                        )
                    elif name == "reference":
                        system = sysmod.reference(redis.url, args.reference_contribs)
                    else:
                        system = sysmod.FACTORIES[name](redis.url)
                    _log(f"starting {system.title} ...")
                    running[name] = system
                    system.start()
                    startup[name] = round(system.started_s, 1)
                    measured[name] = Measured(system, redis)
                half_for = set() if args.no_half else set(args.half_systems.split(","))
                for wl in loads:
                    runners = [
                        Runner(measured[n], n, running[n].port, wl)
                        for n in chosen
                        if n in wl.routes and n in running
                    ]
                    for done in interleaved(runners, args.duration, args.refine, half_for):
                        ramps[(done.system, done.workload)] = done
                for name, system in running.items():
                    rss[name] = round(measured[name].peak_rss_mb, 1)
                    procs[name] = sysmod.describe(system.processes())
            finally:
                for system in running.values():
                    system.stop()
    finally:
        if redis is not None:
            redis.stop()
    elapsed = time.perf_counter() - started

    ordered = sorted(
        ramps.values(),
        key=lambda r: (list(WORKLOADS).index(r.workload), SYSTEM_ORDER.index(r.system)),
    )
    rows = [_row(r) for r in ordered]
    checks = targets(ramps, rss)
    print()
    print(text_table(HEADERS, rows))
    if any(r.half for r in ordered):
        print("\nAt half the maximum sustained rate:")
        for r in ordered:
            if r.half:
                h = r.half.result
                print(
                    f"  {r.workload:<16}{r.system:<10}{h.offered_rps:>8.0f}/s  p50 {h.p50_ms:.2f}"
                    f"  p99 {h.p99_ms:.2f}"
                    f"  p99.9 {h.p999_ms:.2f} ms  errors {h.n_errors}/{h.sent}"
                    f"  CPU {r.half.cpu_ms_per_req:.2f} ms/req"
                    f"  other load {r.half.other_cores:.2f} cores"
                )
    if rss:
        print(
            "\nPeak RSS of each process tree (MB): "
            + ", ".join(f"{k} {v:,.0f}" for k, v in rss.items())
        )
    if checks:
        print()
        print(text_table(["target", "measured", "verdict"], [list(c) for c in checks]))
    print(f"\n{len(ordered)} ramps in {elapsed / 60:.1f} min")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "revision": measured_revision,
        "machine": machine(),
        "versions": versions(),
        "step_seconds": args.duration,
        "refine": args.refine,
        "elapsed_min": round(elapsed / 60, 1),
        "startup_s": startup,
        "peak_rss_mb": rss,
        "processes": procs,
    }
    out.with_suffix(".json").write_text(
        json.dumps({**meta, "ramps": [r.as_dict() for r in ordered], "targets": checks}, indent=2)
    )
    md = [
        f"Run {meta['when']}, `{meta['command']}`, {meta['elapsed_min']} min.",
        f"Revision: {meta['revision']}. Machine: {meta['machine']}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        "",
        markdown_table(HEADERS, rows),
        "",
        markdown_table(["target", "measured", "verdict"], [list(c) for c in checks])
        if checks
        else "",
    ]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    _log(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
