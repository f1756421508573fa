"""Tiffin's LLM runner: engines (mlx-lm in-process, OpenAI-compatible remote), constrained
decoding, guards, circuit breaker, metrics, the OpenAI-compatible API and the seed-002 endpoints.

Entry points:

- `tiffin.llm.runtime.LLM.from_settings()` — build the configured LLM (the LLM runner does)
- `tiffin.llm.endpoints` — handlers of `POST /generate` and `/generate/structured`
- `tiffin.llm.openai_api.routes` — the OpenAI-compatible API, mounted at `/openai`
- `tiffin.llm.routes.routes` — `GET /circuit-breaker/status`, `POST /circuit-breaker/reset`,
  `GET /llm/status`
- `tiffin.llm.forward.ForwardedLLM` — the same routes answered by an LLM runner elsewhere
(all mounted by `tiffin.app.TiffinApp`)
- `tiffin.llm.explain.explain_fraud(context)` — structured fraud explanation or None

See docs/llm.md.
"""
