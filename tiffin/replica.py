"""Which replica (one `bentoml serve` and all its workers) this process belongs to, and where that
replica keeps its Prometheus files.

BentoML gives every serve process on a host the same multiprocess directory and empties it at
start-up, so a second `bentoml serve` wipes the first one's metrics and then mixes its own in.
`use_own_metrics_dir` (called by `service.py` at import, before BentoML prepares the directory)
gives each replica `<TIFFIN_METRICS_DIR>/<replica id>` instead: its `/metrics` stays its own and
complete, and lifecycle statistics (`tiffin.lifecycle.fleet`) sum replicas explicitly.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# Set by the serve process, inherited by its workers: "<pid of the serve process>:<replica id>".
_REPLICA_ENV = "TIFFIN_REPLICA"


class MetricsSettings(BaseSettings):
    """Where each replica keeps its metrics, and how replicas share them for lifecycle decisions."""

    model_config = SettingsConfigDict(env_prefix="TIFFIN_METRICS_", extra="ignore")

    dir: str | None = None
    """Base directory of the Prometheus multiprocess files: each `bentoml serve` uses
    `<dir>/<replica id>` and removes directories of serve processes on this host that are gone.
    Must be writable (mount an emptyDir here under a read-only root filesystem). Default:
    `<BENTOML_HOME>/tiffin-metrics`."""

    publish_interval_s: float = Field(0.5, gt=0, le=60)
    """How often each replica publishes its cumulative per-version counts to Redis. Canary
    analysis, A/B tests and `/v1/metrics/{version}` see other replicas' requests this late."""

    replica_timeout_s: float = Field(15.0, gt=0)
    """A replica that has not published for this long is retired: its counts move into the
    fleet's permanent total (nothing is lost or counted twice, even if it comes back)."""


def replica_id() -> str:
    """This process's replica id: shared by every worker of one `bentoml serve`, new for every
    serve process and every restart (so a restarted replica never reuses its old counts' id)."""
    owner, _, replica = os.environ.get(_REPLICA_ENV, "").partition(":")
    # Set earlier in this process, or inherited by a worker from its serve process (BentoML
    # gives workers PROMETHEUS_MULTIPROC_DIR; the serve process itself has none). A value
    # inherited by a serve process from whatever started it (a test run that imported the
    # service, say) would make every replica it starts share one id: never taken.
    ours = owner == str(os.getpid())
    from_serve = owner == str(os.getppid()) and "PROMETHEUS_MULTIPROC_DIR" in os.environ
    if replica and (ours or from_serve):
        return replica
    replica = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
    os.environ[_REPLICA_ENV] = f"{os.getpid()}:{replica}"
    return replica


def use_own_metrics_dir(settings: MetricsSettings) -> Path:
    """Point BentoML's Prometheus multiprocess directory at this replica's own directory.

    Must run in the serve process before `serve_http` calls `ensure_prometheus_dir()` (which
    creates and empties it); importing the service module happens before that.
    """
    from bentoml._internal.configuration.containers import BentoMLContainer

    base = Path(settings.dir or Path(BentoMLContainer.bentoml_home.get(), "tiffin-metrics"))
    replica = replica_id()
    BentoMLContainer.prometheus_multiproc_dir.set(str(base / replica))
    if os.environ[_REPLICA_ENV].startswith(f"{os.getpid()}:"):  # the serve process, not a worker
        remove_stale_dirs(base, replica)
    return base / replica


def remove_stale_dirs(base: Path, current: str) -> list[str]:
    """Delete the directories of serve processes of this host that no longer run."""
    ours = re.compile(rf"{re.escape(socket.gethostname())}-(\d+)-[0-9a-f]{{6}}")
    removed = []
    for path in base.iterdir() if base.is_dir() else ():
        match = ours.fullmatch(path.name)
        if match is None or path.name == current or _running(int(match[1])):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():  # our own pid on a directory that is not ours: a container restart
        return False
    with contextlib.suppress(PermissionError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
    return True
