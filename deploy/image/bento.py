"""Build one image variant's Bento from pyproject.toml, the only place dependencies are listed.

    python deploy/image/bento.py full|tabular|llm   # prints the Bento tag on the last line
    python deploy/image/bento.py --bentofile         # rewrites the top-level bentofile.yaml

`[tool.bentoml.build]` is the Bento's build config (what a bare `bentoml build .` uses too);
`[tool.tiffin.images.<variant>]` says which service, Bento name and build/runtime env a variant
has and which [project].dependencies it leaves out; `[tool.tiffin.image-packages]` swaps a
distribution for another that provides the same package (xgboost -> xgboost-cpu). The derived
bentofile is written to build/bentofile-<variant>.yaml (generated, not committed) and built from
the repository root.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def bentofile(variant: str, pyproject: dict[str, Any]) -> dict[str, Any]:
    spec = pyproject["tool"]["tiffin"]["images"][variant]
    config = copy.deepcopy(pyproject["tool"]["bentoml"]["build"])
    without = {canonicalize_name(name) for name in spec.get("without", [])}
    deps = pyproject["project"]["dependencies"]
    kept = [d for d in deps if canonicalize_name(Requirement(d).name) not in without]
    # Same requirement (version, markers), another distribution of the same package.
    for name, replacement in pyproject["tool"]["tiffin"].get("image-packages", {}).items():
        for i, dep in enumerate(kept):
            req = Requirement(dep)
            if canonicalize_name(req.name) == canonicalize_name(name):
                req.name = replacement
                kept[i] = str(req)
    missing = without - {canonicalize_name(Requirement(d).name) for d in deps}
    if missing:  # a renamed dependency must not silently stay in the "without" image
        raise SystemExit(f"{variant}: 'without' names no dependency: {sorted(missing)}")
    config["name"] = spec["bento"]
    config["service"] = spec["service"]
    config.setdefault("python", {})["packages"] = kept
    envs = [e for e in config.get("envs", []) if e["name"] not in spec.get("envs", {})]
    envs += [{"name": k, "value": v} for k, v in spec.get("envs", {}).items()]
    config["envs"] = envs
    return config


HEADER = (
    "# Generated from pyproject.toml by `python deploy/image/bento.py --bentofile`: edit\n"
    "# [tool.bentoml.build] and [project].dependencies there, not this file (a test checks it).\n"
)


def top_level_bentofile() -> str:
    """The full image's bentofile: what a plain `bentoml build` in the repository uses."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return HEADER + yaml.safe_dump(bentofile("full", pyproject), sort_keys=False)


def main(variant: str) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    config = bentofile(variant, pyproject)
    spec = pyproject["tool"]["tiffin"]["images"][variant]
    out = ROOT / "build" / f"bentofile-{variant}.yaml"
    out.parent.mkdir(exist_ok=True)
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    # The variant's own env is also set while building: which models the service declares (and
    # so which get packaged) depends on it, e.g. no LLM model in the tabular Bento. (Not the
    # image-wide envs: BENTOML_HOME=/tmp/bentoml is for the container, not this store.)
    env = {**os.environ, **spec.get("envs", {})}
    result = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "-f", str(out), "--output", "tag", str(ROOT)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    print(result.stdout.strip().splitlines()[-1].removeprefix("__tag__:"))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    if sys.argv[1] == "--bentofile":
        (ROOT / "bentofile.yaml").write_text(top_level_bentofile())
    else:
        main(sys.argv[1])
