"""`tiffin`: train and import models, and run a Tiffin service's lifecycle from a terminal.

    tiffin train [--only NAME] [--force] [--rows N]       # into the local BentoML model store
    tiffin import DIR | --file F --name N --version V --features a,b [--task T]
    tiffin list                                             # every version and its serving state
    tiffin register NAME VERSION --file model.json --features a,b --task binary
    tiffin deploy NAME VERSION --strategy canary [--steps 10,50,100] [--wait]
    tiffin split NAME [VERSION=PERCENT ...]                 # show, or set, the traffic split
    tiffin rollback NAME [--to VERSION]
    tiffin status

Commands that talk to a service use `--url` (else `REMOTE_INFERENCE_URL` / `TIFFIN_CLIENT_URL`,
else http://localhost:3000). Admin writes send `--token`, else `TIFFIN_TOKEN`, else a short-lived
token minted here from `JWT_SECRET_KEY` (the secret the service verifies with). `--json` prints
the service's answers as JSON instead of tables. Exit status: 0 done, 1 the service or the store
refused (its message is printed), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from tiffin.client import TiffinClient, TiffinClientError, TransportError, Unauthorized
from tiffin.client import models as cm
from tiffin.errors import TiffinError

STRATEGIES = ("immediate", "canary", "blue-green", "rolling")
TOKEN_TTL_S = 300
PIPE_WIDTH = 160
SUFFIX_TO_FILE = {".onnx": "model.onnx", ".json": "model.json", ".txt": "model.txt"}


class CliError(Exception):
    """A refusal worth one readable line (exit status 1)."""


class Cli:
    """One invocation: its arguments and its two consoles (tables out, problems err)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        # Piped or redirected output is read later or by tools: rows stay whole instead of being
        # folded to an 80-column guess (a terminal, or COLUMNS, sets the real width).
        wide = None if sys.stdout.isatty() or "COLUMNS" in os.environ else PIPE_WIDTH
        self.out = Console(soft_wrap=False, width=wide)
        self.err = Console(stderr=True)

    # --- plumbing -----------------------------------------------------------------------------

    def client(self, write: bool = False) -> TiffinClient:
        from tiffin.client import ClientSettings

        url = self.args.url or ClientSettings().url
        token = self.args.token
        if write and token is None and ClientSettings().token is None:
            token = _mint_token()
        return TiffinClient(url, local=False, token=token, timeout_s=self.args.timeout)

    def emit(self, answer: Any, render: Callable[[], None]) -> None:
        if self.args.json:
            self.out.print_json(json.dumps(_plain(answer), default=str))
        else:
            render()

    def table(self, title: str, *columns: str) -> Table:
        table = Table(title=title, title_justify="left", header_style="bold")
        for i, column in enumerate(columns):
            # names and versions (the first two) stay whole; the others fold when space runs out
            table.add_column(column, no_wrap=i < 2, overflow="fold")
        return table

    # --- local model store --------------------------------------------------------------------

    def train(self) -> int:
        import bentoml

        from models import train
        from tiffin import model_store
        from tiffin.settings import model_settings

        rows = self.args.rows or model_settings().train_rows
        only = self.args.only
        todo = [p for p in train.PIPELINES if not only or p.name in only]
        with_example = not only or "your_model" in only
        if not todo and not with_example:
            raise CliError(f"--only {', '.join(only)}: no such training pipeline")
        results = self.table("Models", "model", "version", "framework", "result", "metrics", "s")
        progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.err,
        )
        with progress:
            task = progress.add_task("training", total=len(todo) + int(with_example))
            for p in todo:
                progress.update(task, description=f"training {p.name}:{p.version} ({rows} rows)")
                started = time.perf_counter()
                if model_store.exists(p.name, p.version) and not self.args.force:
                    result = "kept (already stored)"
                else:
                    if model_store.exists(p.name, p.version):
                        bentoml.models.delete(f"{p.name}:{p.version}")
                    train.run_pipeline(p, rows)
                    result = "trained"
                card = model_store.describe(model_store.get(p.name, p.version))
                results.add_row(
                    p.name,
                    p.version,
                    p.framework,
                    result,
                    _metrics(card["metrics"]),
                    f"{time.perf_counter() - started:.1f}",
                )
                progress.advance(task)
            if with_example:
                progress.update(task, description="importing your_model:1.0.0")
                kept = model_store.exists("your_model", "1.0.0")
                if not kept:
                    train.import_example_model()
                results.add_row(
                    "your_model", "1.0.0", "sklearn", "kept" if kept else "imported", "", ""
                )
                progress.advance(task)
        self.out.print(results)
        return 0

    def import_(self) -> int:
        from models import importer
        from tiffin import model_store

        args = self.args
        with self.err.status("checking and importing (load, shape check, warm-up) ..."):
            if args.directory is not None:
                tags = importer.import_directory(args.directory, args.force)
            else:
                if not (args.file and args.name and args.version and args.features):
                    raise CliError("give a DIRECTORY, or --file with --name, --version, --features")
                if args.file.suffix not in SUFFIX_TO_FILE:
                    raise CliError(f"{args.file.name}: expected .onnx, .json (XGBoost) or .txt")
                metadata = {"feature_names": _names(args.features), "task": args.task}
                artifacts = {SUFFIX_TO_FILE[args.file.suffix]: args.file.read_bytes()}
                tags = [
                    importer.import_version(
                        args.name, args.version, artifacts, metadata, args.force
                    )
                ]
        described = [model_store.describe(model_store.get(*t.split(":", 1))) for t in tags]
        if args.json:
            self.out.print_json(json.dumps(described, default=str))
            return 0
        if not tags:
            self.out.print("nothing new to import")
            return 0
        table = self.table("Imported", "model", "version", "framework", "task", "features")
        for d in described:
            table.add_row(
                d["name"], d["version"], d["framework"], d["task"], ", ".join(d["feature_names"])
            )
        self.out.print(table)
        return 0

    # --- against a service --------------------------------------------------------------------

    def list_(self) -> int:
        with self.client() as client:
            listing = client.models()
        self.emit(listing, lambda: self.out.print(_models_table(self, listing)))
        return 0

    def register(self) -> int:
        args = self.args
        if (args.file is None) == (args.server_path is None):
            raise CliError("give exactly one of --file (uploaded) or --server-path")
        upload: dict[str, Any] = {}
        if args.file is not None:
            if args.file.suffix not in SUFFIX_TO_FILE:
                raise CliError(f"{args.file.name}: expected .onnx, .json (XGBoost) or .txt")
            upload = {
                "artifact": args.file.read_bytes(),
                "filename": SUFFIX_TO_FILE[args.file.suffix],
            }
        with self.client(write=True) as client, self.err.status("registering (load, warm-up) ..."):
            registered = client.register_model(
                args.name,
                args.version,
                model_path=args.server_path,
                feature_names=_names(args.features) if args.features else None,
                task=args.task,
                description=args.description,
                **upload,
            )

        def render() -> None:
            table = self.table("Registered", "model id", "framework", "task", "features")
            table.add_row(
                registered.model_id,
                registered.framework,
                registered.task,
                ", ".join(registered.feature_names),
            )
            self.out.print(table)

        self.emit(registered, render)
        return 0

    def deploy(self) -> int:
        args = self.args
        thresholds = {
            k: v
            for k, v in {
                "max_error_rate": args.max_error_rate,
                "max_p99_ms": args.max_p99_ms,
                "max_score_psi": args.max_score_psi,
                "min_samples": args.min_samples,
            }.items()
            if v is not None
        }
        with self.client(write=True) as client:
            with self.err.status(f"deploying {args.name}:{args.version} ({args.strategy}) ..."):
                deployment = client.deploy(
                    args.name,
                    args.version,
                    strategy=args.strategy,
                    steps=[int(s) for s in args.steps.split(",")] if args.steps else None,
                    analysis_window_s=args.window,
                    thresholds=thresholds or None,
                )
            if args.wait and deployment.status == "in_progress":
                deployment = self._follow(client, deployment)
        self.emit(deployment, lambda: self.out.print(_deployment_table(self, deployment)))
        if deployment.status == "rolled_back":
            self.err.print(f"[red]rolled back:[/] {deployment.reason}")
            return 1
        return 0

    def _follow(self, client: TiffinClient, deployment: cm.Deployment) -> cm.Deployment:
        """Poll a canary or rolling deployment, its traffic share as a bar, until it ends."""
        deadline = time.monotonic() + self.args.wait_timeout
        progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed:.0f}% of traffic"),
            TimeElapsedColumn(),
            console=self.err,
        )
        with progress:
            task = progress.add_task(f"{deployment.target_version}", total=100)
            while deployment.status == "in_progress":
                weight = deployment.steps[min(deployment.step_index, len(deployment.steps) - 1)]
                progress.update(
                    task,
                    completed=weight,
                    description=f"{deployment.strategy} {deployment.target_version} "
                    f"step {deployment.step_index + 1}/{len(deployment.steps)}",
                )
                if time.monotonic() > deadline:
                    raise CliError(
                        f"deployment {deployment.id} still in progress after "
                        f"{self.args.wait_timeout:.0f}s (it goes on; see `tiffin status`)"
                    )
                time.sleep(0.5)
                deployment = client.deployment(deployment.id)
            progress.update(task, completed=100 if deployment.status == "completed" else 0)
        return deployment

    def split(self) -> int:
        args = self.args
        with self.client(write=bool(args.weights)) as client:
            if args.weights:
                weights = _weights(args.weights)
                with self.err.status("waiting until every worker routes with the new split ..."):
                    split = client.set_traffic_split(weights, model=args.name)
            else:
                split = client.traffic_split(model=args.name)
        self.emit(split, lambda: self.out.print(_split_table(self, args.name, split)))
        return 0

    def rollback(self) -> int:
        """Back to the previous version: `--to` if given, else the stable version the latest
        deployment of the model replaced. A deployment still running cannot be aborted through
        the admin API (its thresholds roll it back by themselves), so that case is refused."""
        args = self.args
        with self.client(write=True) as client:
            latest = next((d for d in client.deployments() if d.family == args.name), None)
            if latest is not None and latest.status == "in_progress":
                raise CliError(
                    f"deployment {latest.id} of {args.name} ({latest.strategy} to "
                    f"{latest.target_version}) is still in progress; the admin API cannot abort "
                    "it (its thresholds roll it back automatically). Try again when it ends."
                )
            target = args.to
            if target is None:
                if latest is None:
                    raise CliError(f"no deployment of {args.name} to roll back; give --to VERSION")
                if latest.status == "rolled_back":
                    self.out.print(
                        f"{args.name}: deployment {latest.id} was already rolled back to "
                        f"{latest.stable_version} ({latest.reason})"
                    )
                    return 0
                target = latest.stable_version
            with self.err.status(f"activating {args.name}:{target} on every worker ..."):
                activated = client.activate(args.name, target)
        self.emit(
            activated,
            lambda: self.out.print(
                f"{args.name}: rolled back to {target} (100% of traffic, deployment "
                f"{activated.deployment.id})"
            ),
        )
        return 0

    def status(self) -> int:
        with self.client() as client:
            health = client.health()
            listing = client.models()
            running = [d for d in client.deployments() if d.status == "in_progress"]
            tests = [t for t in client.ab_tests() if t.status == "running"]
        answer = {
            "health": health,
            "models": listing,
            "deployments_in_progress": running,
            "ab_tests_running": tests,
        }

        def render() -> None:
            head = self.table(
                f"Tiffin at {self.client_url()}: {health.status}", "component", "status", "detail"
            )
            for name, component in health.components.items():
                detail = {k: v for k, v in component.items() if k != "status"}
                head.add_row(name, str(component.get("status")), _short(detail))
            head.caption = (
                f"{health.models_loaded} versions loaded, up {health.uptime_seconds:.0f}s"
            )
            self.out.print(head)
            serving = self.table("Serving", "model", "serving", "split", "shadows")
            for family in listing.models:
                split = {v.version: v.serving_weight for v in family.versions if v.serving_weight}
                shadows = [v.version for v in family.versions if v.shadow]
                serving.add_row(
                    family.name,
                    family.serving_version or "-",
                    " / ".join(f"{v} {w}%" for v, w in split.items()) or "-",
                    ", ".join(shadows) or "-",
                )
            self.out.print(serving)
            if running:
                for d in running:
                    self.out.print(_deployment_table(self, d))
            else:
                self.out.print("no deployment in progress")
            for t in tests:
                self.out.print(f"A/B test {t.test_id}: {t.model_a} vs {t.model_b} ({t.status})")

        self.emit(answer, render)
        return 0

    def client_url(self) -> str:
        from tiffin.client import ClientSettings

        return str(self.args.url or ClientSettings().url)


