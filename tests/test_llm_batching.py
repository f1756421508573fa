"""Continuous batching of the in-process engine, through the public interface, with the real tiny
model: concurrent structured requests all validate (each sequence keeps its own grammar walk and
mask inside one batch), a stream whose client goes away frees its place at once, a full queue is a
503 with Retry-After and a request waiting past its queue deadline gets one too, and 64 concurrent
OpenAI-compatible chat completions over real HTTP (uvicorn on loopback) all complete.

No timings are asserted beyond "does not hang": speed lives in `make bench-llm`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator

from models import tiny_llm
from tests.conftest import UvicornServer
from tests.test_llm_constrained import SCHEMAS
from tiffin.app import TiffinApp
from tiffin.composition import compose_llm_only
from tiffin.llm.engine import Delta, Finished, Prompt
from tiffin.llm.errors import LLMBusy, to_response
from tiffin.llm.runtime import LLM
from tiffin.llm.settings import LLMSettings
from tiffin.settings import ServerSettings

CHAT = Prompt(messages=({"role": "user", "content": "Tell me about the card."},))
# A structured output that needs at least 601 tokens: a sequence that holds its place in the batch
# for hundreds of decode steps, whatever the model would rather do (the tiny model ends its chat
# answers within a few tokens).
LONG = {
    "type": "array",
    "items": {"type": "integer", "minimum": 0, "maximum": 9},
    "minItems": 300,
    "maxItems": 300,
}


def occupy(llm: LLM, seed: int) -> Any:
    """A stream that keeps one place in the batch until it is closed."""
    target = llm.target(LONG, None, "long")
    return llm.stream(CHAT, llm.params(1000, temperature=1.0, seed=seed, structured=True), target)


def build(**settings: Any) -> LLM:
    tiny_llm.ensure()
    llm = LLM.from_settings(LLMSettings(**settings))
    assert llm.engine is not None, llm.unavailable_reason
    return llm


def engine_status(llm: LLM) -> dict[str, Any]:
    assert llm.engine is not None
    return llm.engine.status()


@pytest.fixture(scope="module")
def llm() -> LLM:
    return build()


def test_concurrent_structured_requests_all_validate_in_one_batch(llm: LLM) -> None:
    """The 12-schema set, three seeds each, all at once: 36 sequences with different grammars
    share the batch; every output validates on the first attempt."""

    async def one(name: str, seed: int) -> tuple[str, Any, int]:
        target = llm.target(SCHEMAS[name], None, name)
        prompt = Prompt(messages=({"role": "user", "content": f"Give me a {name} as JSON."},))
        params = llm.params(160, temperature=1.0, seed=seed, structured=True)
        result = await llm.structured(prompt, params, target)
        return name, result.value, result.attempts

    async def everything() -> list[tuple[str, Any, int]]:
        return await asyncio.gather(*(one(n, s) for n in sorted(SCHEMAS) for s in (1, 2, 3)))

    results = asyncio.run(everything())
    assert len(results) == 3 * len(SCHEMAS)
    for name, value, attempts in results:
        errors = [e.message for e in Draft202012Validator(SCHEMAS[name]).iter_errors(value)]
        assert errors == [], (name, value)
        assert attempts == 1, f"{name}: constrained decoding needed a retry under batching"
    assert engine_status(llm)["peak_batch"] > 1, "the requests were not decoded together"


def test_two_lanes_share_the_load_and_structured_outputs_still_validate() -> None:
    """`decode_lanes=2`: two batch threads, newcomers to the least busy; both lanes decode and
    every structured output validates."""
    llm = build(decode_lanes=2)
    names = sorted(SCHEMAS)

    async def one(name: str) -> tuple[str, Any]:
        target = llm.target(SCHEMAS[name], None, name)
        params = llm.params(160, temperature=1.0, seed=7, structured=True)
        return name, (await llm.structured(CHAT, params, target)).value

    async def everything() -> list[tuple[str, Any]]:
        return await asyncio.gather(*(one(name) for name in names))

    for name, value in asyncio.run(everything()):
        assert [e.message for e in Draft202012Validator(SCHEMAS[name]).iter_errors(value)] == []
    status = engine_status(llm)
    assert status["lanes"] == 2
    assert all(peak >= 1 for peak in status["lane_peaks"]), status


def test_seeded_output_does_not_depend_on_the_rest_of_the_batch(llm: LLM) -> None:
    """A seeded request samples with its own random key: alone or among 15 others, same text."""
    params = llm.params(24, temperature=1.0, seed=42)

    async def text(prompt: Prompt) -> str:
        out, _ = await llm.generate(prompt, params)
        return out

    async def crowded() -> str:
        others = [llm.generate(CHAT, llm.params(48, temperature=1.0)) for _ in range(15)]
        mine, *_ = await asyncio.gather(text(CHAT), *others)
        return mine

    alone = asyncio.run(text(CHAT))
    assert asyncio.run(crowded()) == alone


def test_a_stream_whose_client_goes_away_frees_its_place_at_once() -> None:
    """One place in the batch, none in the queue: a stream that is abandoned after its first
    token must leave at once, so the next request is served rather than refused."""
    llm = build(max_concurrency=1, max_queue=0, warmup=False)

    async def scenario() -> tuple[str, dict[str, Any], str]:
        stream = occupy(llm, 3)
        first = await anext(aiter(stream))
        assert isinstance(first, Delta)
        try:  # the place is taken: a second request is refused at once
            await llm.generate(CHAT, llm.params(8))
            refused = "served"
        except LLMBusy as exc:
            refused = exc.message
        await stream.aclose()  # what Starlette does when the client disconnects
        after = engine_status(llm)
        text, finished = await llm.generate(CHAT, llm.params(8, seed=1))
        assert finished.completion_tokens >= 1
        return refused, after, text

    refused, after, _ = asyncio.run(scenario())
    assert refused.startswith("the LLM queue is full"), refused
    assert after["queue_depth"] == 0


def test_queued_request_that_goes_away_leaves_the_queue_and_a_full_queue_is_a_503() -> None:
    llm = build(max_concurrency=1, max_queue=1, warmup=False)

    async def scenario() -> dict[str, Any]:
        running = occupy(llm, 4)
        await anext(aiter(running))
        queued = asyncio.ensure_future(llm.generate(CHAT, llm.params(8)))
        await asyncio.sleep(0.05)
        assert engine_status(llm)["queue_depth"] == 1
        with pytest.raises(LLMBusy) as busy:
            await llm.generate(CHAT, llm.params(8))
        response = to_response(busy.value)
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        queued.cancel()  # the waiting client goes away
        with pytest.raises(asyncio.CancelledError):
            await queued
        status = engine_status(llm)
        again = asyncio.ensure_future(llm.generate(CHAT, llm.params(8, seed=2)))
        await asyncio.sleep(0.05)
        await running.aclose()
        _, finished = await again  # took the freed place in the queue, then the batch
        assert finished.completion_tokens >= 1
        return status

    assert asyncio.run(scenario())["queue_depth"] == 0


def test_request_waiting_past_its_queue_deadline_gets_a_503() -> None:
    llm = build(max_concurrency=1, max_queue=4, queue_timeout_s=0.3, warmup=False)

    async def scenario() -> float:
        running = occupy(llm, 5)
        await anext(aiter(running))
        started = time.monotonic()
        try:
            with pytest.raises(LLMBusy, match=r"in the LLM queue \(limit 0.3s\)"):
                await llm.generate(CHAT, llm.params(8))
            return time.monotonic() - started
        finally:
            await running.aclose()

    waited = asyncio.run(scenario())
    assert waited < 5, "the queue deadline was not honoured while the request waited"


# --- over HTTP: 64 concurrent chat completions --------------------------------------------------


Server = UvicornServer


@pytest.fixture(scope="module")
def server(llm: LLM) -> Iterator[Server]:
    """The LLM runner's own composition, served by the Tiffin application under uvicorn."""
    with Server(TiffinApp(compose_llm_only(llm, ServerSettings()))) as served:
        yield served


