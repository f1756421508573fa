"""Tokens/s and time to first token of the configured LLM: `python -m tiffin.llm.bench`.

In process (default): the same `LLM` object the service builds (engine, guards, metrics), so
the numbers include everything but HTTP. `--url http://host:port` measures a running service
instead, over HTTP with streaming (`POST /generate` with `"stream": true`, time to the first
text event as the client sees it). Prints a Markdown table of medians (and p90) over `--runs`.

Time to first token is request arrival → first generated token (prompt processing included).
Tokens/s is decode speed: tokens after the first / time after the first. Structured runs add the
constrained-decoding mask at every step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

PROMPTS = {
    "text": "The card shows",
    "json-ish": '{"summary": "the card',
}


@dataclass
class Series:
    name: str
    ttft_ms: list[float] = field(default_factory=list)
    tps: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)

    def row(self) -> str:
        def med(xs: list[float]) -> str:
            return f"{statistics.median(xs):.1f}" if xs else "–"

        def p90(xs: list[float]) -> str:
            return f"{sorted(xs)[int(0.9 * (len(xs) - 1))]:.1f}" if xs else "–"

        return (
            f"| {self.name} | {len(self.total_ms)} | {statistics.median(self.tokens):.0f} | "
            f"{med(self.ttft_ms)} | {p90(self.ttft_ms)} | {med(self.tps)} | {p90(self.tps)} | "
            f"{med(self.total_ms)} |"
        )


HEADER = (
    "| workload | runs | completion tokens (median) | TTFT ms (median) | TTFT ms (p90) | "
    "tokens/s (median) | tokens/s (p90) | total ms (median) |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|"
)


async def in_process(runs: int, max_tokens: int) -> list[Series]:
    from tiffin.llm.engine import Delta, Finished, Prompt
    from tiffin.llm.runtime import LLM

    llm = LLM.from_settings()
    if llm.engine is None:
        raise SystemExit(f"LLM unavailable: {llm.unavailable_reason}")
    out = []
    for name, text in PROMPTS.items():
        series = Series(f"{llm.model_id} ({llm.engine_kind}) generate: {name}")
        for seed in range(runs):
            finished: Finished | None = None
            started = time.perf_counter()
            prompt = Prompt(text=text)
            async for event in llm.stream(prompt, llm.params(max_tokens, 0.8, seed=seed)):
                if not isinstance(event, Delta):
                    finished = event
            assert finished is not None
            series.total_ms.append((time.perf_counter() - started) * 1000)
            series.tokens.append(finished.completion_tokens)
            if finished.time_to_first_token_s is not None:
                series.ttft_ms.append(finished.time_to_first_token_s * 1000)
            if finished.tokens_per_second is not None:
                series.tps.append(finished.tokens_per_second)
        out.append(series)
    target = llm.target(response_model="fraud_explanation")
    series = Series(f"{llm.model_id} ({llm.engine_kind}) structured: fraud_explanation")
    prompt = Prompt(messages=({"role": "user", "content": "Explain a 0.93 fraud score."},))
    for seed in range(runs):
        started = time.perf_counter()
        params = llm.params(max(max_tokens, 160), 0.8, seed=seed, structured=True)
        result = await llm.structured(prompt, params, target)
        series.total_ms.append((time.perf_counter() - started) * 1000)
        series.tokens.append(result.finished.completion_tokens)
        if result.finished.time_to_first_token_s is not None:
            series.ttft_ms.append(result.finished.time_to_first_token_s * 1000)
        if result.finished.tokens_per_second is not None:
            series.tps.append(result.finished.tokens_per_second)
    out.append(series)
    return out


def over_http(url: str, runs: int, max_tokens: int) -> list[Series]:
    import httpx

    out = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for name, text in PROMPTS.items():
            series = Series(f"HTTP /generate stream: {name}")
            for seed in range(runs):
                body = {"prompt": text, "max_tokens": max_tokens, "seed": seed, "stream": True}
                started = time.perf_counter()
                first: float | None = None
                done: dict[str, Any] = {}
                with client.stream("POST", "/generate", json=body) as response:
                    response.raise_for_status()
                    for line in response.iter_lines():
                        if not line.startswith("data: "):
                            continue
                        event = json.loads(line[6:])
                        if "text" in event and first is None:
                            first = time.perf_counter()
                        if event.get("done"):
                            done = event
                end = time.perf_counter()
                tokens = int(done.get("usage", {}).get("completion_tokens", 0))
                series.total_ms.append((end - started) * 1000)
                series.tokens.append(tokens)
                if first is not None:
                    series.ttft_ms.append((first - started) * 1000)
                    if tokens > 1 and end > first:
                        series.tps.append((tokens - 1) / (end - first))
            out.append(series)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--url", help="measure a running service over HTTP instead")
    args = parser.parse_args(argv)
    if args.url:
        series = over_http(args.url.rstrip("/"), args.runs, args.max_tokens)
    else:
        series = asyncio.run(in_process(args.runs, args.max_tokens))
    print(HEADER)
    for s in series:
        print(s.row())
    return 0


if __name__ == "__main__":
    sys.exit(main())
