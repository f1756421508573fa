"""Tiffin's LLM runner: engines (mlx-lm in-process, OpenAI-compatible remote), constrained
decoding, guards, circuit breaker, metrics, the OpenAI-compatible API and the seed-002 endpoints.

Entry points:

- `tiffin.llm.runtime.install_llm()` — build the configured LLM for this worker
- `tiffin.llm.endpoints.LLMEndpoints` — mixin with `POST /generate` and `/generate/structured`
- `tiffin.llm.openai_api.app` — OpenAI-compatible ASGI app, mount at `/openai`
- `tiffin.llm.routes.routes` — `GET /circuit-breaker/status`, `POST /circuit-breaker/reset`,
  `GET /llm/status`, to append to the operational Starlette app
- `tiffin.llm.explain.explain_fraud(context)` — structured fraud explanation or None

See docs/llm.md.
"""
