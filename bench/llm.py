"""Side-by-side LLM benchmark: `make bench-llm` (`python -m bench.llm`).

Tiffin (`bentoml serve service:Tiffin` with one worker by default, `--tiffin-workers`: one engine
batches every stream, as mlx_lm.server's one process does) and `mlx_lm.server` (mlx-lm's own
OpenAI-compatible server: one process, its own continuous batching and prompt cache, default
settings) are started on the same model directory on this machine, both up for the whole run,
and driven alternately level by level with the same load: C concurrent clients (closed loop)
each sending streamed OpenAI chat completions (`stream_options.include_usage`) until N requests
are done.

Per system and level: aggregate completion tokens/s (all tokens / wall time of the level), time to
first token p50/p99 (request sent → first content chunk), inter-token latency p99 (gaps between
consecutive content chunks of a stream), failures (non-200, errors, or a stream without its
usage). Then, on the bench-size model: constrained (`response_format` json_schema) vs
unconstrained decoding in Tiffin at 8 streams; the fraud-explanation prompt (one system prompt,
different facts) on both servers; and, servers stopped, Tiffin's engine in process with its
prefix cache off and on (TTFT). On the tiny model: the 12-schema test set sent concurrently with
every answer validated.

Models: the bench-size model (`python -m models.tiny_llm --bench`, 23M parameters, random
weights: compute dominates a decode step) and the default tiny model (where the zero-failure
target at 64 streams is set). Results: a Markdown table on stdout and in bench/results/llm-*.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
LEVELS = (1, 8, 32, 64)
BENCH_LEVELS = (1, 8, 32)  # the bench-size model: 64 streams there would double the run's time
TARGET_LEVELS = (8, 32)  # where the issue sets the tokens/s target against mlx_lm.server
PROMPT = "Summarise the risk of card {i} paying a new merchant abroad late at night."
# The shared-prefix workload: the fraud-explanation prompt (tiffin.llm.explain: one system prompt,
# then the facts of one transaction), as /score/fraud sends it.
FACTS = (
    "Transaction and model output:\n- card_id: card_{i:04d}\n- transaction_amount: {a}\n"
    "- fraud_score: 0.{s:02d}"
)


@dataclass
class Level:
    system: str
    model: str
    concurrency: int
    mode: str = "text"
    tokens: int = 0
    requests: int = 0
    failures: int = 0
    wall_s: float = 0.0
    ttft_s: list[float] = field(default_factory=list)
    gaps_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    def row(self) -> str:
        def q(xs: list[float], p: float) -> str:
            if not xs:
                return "–"
            xs = sorted(xs)
            return f"{xs[min(len(xs) - 1, round(p * (len(xs) - 1)))] * 1000:.0f}"

        return (
            f"| {self.model} | {self.concurrency} | {self.system} | {self.mode} | {self.requests} "
            f"| {self.tokens} | **{self.tokens_per_s:.0f}** | {q(self.ttft_s, 0.5)} | "
            f"{q(self.ttft_s, 0.99)} | {q(self.gaps_s, 0.99)} | {self.failures} |"
        )


HEADER = (
    "| model | streams | system | decoding | requests | completion tokens | tokens/s | "
    "TTFT p50 ms | TTFT p99 ms | ITL p99 ms | failures |\n"
    "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"
)


@dataclass
class Server:
    name: str
    url: str  # OpenAI base URL, ending in /v1
    model: str  # the `model` sent in requests
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        with_group = os.getpgid(self.proc.pid)
        os.killpg(with_group, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(with_group, signal.SIGKILL)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def address(port: int) -> tuple[str, ...]:
    return ("--host", "127.0.0.1", "--port", str(port))


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited; see {log}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} not ready after {timeout}s; see {log}")


def start_tiffin(model_tag: str, port: int, log: Path, workers: int) -> Server:
    env = {
        **os.environ,
        "TIFFIN_WORKERS": str(workers),
        "TIFFIN_LLM_MODEL_NAME": model_tag,
        "TIFFIN_ENVIRONMENT": "development",
        "JWT_SECRET_KEY": os.environ.get("JWT_SECRET_KEY", "bench-llm-" + "x" * 32),
        "TIFFIN_LLM_MAX_PROMPT_CHARS": "8000",
        "PYTHONPATH": str(REPO),  # this tree's tiffin, whatever the venv's editable install says
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*(sys.executable, "-m", "bentoml", "serve", "service:Tiffin"), *address(port)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    wait_ready(f"{base}/ready", proc, log)
    wait_ready(f"{base}/openai/v1/models", proc, log)
    return Server("tiffin", f"{base}/openai/v1", model_tag.split(":")[0], proc)


def start_mlx_lm_server(model_dir: str, port: int, log: Path) -> Server:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*(sys.executable, "-m", "mlx_lm.server", "--model", model_dir), *address(port)],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    wait_ready(f"{base}/v1/models", proc, log)
    return Server("mlx_lm.server", f"{base}/v1", "default_model", proc)


async def one_stream(
    client: httpx.AsyncClient, server: Server, body: dict[str, Any], level: Level
) -> str | None:
    """One streamed chat completion; returns the content, None on failure (recorded)."""
    sent = time.monotonic()
    last: float | None = None
    parts: list[str] = []
    usage: dict[str, Any] | None = None
    try:
        async with client.stream(
            "POST", f"{server.url}/chat/completions", json={**body, "model": server.model}
        ) as response:
            if response.status_code != 200:
                await response.aread()
                level.failures += 1
                level.errors.append(f"{response.status_code}: {response.text[:120]}")
                return None
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                choices = chunk.get("choices") or []
                delta = choices[0].get("delta", {}) if choices else {}
                text = delta.get("content")
                if text:
                    now = time.monotonic()
                    if last is None:
                        level.ttft_s.append(now - sent)
                    else:
                        level.gaps_s.append(now - last)
                    last = now
                    parts.append(text)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        level.failures += 1
        level.errors.append(f"{type(exc).__name__}: {exc}")
        return None
    if usage is None:
        level.failures += 1
        level.errors.append("stream ended without usage")
        return None
    level.tokens += int(usage.get("completion_tokens", 0))
    return "".join(parts)


async def run_level(
    server: Server,
    model: str,
    concurrency: int,
    requests: int,
    max_tokens: int,
    mode: str = "text",
    schema: dict[str, Any] | None = None,
    shared_prefix: bool = False,
) -> Level:
    level = Level(server.name, model, concurrency, mode)
    counter = iter(range(requests))

    async def client_loop(client: httpx.AsyncClient) -> None:
        for i in counter:
            body: dict[str, Any] = {
                "messages": fraud_messages(i) if shared_prefix else [user(PROMPT.format(i=i))],
                "max_tokens": max_tokens,
                "temperature": 0.7,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            if schema is not None:
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "answer", "schema": schema},
                }
            await one_stream(client, server, body, level)
            level.requests += 1

    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        started = time.monotonic()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        level.wall_s = time.monotonic() - started
    return level


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def fraud_messages(i: int) -> list[dict[str, str]]:
    from tiffin.llm.explain import SYSTEM

    facts = FACTS.format(i=i, a=round(20 + 7.3 * i, 2), s=(37 * i) % 100)
    return [{"role": "system", "content": SYSTEM}, user(facts)]


def prefix_cache_ab(tag: str, name: str, rounds: int = 2) -> tuple[list[Level], dict[str, Any]]:
    """The shared-prefix workload (8 streams, 16 requests, 32 tokens each) in process, Tiffin's
    engine with its prefix cache off and on, alternating (ABBA): TTFT and tokens/s."""
    from tiffin.llm.engine import Delta, Finished, Prompt
    from tiffin.llm.runtime import LLM
    from tiffin.llm.settings import LLMSettings

    pooled: dict[int, Level] = {}
    engines = {
        size: LLM.from_settings(LLMSettings(model_name=tag, prefix_cache_size=size))
        for size in (0, 64)
    }
    for r in range(rounds):
        for size in (0, 64) if r % 2 == 0 else (64, 0):
            llm = engines[size]
            mode = "prefix cache " + ("on" if size else "off")
            level = pooled.setdefault(size, Level("tiffin (in process)", name, 8, mode))
            counter = iter(range(16 * r, 16 * (r + 1)))

            async def client(llm: LLM = llm, level: Level = level, it: Any = counter) -> None:
                for i in it:
                    prompt = Prompt(messages=tuple(fraud_messages(i)))
                    sent = time.monotonic()
                    last: float | None = None
                    async for event in llm.stream(prompt, llm.params(32, 0.7)):
                        now = time.monotonic()
                        if isinstance(event, Delta) and event.text:
                            if last is None:
                                level.ttft_s.append(now - sent)
                            else:
                                level.gaps_s.append(now - last)
                            last = now
                        elif isinstance(event, Finished):
                            level.tokens += event.completion_tokens
                    level.requests += 1

            async def run(llm: LLM = llm, level: Level = level) -> None:
                started = time.monotonic()
                await asyncio.gather(*(client() for _ in range(8)))
                level.wall_s += time.monotonic() - started

            asyncio.run(run())
    on = engines[64].engine
    assert on is not None
    return [pooled[0], pooled[64]], on.status()["prefix_cache"]


async def schema_set(server: Server, model: str) -> tuple[int, int, list[str]]:
    """The 12-schema test set, each schema four times, all at once: (valid, total, problems)."""
    from jsonschema import Draft202012Validator

    from tests.test_llm_constrained import SCHEMAS

    level = Level(server.name, model, len(SCHEMAS) * 4, "schemas")
    problems: list[str] = []

    async def one(client: httpx.AsyncClient, name: str, k: int) -> bool:
        body = {
            "messages": [{"role": "user", "content": f"Give me a {name} as JSON ({k})."}],
            "max_tokens": 200,
            "temperature": 1.0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": name, "schema": SCHEMAS[name]},
            },
        }
        text = await one_stream(client, server, body, level)
        if text is None:
            problems.append(f"{name}: failed ({level.errors[-1] if level.errors else '?'})")
            return False
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.append(f"{name}: not JSON ({exc})")
            return False
        errors = [e.message for e in Draft202012Validator(SCHEMAS[name]).iter_errors(value)]
        if errors:
            problems.append(f"{name}: {errors[0]}")
        return not errors

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        results = await asyncio.gather(
            *(one(client, name, k) for name in sorted(SCHEMAS) for k in range(4))
        )
    return sum(results), len(results), problems


def merge(into: Level, part: Level) -> None:
    into.tokens += part.tokens
    into.requests += part.requests
    into.failures += part.failures
    into.wall_s += part.wall_s
    into.ttft_s += part.ttft_s
    into.gaps_s += part.gaps_s
    into.errors += part.errors


def ratios(rows: list[Level], per_round: dict[tuple[str, int, str], list[float]]) -> list[str]:
    """Tiffin tokens/s over mlx_lm.server tokens/s, per model and level (same run): pooled, and
    per round where there were several."""
    out = []
    by_key = {(r.model, r.concurrency, r.system, r.mode): r for r in rows}
    for r in rows:
        other = by_key.get((r.model, r.concurrency, "mlx_lm.server", r.mode))
        if r.system == "tiffin" and other is not None and other.tokens_per_s:
            line = (
                f"{r.model} at {r.concurrency} streams ({r.mode}): Tiffin {r.tokens_per_s:.0f} vs "
                f"mlx_lm.server {other.tokens_per_s:.0f} tokens/s = "
                f"{r.tokens_per_s / other.tokens_per_s:.2f}x"
            )
            mine = per_round.get((r.model, r.concurrency, "tiffin"), [])
            theirs = per_round.get((r.model, r.concurrency, "mlx_lm.server"), [])
            if r.mode == "text" and len(mine) > 1 and len(mine) == len(theirs):
                each = [a / b for a, b in zip(mine, theirs, strict=True) if b]
                line += (
                    f" (per round: {', '.join(f'{x:.2f}x' for x in each)}; median "
                    f"{statistics.median(each):.2f}x)"
                )
            out.append(line)
    return out


def requests_for(concurrency: int, bench_model: bool) -> int:
    """Two requests per client at low concurrency; one at 32+ on the bench-size model (which
    already keeps every client busy for tens of seconds)."""
    if bench_model and concurrency >= 32:
        return concurrency
    return max(2 if bench_model else 4, 2 * concurrency)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)), help="tiny model")
    parser.add_argument("--bench-levels", default=",".join(map(str, BENCH_LEVELS)))
    parser.add_argument(
        "--tiffin-workers",
        type=int,
        default=1,
        help="Tiffin's worker processes (TIFFIN_WORKERS): one, like mlx_lm.server's one process, "
        "so that one engine batches every stream; a decode step is compute-bound, and two engines "
        "each with half the batch compete for the same cores",
    )
    parser.add_argument("--models", default="bench,tiny", help="bench, tiny or both")
    parser.add_argument("--bench-max-tokens", type=int, default=64)
    parser.add_argument("--tiny-max-tokens", type=int, default=128)
    parser.add_argument(
        "--rounds", type=int, default=2, help="alternating rounds at the target levels (8, 32)"
    )
    args = parser.parse_args(argv)

    import bentoml

    from models import tiny_llm

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "logs").mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows: list[Level] = []
    notes: list[str] = []
    per_round: dict[tuple[str, int, str], list[float]] = {}
    for which in args.models.split(","):
        bench_model = which == "bench"
        tag = tiny_llm.ensure_bench() if bench_model else tiny_llm.ensure()
        model_dir = str(bentoml.models.get(tag).path)
        name = tag.split(":")[0]
        max_tokens = args.bench_max_tokens if bench_model else args.tiny_max_tokens
        levels = [int(x) for x in (args.bench_levels if bench_model else args.levels).split(",")]
        print(f"== {tag} ({model_dir}), max_tokens {max_tokens}", flush=True)
        tiffin = start_tiffin(
            tag, free_port(), RESULTS / "logs" / f"llm-tiffin-{which}.log", args.tiffin_workers
        )
        try:
            mlx = start_mlx_lm_server(
                model_dir, free_port(), RESULTS / "logs" / f"llm-mlx-lm-server-{which}.log"
            )
        except BaseException:
            tiffin.stop()
            raise
        try:
            for server in (tiffin, mlx):  # one warm-up stream each (lazy set-up, first prompt)
                asyncio.run(run_level(server, name, 1, 1, 8))
            for c in levels:
                n = requests_for(c, bench_model)
                # The target levels are run in several rounds, alternating which system goes
                # first (ABBA...), pooled: the box is shared, and its load drifts.
                rounds = args.rounds if bench_model and c in TARGET_LEVELS else 1
                pooled = {s.name: Level(s.name, name, c) for s in (tiffin, mlx)}
                for r in range(rounds):
                    for server in (tiffin, mlx) if r % 2 == 0 else (mlx, tiffin):
                        part = asyncio.run(run_level(server, name, c, n, max_tokens))
                        merge(pooled[server.name], part)
                        per_round.setdefault((name, c, server.name), []).append(part.tokens_per_s)
                        print(f"   round {r + 1}: {part.row()}", flush=True)
                for level in pooled.values():
                    rows.append(level)
                    print(level.row(), flush=True)
            if bench_model:
                from tiffin.llm.response_models import FraudExplanation

                # Unconstrained vs json_schema at 8 streams, in ABBA order so that a drift in
                # the machine's load (other work on the box) weighs on both alike; pooled.
                schema = FraudExplanation.model_json_schema()
                pooled = {
                    mode: Level(tiffin.name, name, 8, f"{mode} (max 160)")
                    for mode in ("text", "json_schema")
                }
                for mode in ("text", "json_schema", "json_schema", "text"):
                    target = schema if mode == "json_schema" else None
                    part = asyncio.run(run_level(tiffin, name, 8, 8, 160, mode, target))
                    merge(pooled[mode], part)
                for level in pooled.values():
                    rows.append(level)
                    print(level.row(), flush=True)
                # The shared-prefix workload over HTTP, both systems (each with its prefix cache).
                for server in (tiffin, mlx):
                    part = asyncio.run(
                        run_level(server, name, 8, 16, 32, "fraud prompt", shared_prefix=True)
                    )
                    rows.append(part)
                    print(part.row(), flush=True)
                text_tps = pooled["text"].tokens_per_s
                json_tps = pooled["json_schema"].tokens_per_s
                notes.append(
                    f"Tiffin, {name}, 8 streams: json_schema {json_tps:.0f} tokens/s vs text "
                    f"{text_tps:.0f} tokens/s: constrained decoding costs "
                    f"{100 * (1 - json_tps / text_tps):.0f}%"
                    if text_tps
                    else "no unconstrained tokens"
                )
            else:
                valid, total, problems = asyncio.run(schema_set(tiffin, name))
                notes.append(
                    f"12-schema set x4 sent at once to Tiffin ({name}): {valid}/{total} "
                    f"responses validate" + (f"; problems: {problems[:5]}" if problems else "")
                )
                print(notes[-1], flush=True)
        finally:
            mlx.stop()
            tiffin.stop()
        if bench_model:  # servers down: the box is Tiffin's engine's alone for the A/B
            levels_ab, stats = prefix_cache_ab(tag, name)
            for level in levels_ab:
                rows.append(level)
                print(level.row(), flush=True)
            off, on = levels_ab
            notes.append(
                f"Prefix cache, {name}, fraud prompt, 8 streams in process: TTFT p50 "
                f"{1000 * statistics.median(on.ttft_s):.0f} ms on vs "
                f"{1000 * statistics.median(off.ttft_s):.0f} ms off, tokens/s "
                f"{on.tokens_per_s:.0f} vs {off.tokens_per_s:.0f} ({stats})"
            )
            print(notes[-1], flush=True)
    notes = ratios(rows, per_round) + notes
    table = "\n".join([HEADER, *(r.row() for r in rows)])
    errors = sorted({e for r in rows for e in r.errors[:3]})
    text = f"{table}\n\n" + "\n".join(f"- {n}" for n in notes)
    if errors:
        text += "\n- errors seen: " + "; ".join(errors[:10])
    print("\n" + text)
    (RESULTS / f"llm-{stamp}.md").write_text(text + "\n")
    (RESULTS / f"llm-{stamp}.json").write_text(
        json.dumps(
            [
                {
                    "system": r.system,
                    "model": r.model,
                    "concurrency": r.concurrency,
                    "mode": r.mode,
                    "requests": r.requests,
                    "tokens": r.tokens,
                    "tokens_per_s": round(r.tokens_per_s, 1),
                    "ttft_p50_ms": round(1000 * statistics.median(r.ttft_s), 1)
                    if r.ttft_s
                    else None,
                    "failures": r.failures,
                }
                for r in rows
            ],
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
