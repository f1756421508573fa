"""The LLM runner as a BentoML service of its own: mlx-lm in-process (or a remote
OpenAI-compatible backend), with seed 002's endpoints and the OpenAI-compatible API.

`bentoml serve runners.llm:LLMRunner` serves, on one port:

- `POST /generate`, `POST /generate/structured`
- `/openai/v1/...` — OpenAI-compatible chat/completions, completions, models
- `GET /circuit-breaker/status`, `POST /circuit-breaker/reset`, `GET /llm/status`
- `GET /health`, `GET /ready`, `GET /metrics`

The entry service declares it like every runner (tiffin.topology): built inside each entry
worker (in-process), started as its own processes (separate), or reached at a URL (remote, e.g.
a machine with Apple Silicon next to CPU-only tabular workers), its routes then forwarded.
"""

from __future__ import annotations

from typing import Any

import bentoml

from models import tiny_llm
from tiffin.app import TiffinGateway
from tiffin.composition import compose_llm_only
from tiffin.limits import LimitsMiddleware
from tiffin.llm.runtime import LLM
from tiffin.llm.settings import llm_settings
from tiffin.log_filters import install_client_error_log_filter
from tiffin.logs import RequestIdMiddleware
from tiffin.ops import not_ready
from tiffin.replica import MetricsSettings, use_own_metrics_dir
from tiffin.settings import server_settings

SETTINGS = llm_settings()
use_own_metrics_dir(MetricsSettings())  # served on its own: its own /metrics (tiffin/replica.py)


def packaged_llm_model() -> Any:
    """The tiny model as a BentoModel, for `bentoml build`, when it is what the LLM serves and
    it is in the store (None otherwise: a service must still start without it)."""
    from bentoml.models import BentoModel

    default = SETTINGS.model_name in (tiny_llm.NAME, f"{tiny_llm.NAME}:{tiny_llm.VERSION}")
    uses_store = SETTINGS.resolved_engine() == "mlx" and not SETTINGS.model_path
    if default and uses_store and tiny_llm.exists():
        return BentoModel(f"{tiny_llm.NAME}:{tiny_llm.VERSION}")
    return None


@bentoml.service(
    name="tiffin_llm",
    workers=1,
    traffic={"timeout": SETTINGS.request_timeout_s + 10, "max_concurrency": 256},
)
class LLMRunner:
    def __init__(self) -> None:
        self.llm = LLM.from_settings(SETTINGS)
        self.worker = compose_llm_only(self.llm, server_settings())

    async def __is_ready__(self) -> bool:
        return await not_ready(self.worker) is None


_model = packaged_llm_model()
if _model is not None:
    LLMRunner.models.append(_model)  # type: ignore[attr-defined]
install_client_error_log_filter()
LLMRunner.add_asgi_middleware(RequestIdMiddleware)  # type: ignore[attr-defined]
LLMRunner.add_asgi_middleware(LimitsMiddleware)  # type: ignore[attr-defined]
LLMRunner.add_asgi_middleware(TiffinGateway)  # type: ignore[attr-defined]
