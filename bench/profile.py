"""Where a Tiffin worker's time goes under load: py-spy samples while the open-loop generator runs.

    python -m bench.profile [--workload score_fraud] [--rate 100] [--seconds 20]

Starts the same seeded Redis and `bentoml serve service:Tiffin` as `bench.run`, offers a constant
rate, and samples every worker with `py-spy record --subprocesses --nonblocking` (folded stacks in
`bench/results/profile-<workload>.folded`, loadable by speedscope or flamegraph.pl). Prints the
share of worker samples per function (self time) and for a few inclusive buckets, plus the
measured CPU per request, so the share can be read as milliseconds per request.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from bench import systems as sysmod
from bench.loadgen import encode_post, run_step
from bench.workloads import WORKLOADS, bodies

# Inclusive buckets: a sample counts for the first bucket whose marker appears in its stack.
BUCKETS = (
    ("feature attribution (contributions)", ("contributions (", "attribution.py")),
    ("ONNX Runtime / model predict", ("Session.run", "OnnxPredictor.predict")),
    ("Redis fetch (redis.asyncio + hiredis)", ("fetch (tiffin/feature_store.py",)),
    ("response socket writes (uvicorn transport)", ("RequestResponseCycle.send (",)),
    ("logging (access log)", ("logging/__init__.py",)),
    ("response serialisation", ("serialize", "model_dump", "to_response", "dumps")),
    ("request parsing / validation", ("from_request", "model_validate", "parse_request")),
    ("metrics and tracing (Prometheus, OpenTelemetry)", ("prometheus", "opentelemetry", "trace/")),
)


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("py-spy is required: pip install py-spy (in the dev extra)")
    return found


def summarize(folded: Path, top: int = 30) -> str:
    """Shares of worker samples: buckets, inclusive functions and self time."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        # the arbiter and other helpers; a line py-spy broke at a newline inside a frame name
        if "worker.service" not in stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        if not frames:
            continue
        total += count
        self_time[frames[-1]] += count
        for f in set(frames):
            inclusive[f] += count
        for name, markers in BUCKETS:
            if any(m in stack for m in markers):
                buckets[name] += count
                break
        else:
            buckets["everything else (BentoML/Starlette/uvicorn, handler code)"] += count
    if not total:
        return "no worker samples"
    pct = 100 / total
    lines = [f"{total} samples in worker processes", "", "buckets (first match wins):"]
    lines += [f"  {n * pct:5.1f}%  {name}" for name, n in buckets.most_common()]
    lines += ["", f"top {top} functions, inclusive:"]
    lines += [f"  {n * pct:5.1f}%  {name[:140]}" for name, n in inclusive.most_common(top)]
    lines += ["", f"top {top} functions, self:"]
    lines += [f"  {n * pct:5.1f}%  {name[:140]}" for name, n in self_time.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="score_fraud", choices=list(WORKLOADS))
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    py_spy = _py_spy()
    out = sysmod.RESULTS / f"profile-{args.workload}.folded"
    out.parent.mkdir(parents=True, exist_ok=True)
    redis = sysmod.Redis()
    system = sysmod.tiffin(redis.url, args.workers)
    try:
        system.start()
        path, raw = bodies(WORKLOADS[args.workload], "tiffin")
        reqs = [encode_post("127.0.0.1", system.port, path, b) for b in raw]
        run_step("127.0.0.1", system.port, reqs, args.rate, 3)  # warm-up
        assert system.proc is not None
        spy = subprocess.Popen(
            [
                py_spy,
                "record",
                "--pid",
                str(system.proc.pid),
                "--subprocesses",
                "--nonblocking",
                "--rate",
                "250",
                "--duration",
                str(int(args.seconds)),
                "--format",
                "raw",
                "--output",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(1.0)
        before = sysmod.sample(system.processes())
        result: list[object] = []
        loader = threading.Thread(
            target=lambda: result.append(
                run_step("127.0.0.1", system.port, reqs, args.rate, args.seconds - 2)
            )
        )
        loader.start()
        loader.join()
        after = sysmod.sample(system.processes())
        spy.wait(args.seconds + 30)
        step = result[0]
        ok = getattr(step, "ok", 0)
        cpu_ms = (after.cpu_s - before.cpu_s) * 1000 / max(ok, 1)
        print(
            f"{args.workload} at {args.rate:g}/s: {ok} ok, p50 {getattr(step, 'p50_ms', 0)} ms, "
            f"p99 {getattr(step, 'p99_ms', 0)} ms, server CPU {cpu_ms:.2f} ms/request "
            f"(all processes in the tree)"
        )
        if not out.exists():
            err = spy.stderr.read().decode() if spy.stderr else ""
            raise SystemExit(f"py-spy wrote nothing: {err[-2000:]}")
        print(summarize(out))
        print(f"\nfolded stacks: {out}")
    finally:
        system.stop()
        redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