def test_64_concurrent_chat_completions_all_complete(server: Server) -> None:
    """Default settings, one worker: 64 streams at once (half streamed, half not) all answer 200
    with text and usage; none is refused."""
    url = f"{server.url}/openai/v1/chat/completions"

    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, int]:
        body = {
            "model": tiny_llm.NAME,
            "messages": [{"role": "user", "content": f"Order {i}: is the card at risk?"}],
            "max_tokens": 64,
            "temperature": 0.7,
        }
        if i % 2:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
            tokens = 0
            async with client.stream("POST", url, json=body) as response:
                if response.status_code != 200:
                    return response.status_code, 0
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        usage = json.loads(line[6:]).get("usage")
                        tokens = usage["completion_tokens"] if usage else tokens
            return 200, tokens
        response = await client.post(url, json=body)
        usage = response.json().get("usage") if response.status_code == 200 else None
        return response.status_code, usage["completion_tokens"] if usage else 0

    async def burst() -> list[tuple[int, int]]:
        limits = httpx.Limits(max_connections=128)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(burst())
    assert [code for code, _ in results] == [200] * 64
    assert all(tokens >= 1 for _, tokens in results), results
    status = httpx.get(f"{server.url}/llm/status", timeout=10).json()
    assert status["peak_batch"] >= 8, status


def test_structured_and_text_in_one_batch_stream_per_sequence(llm: LLM) -> None:
    """Text and structured streams interleave in one batch; each gets its own deltas and one
    Finished, and the structured one validates."""
    target = llm.target(SCHEMAS[sorted(SCHEMAS)[0]], None, "first")

    async def collect(structured: bool, seed: int) -> tuple[str, Finished]:
        parts: list[str] = []
        finished: Finished | None = None
        params = llm.params(120, temperature=1.0, seed=seed, structured=structured)
        async for event in llm.stream(CHAT, params, target if structured else None):
            if isinstance(event, Delta):
                parts.append(event.text)
            else:
                finished = event
        assert finished is not None
        return "".join(parts), finished

    async def mixed() -> list[tuple[str, Finished]]:
        return await asyncio.gather(*(collect(i % 2 == 0, i) for i in range(8)))

    for i, (text, finished) in enumerate(asyncio.run(mixed())):
        if i % 2 == 0:
            target.validate(text)
        assert finished.completion_tokens >= 1