# --- helpers ----------------------------------------------------------------------------------


def _plain(answer: Any) -> Any:
    if isinstance(answer, BaseModel):
        return answer.model_dump(mode="json")
    if isinstance(answer, dict):
        return {k: _plain(v) for k, v in answer.items()}
    if isinstance(answer, list):
        return [_plain(v) for v in answer]
    return answer


def _names(text: str) -> list[str]:
    return [f.strip() for f in text.split(",") if f.strip()]


def _metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.3g}" for k, v in metrics.items() if not k.endswith("_bytes"))


def _short(detail: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in detail.items() if not isinstance(v, dict | list))


def _weights(pairs: Sequence[str]) -> dict[str, int]:
    weights: dict[str, int] = {}
    for pair in pairs:
        version, sep, percent = pair.rpartition("=")
        if not sep or not version or not percent.isdigit():
            raise CliError(f"{pair!r}: expected VERSION=PERCENT, e.g. v1.0=90")
        weights[version] = int(percent)
    return weights


def _mint_token() -> str | None:
    """An admin token from JWT_SECRET_KEY when this machine has the service's secret."""
    from tiffin.auth import AuthSettings, mint

    secret = AuthSettings().jwt_secret_key
    return mint(secret, "admin", TOKEN_TTL_S, "tiffin-cli") if secret else None


