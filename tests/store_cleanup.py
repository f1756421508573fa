"""Versions a test registers leave the session's shared model store afterwards, so the modules
after it see the store the training fixture made (e.g. `/models` listing v1.0 first)."""

from __future__ import annotations

import bentoml

from tiffin import model_store


def forget(name: str, version: str) -> None:
    if model_store.exists(name, version):
        bentoml.models.delete(f"{name}:{version}")