def test_prefix_cache_reuses_a_shared_system_prompt_and_changes_no_output() -> None:
    """Fraud-explanation prompts (one system prompt, different facts), greedy: with the prefix
    cache on, later requests take the system prompt's KV cache from an earlier one (hits and
    cached prompt tokens in the engine's status and metric) and every text equals the one the
    engine without the cache writes; a structured request on a cached prefix still validates."""
    from tiffin.llm.explain import TARGET, fraud_prompt
    from tiffin.llm.metrics import llm_metrics

    prompts = [
        fraud_prompt({"card_id": f"card_{i}", "transaction_amount": 10.5 * i, "fraud_score": 0.9})
        for i in range(1, 7)
    ]

    def run(llm: LLM) -> list[str]:
        async def go() -> list[str]:
            first = [(await llm.generate(p, llm.params(24, temperature=0.0)))[0] for p in prompts]
            rest = await asyncio.gather(
                *(llm.generate(p, llm.params(24, temperature=0.0)) for p in prompts)
            )
            return first + [text for text, _ in rest]

        return asyncio.run(go())

    import bentoml

    version = bentoml.models.get(f"{tiny_llm.NAME}:latest").tag.version

    def counted() -> float:
        counter = llm_metrics().prefix_cached_tokens.labels(tiny_llm.NAME, version)
        return counter._value.get()

    before = counted()
    cached = build(prefix_cache_size=16)
    assert run(cached) == run(build(prefix_cache_size=0))
    stats = engine_status(cached)["prefix_cache"]
    system_tokens = cached.engine.prompt_tokens(  # type: ignore[union-attr]
        Prompt(messages=(prompts[0].messages or ())[:1])
    )
    assert stats["enabled"] and stats["hits"] >= len(prompts) * 2 - 1, stats
    assert stats["cached_prompt_tokens"] >= stats["hits"] * (system_tokens or 1) - 8, stats
    assert counted() - before == stats["cached_prompt_tokens"]

    async def structured() -> Any:
        params = cached.params(200, temperature=1.0, seed=3, structured=True)
        return (await cached.structured(prompts[0], params, TARGET)).value

    TARGET.validate_value(asyncio.run(structured()))
    assert engine_status(cached)["prefix_cache"]["hits"] > stats["hits"]


def test_column_major_weights_keep_the_model_s_outputs() -> None:
    """`cpu_column_major_weights` changes how the weights are stored, not what they are: the
    logits of the tiny model agree with the stored layout's."""
    import bentoml
    import mlx.core as mx
    from mlx_lm import load

    from tiffin.llm.mlx_engine import column_major_weights

    path = str(bentoml.models.get(tiny_llm.ensure()).path)
    stored, _ = load(path)[:2]
    changed, _ = load(path)[:2]
    assert column_major_weights(changed) > 0
    tokens = mx.array([[1, 5, 9, 200, 17, 33, 4, 8]])
    assert mx.allclose(stored(tokens), changed(tokens), atol=1e-4).item()


def test_a_burst_sharing_a_system_prompt_processes_it_once() -> None:
    """Eight fraud-explanation prompts at once on a fresh engine: their shared prefix is
    processed once and every one of them copies it (nothing was stored before the burst), and
    the texts equal those of the engine without a prefix cache."""
    from tiffin.llm.explain import fraud_prompt

    prompts = [fraud_prompt({"card_id": f"card_{i}", "fraud_score": 0.5}) for i in range(8)]

    def burst(llm: LLM) -> list[str]:
        async def go() -> list[tuple[str, Finished]]:
            params = llm.params(16, temperature=0.0)
            return await asyncio.gather(*(llm.generate(p, params) for p in prompts))

        return [text for text, _ in asyncio.run(go())]

    cached = build(prefix_cache_size=16, max_concurrency=8)
    assert burst(cached) == burst(build(prefix_cache_size=0))
    stats = engine_status(cached)["prefix_cache"]
    assert stats["primed_prefixes"] >= 1, stats
    assert stats["hits"] >= len(prompts) - 1, stats


def test_over_http_a_finished_request_s_prompt_serves_the_next(server: Server) -> None:
    """Two chat completions one after the other with one system prompt, over HTTP: the second
    copies the first's prompt cache (the client has its whole answer, and has closed the stream,
    by the time the engine stores it)."""
    from tiffin.llm.explain import SYSTEM

    def hits() -> int:
        status = httpx.get(f"{server.url}/llm/status", timeout=10).json()
        return int(status["prefix_cache"]["hits"])

    before = hits()
    for i in range(2):
        body = {
            "model": tiny_llm.NAME,
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Card {i} paid twice abroad."},
            ],
            "max_tokens": 8,
            "stream": True,
        }
        with httpx.stream("POST", f"{server.url}/openai/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            r.read()
        time.sleep(0.2)  # the batch thread stores the cache right after the last event
    assert hits() >= before + 1