def _models_table(cli: Cli, listing: cm.ModelList) -> Table:
    table = cli.table(
        "Models", "model", "version", "framework", "task", "state", "traffic", "metrics"
    )
    for family in listing.models:
        for v in family.versions:
            traffic = f"{v.serving_weight}%" if v.serving_weight else ""
            if v.shadow:
                traffic = (traffic + " shadow").strip()
            marker = " *" if v.version == family.serving_version else ""
            table.add_row(
                family.name,
                v.version + marker,
                v.framework,
                v.task,
                v.state or "",
                traffic,
                _metrics(v.metrics),
            )
    table.caption = "* serving version"
    return table


def _deployment_table(cli: Cli, d: cm.Deployment) -> Table:
    table = cli.table(
        f"Deployment {d.id}: {d.family} {d.stable_version} -> {d.target_version} "
        f"({d.strategy}, {d.status})",
        "event",
        "at",
        "detail",
    )
    for t in d.transitions:
        table.add_row(t.event, time.strftime("%H:%M:%S", time.localtime(t.at)), _short(t.detail))
    if d.reason:
        table.caption = f"reason: {d.reason}"
    return table


def _split_table(cli: Cli, name: str, split: dict[str, int]) -> Table:
    table = cli.table(f"Traffic split of {name}", "version", "percent", "")
    for version, weight in split.items():
        table.add_row(version, str(weight), "█" * (weight // 5))
    return table


def _shared_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Options accepted before or after the command (`tiffin status --url ...`). On the
    commands they default to SUPPRESS, so an absent one never overwrites the top-level value."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--url", default=default(None), help="service URL (default: REMOTE_INFERENCE_URL or :3000)"
    )
    parser.add_argument(
        "--token", default=default(None), help="admin JWT (default: TIFFIN_TOKEN, or minted)"
    )
    parser.add_argument("--timeout", type=float, default=default(120.0), help="seconds per request")
    parser.add_argument(
        "--json", action="store_true", default=default(False), help="print answers as JSON"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tiffin",
        description="Train, import and run the lifecycle of Tiffin's models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[1] if __doc__ else None,
    )
    _shared_options(parser, suppress=False)
    shared = argparse.ArgumentParser(add_help=False)
    _shared_options(shared, suppress=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        parents=[shared], name="train", help="train the default models into the local model store"
    )
    p.add_argument("--only", action="append", help="only this model name (repeatable)")
    p.add_argument("--force", action="store_true", help="retrain versions already stored")
    p.add_argument("--rows", type=int, help="generated rows per model")
    p.set_defaults(run=Cli.train)

    p = sub.add_parser(
        parents=[shared], name="import", help="import user models into the local model store"
    )
    p.add_argument("directory", nargs="?", type=Path, help="seed-000 layout directory")
    p.add_argument("--file", type=Path, help="one model.onnx / XGBoost .json / LightGBM .txt")
    p.add_argument("--name")
    p.add_argument("--version")
    p.add_argument("--features", help="comma-separated feature names in column order")
    p.add_argument("--task", default="binary", help="binary, multiclass, regression, ...")
    p.add_argument("--force", action="store_true", help="replace versions already stored")
    p.set_defaults(run=Cli.import_)

    p = sub.add_parser(
        parents=[shared], name="list", help="every model version on the service and its state"
    )
    p.set_defaults(run=Cli.list_)

    p = sub.add_parser(
        parents=[shared], name="register", help="register a new version with the service"
    )
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--file", type=Path, help="artifact to upload (.onnx, .json, .txt)")
    p.add_argument("--server-path", help="artifact path on the service's machine")
    p.add_argument("--features", help="comma-separated feature names in column order")
    p.add_argument("--task", help="binary, multiclass, regression or multi_output")
    p.add_argument("--description", default="")
    p.set_defaults(run=Cli.register)

    p = sub.add_parser(parents=[shared], name="deploy", help="roll a version out with a strategy")
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--strategy", choices=STRATEGIES, default="immediate")
    p.add_argument("--steps", help="canary/rolling percentages, e.g. 10,50,100")
    p.add_argument("--window", type=float, help="seconds of analysis per step")
    p.add_argument("--max-error-rate", type=float, help="canary rollback threshold (0..1)")
    p.add_argument("--max-p99-ms", type=float, help="canary rollback threshold")
    p.add_argument("--max-score-psi", type=float, help="canary score-shift (PSI) threshold")
    p.add_argument("--min-samples", type=int, help="requests per step before a verdict")
    p.add_argument("--wait", action="store_true", help="follow a canary/rolling to its end")
    p.add_argument("--wait-timeout", type=float, default=1800.0, help="seconds to follow")
    p.set_defaults(run=Cli.deploy)

    p = sub.add_parser(parents=[shared], name="split", help="show or set a model's traffic split")
    p.add_argument("name")
    p.add_argument("weights", nargs="*", metavar="VERSION=PERCENT")
    p.set_defaults(run=Cli.split)

    p = sub.add_parser(
        parents=[shared], name="rollback", help="send all traffic back to the previous version"
    )
    p.add_argument("name")
    p.add_argument("--to", help="version to roll back to (default: the one last replaced)")
    p.set_defaults(run=Cli.rollback)

    p = sub.add_parser(
        parents=[shared], name="status", help="health, serving versions, splits, rollouts"
    )
    p.set_defaults(run=Cli.status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli = Cli(args)
    try:
        return int(args.run(cli))
    except TransportError as exc:
        cli.err.print(f"[red]error:[/] cannot reach {cli.client_url()}: {exc.message}")
    except Unauthorized as exc:
        cli.err.print(
            f"[red]error:[/] {exc.message} (pass --token, set TIFFIN_TOKEN, or set "
            "JWT_SECRET_KEY to mint one)"
        )
    except TiffinClientError as exc:
        cli.err.print(f"[red]error ({exc.status}):[/] {exc.message}")
    except (CliError, TiffinError, OSError) as exc:  # OSError: a file given that cannot be read
        cli.err.print(f"[red]error:[/] {exc}")
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
