"""bentofile.yaml is generated from pyproject.toml, the one place dependencies are listed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bentofile_is_what_pyproject_generates() -> None:
    spec = importlib.util.spec_from_file_location("bento", ROOT / "deploy" / "image" / "bento.py")
    assert spec is not None and spec.loader is not None
    bento = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bento)
    assert (ROOT / "bentofile.yaml").read_text() == bento.top_level_bentofile(), (
        "bentofile.yaml is stale: run `python deploy/image/bento.py --bentofile`"
    )
