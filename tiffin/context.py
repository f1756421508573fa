"""How a route handler reaches its worker's objects.

The Tiffin application (`tiffin.app`) puts its `Worker` into each request's ASGI scope; handlers
read it from there. Nothing about a worker is kept in a module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tiffin.composition import Worker
    from tiffin.llm.runtime import LLM

WORKER = "tiffin.worker"


def worker_of(request: Any) -> Worker:
    return request.scope[WORKER]


def llm_of(request: Any) -> LLM:
    llm = request.scope[WORKER].llm
    assert llm is not None, "LLM routes are only mounted on workers that have an LLM"
    return llm
