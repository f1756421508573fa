"""The images built by `make image`, run from the chart's rendered manifests with podman, scraped
by a real Prometheus.

A stable and a canary release of the full image run side by side (each a pod started from its
rendered Deployment by deploy/podman_pod.py); Prometheus scrapes both with the labels the
ServiceMonitor gives them on a cluster (namespace, pod, rollouts_pod_template_hash) and loads the
chart's rule file. Then: every PromQL expression of the AnalysisTemplate, the PrometheusRule and
the dashboard has data; the AnalysisTemplate's success conditions hold for the healthy canary and
fail once the canary serves a broken model. The tabular-only and LLM-only images run too.

Run with `make deploy-e2e` (after `make image`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1]
ROOT = DEPLOY.parent
sys.path[:0] = [str(DEPLOY), str(ROOT)]

import podman_pod  # noqa: E402

from tests import seed_bodies  # noqa: E402
from tests.artifacts import broken_onnx  # noqa: E402
from tiffin.auth import mint  # noqa: E402
from tiffin.featurize import CARD_FRAUD_FEATURES  # noqa: E402

HELM = DEPLOY / "tools" / "bin" / "helm"
CHART = DEPLOY / "helm" / "tiffin"
RULES = CHART / "files" / "prometheus-rules.yaml"
DASHBOARD = CHART / "files" / "grafana-dashboard.json"
TAG = os.environ.get("IMAGE_TAG", "0.1.0")
FULL = os.environ.get("TIFFIN_IMAGE", f"localhost/tiffin:{TAG}")
TABULAR = os.environ.get("TIFFIN_TABULAR_IMAGE", f"localhost/tiffin-tabular:{TAG}")
LLM = os.environ.get("TIFFIN_LLM_IMAGE", f"localhost/tiffin-llm:{TAG}")
NAMESPACE = "tiffin-ci"
SECRET = secrets.token_hex(32)
SECRETS = {"tiffin-jwt": {"JWT_SECRET_KEY": SECRET}}
SCRAPE_S = 2

SEED_CALLS: list[tuple[str, dict[str, Any]]] = [
    ("/predict/fraud", seed_bodies.AD_FRAUD),
    ("/predict/ctr", seed_bodies.CTR),
    ("/predict/bid", seed_bodies.BID),
    ("/score/fraud", seed_bodies.CARD_FRAUD),
    ("/score/fraud", seed_bodies.CARD_FRAUD_HIGH_RISK),
    ("/score/personalization", seed_bodies.PERSONALIZATION),
    ("/score/batch", seed_bodies.BATCH),
    ("/predict", seed_bodies.GENERIC),
    ("/v1/models/predict", seed_bodies.V1_PREDICT),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def render(release: str, *values: str, show: str | None = None) -> list[dict[str, Any]]:
    args = [str(HELM), "template", release, str(CHART), "--namespace", NAMESPACE]
    for value in values:
        args += ["--set", value]
    if show:
        args += ["--show-only", show]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def workload(release: str, image: str, port: int, *values: str) -> dict[str, Any]:
    repository, tag = image.rsplit(":", 1)
    docs = render(
        release,
        f"image.repository={repository}",
        f"image.tag={tag}",
        f"port={port}",
        "redis.enabled=false",  # each release keeps its own traffic state: the canary's split
        "workers=1",  # is its own; two pods x one worker fit this machine's two cores
        *values,
        show="templates/workload.yaml",
    )
    return docs[0]


def token(scope: str = "admin") -> dict[str, str]:
    return {"Authorization": f"Bearer {mint(SECRET, scope, 600)}"}


def traffic(pod: podman_pod.Pod, rounds: int, llm: bool = False) -> list[httpx.Response]:
    answers = []
    with httpx.Client(base_url=pod.url, timeout=60) as client:
        for i in range(rounds):
            for path, body in SEED_CALLS:
                if path == "/score/fraud":
                    body = {**body, "card_id": f"card_{i:08d}"}
                answers.append(client.post(path, json=body))
        if llm:
            for prompt in ("The card shows", "Declined because"):
                answers.append(client.post("/generate", json={"prompt": prompt, "max_tokens": 8}))
    return answers


# --- the pods and Prometheus ----------------------------------------------------------------


@pytest.fixture(scope="module")
def stable() -> Iterator[podman_pod.Pod]:
    pod = podman_pod.start(workload("tiffin", FULL, free_port()), "tiffin-stable-0", SECRETS)
    yield pod
    pod.delete()


@pytest.fixture(scope="module")
def canary() -> Iterator[podman_pod.Pod]:
    pod = podman_pod.start(workload("tiffin", FULL, free_port()), "tiffin-canary-0", SECRETS)
    yield pod
    pod.delete()


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=30)
        body = r.json()
        assert body.get("status") == "success", f"{expr}: {body}"
        return list(body["data"]["result"])

    def targets(self) -> list[dict[str, Any]]:
        body = httpx.get(f"{self.url}/api/v1/targets", timeout=10).json()
        return list(body["data"]["activeTargets"])


@pytest.fixture(scope="module")
def prometheus(stable: podman_pod.Pod, canary: podman_pod.Pod) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    assert binary, "prometheus is installed by deploy/tools/install.sh"
    workdir = Path(tempfile.mkdtemp(prefix="tiffin-prometheus-"))
    # The chart's rule file, evaluated every few seconds instead of every 30 s.
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        group["interval"] = f"{SCRAPE_S}s"
    (workdir / "rules.yaml").write_text(yaml.safe_dump(rules))

    def target(pod: podman_pod.Pod, track: str) -> dict[str, Any]:
        labels = {"namespace": NAMESPACE, "pod": pod.name, "rollouts_pod_template_hash": track}
        return {"targets": [f"127.0.0.1:{pod.port}"], "labels": labels}

    config = {
        "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
        "rule_files": [str(workdir / "rules.yaml")],
        "scrape_configs": [
            {
                "job_name": "tiffin",
                "metrics_path": "/metrics",
                "static_configs": [target(stable, "stable"), target(canary, "canary")],
            }
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (workdir / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    prom = Prometheus(f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{prom.url}/-/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        raise TimeoutError((workdir / "prometheus.log").read_text()[-3000:])
    yield prom
    process.terminate()
    process.wait(30)
    shutil.rmtree(workdir, ignore_errors=True)


# --- the AnalysisTemplate ---------------------------------------------------------------------

CONDITION = re.compile(r"^result\[0\] (>=|<=) ([0-9.]+)$")


def analysis_metrics() -> list[dict[str, Any]]:
    """The rendered AnalysisTemplate's metrics, args filled in as Argo Rollouts would."""
    docs = render("tiffin", "rollout.enabled=true", show="templates/analysistemplate.yaml")
    out = []
    for metric in docs[0]["spec"]["metrics"]:
        query = metric["provider"]["prometheus"]["query"]
        query = query.replace("{{args.namespace}}", NAMESPACE)
        query = query.replace("{{args.canary-hash}}", "canary")
        out.append({**metric, "query": query})
    return out


def judge(prom: Prometheus, metric: dict[str, Any]) -> tuple[bool, float]:
    """Evaluates the metric's successCondition on its query's result (the conditions this chart
    writes are `result[0] >= x` / `result[0] <= x`; anything else is refused, not guessed)."""
    match = CONDITION.match(metric["successCondition"])
    assert match, f"unsupported condition {metric['successCondition']!r}"
    result = prom.query(metric["query"])
    assert result, f"{metric['name']}: no data for {metric['query']}"
    value = float(result[0]["value"][1])
    op, bound = match.group(1), float(match.group(2))
    return (value >= bound if op == ">=" else value <= bound), value


# --- every expression -------------------------------------------------------------------------

THRESHOLD = re.compile(r"\s*(>=|<=|>|<|==)\s*[0-9.]+\s*$")


def every_expression() -> dict[str, str]:
    exprs = {}
    for metric in analysis_metrics():
        exprs[f"AnalysisTemplate {metric['name']}"] = metric["query"]
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                exprs[f"record {rule['record']}"] = rule["expr"]
            else:
                # An alert's expression without its threshold: the measured value must exist
                # (whether it crosses the threshold is promtool test's job).
                stripped = THRESHOLD.sub("", rule["expr"])
                assert stripped != rule["expr"], f"{rule['alert']}: no threshold found"
                exprs[f"alert {rule['alert']}"] = stripped
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "1m")
            exprs[f"panel {panel['title']!r} {target['refId']}"] = expr
    return exprs


# --- tests, in order: one shared pair of pods -------------------------------------------------


def test_pods_run_as_non_root_on_a_read_only_root(stable: podman_pod.Pod) -> None:
    inspect = json.loads(podman_pod.podman("inspect", stable.main).stdout)[0]
    assert inspect["HostConfig"]["ReadonlyRootfs"] is True
    assert inspect["Config"]["User"] == "1034:1034"
    assert podman_pod.podman("exec", stable.main, "id", "-u").stdout.strip() == "1034"
    denied = podman_pod.podman("exec", stable.main, "touch", "/home/bentoml/x", check=False)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr
    nofile = podman_pod.podman("exec", stable.main, "sh", "-c", "ulimit -Hn").stdout.strip()
    assert nofile == "unlimited" or int(nofile) >= 4096


def test_readyz_seed_bodies_score_and_metrics_scrape(
    stable: podman_pod.Pod, canary: podman_pod.Pod
) -> None:
    for pod in (stable, canary):
        assert httpx.get(f"{pod.url}/readyz", timeout=5).status_code == 200
        answers = traffic(pod, 1, llm=True)
        failed = [(r.request.url.path, r.status_code, r.text[:200]) for r in answers]
        assert all(r.status_code == 200 for r in answers), failed
        assert "ml_inference_requests_total" in httpx.get(f"{pod.url}/metrics", timeout=10).text


def test_prometheus_scrapes_both_releases(prometheus: Prometheus) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        health = {t["labels"]["pod"]: t["health"] for t in prometheus.targets()}
        if health == {"tiffin-stable-0": "up", "tiffin-canary-0": "up"}:
            return
        time.sleep(1)
    raise AssertionError(f"targets: {prometheus.targets()}")


def test_analysis_passes_for_a_healthy_canary(
    stable: podman_pod.Pod, canary: podman_pod.Pod, prometheus: Prometheus
) -> None:
    for _ in range(3):
        traffic(stable, 10)
        traffic(canary, 10)
        time.sleep(SCRAPE_S * 2)
    for metric in analysis_metrics():
        ok, value = judge(prometheus, metric)
        assert ok, f"{metric['name']} = {value} fails {metric['successCondition']}"


def test_analysis_fails_for_a_broken_canary(canary: podman_pod.Pod, prometheus: Prometheus) -> None:
    """The canary release ships a card_fraud version that scores NaN on real transactions and
    routes half of its card_fraud traffic to it through the chart's modelCanary Job (its
    rendered container, pointed at the canary pod). Tiffin answers those requests from the
    stable version but records the failures; the AnalysisTemplate must see them."""
    with httpx.Client(base_url=canary.url, timeout=120) as client:
        registered = client.post(
            "/models/register",
            json={
                "name": "card_fraud",
                "version": "v9-broken",
                "artifact_base64": broken_onnx(),
                "filename": "model.onnx",
                "feature_names": list(CARD_FRAUD_FEATURES),
                "task": "binary",
            },
            headers=token(),
        )
        assert registered.status_code == 201, registered.text
        repository, tag = FULL.rsplit(":", 1)
        job = render(
            "tiffin",
            f"image.repository={repository}",
            f"image.tag={tag}",
            "modelCanary.enabled=true",
            "modelCanary.model=card_fraud",
            "modelCanary.weights.v1\\.0=50",
            "modelCanary.weights.v9-broken=50",
            show="templates/model-canary.yaml",
        )[0]
        url = f"{canary.url}/v1/traffic-split?model=card_fraud"
        podman_pod.run_job(job, "tiffin-model-canary", SECRETS, {"URL": url})
        split = client.get("/v1/traffic-split?model=card_fraud").json()
        assert split == {"v1.0": 50, "v9-broken": 50}, split
    deadline = time.monotonic() + 120
    verdicts: dict[str, tuple[bool, float]] = {}
    while time.monotonic() < deadline:
        traffic(canary, 10)
        time.sleep(SCRAPE_S * 2)
        verdicts = {m["name"]: judge(prometheus, m) for m in analysis_metrics()}
        if not verdicts["success-rate"][0]:
            return
    raise AssertionError(f"the analysis still passes a broken canary: {verdicts}")


DRIFTING = "1.0.1-drift"


def register_drifting_version(pod: podman_pod.Pod) -> None:
    """your_model's ONNX from the pod's own store, registered again as DRIFTING with reference
    rows, so `ml_feature_drift_psi` exists whatever the image's models were saved with (a store
    trained before drift tracking has no reference distributions)."""
    onnx = "/home/bentoml/bento/models/your_model/1.0.0/model.onnx"
    artifact = podman_pod.podman("exec", pod.main, "base64", "-w0", onnx).stdout.strip()
    reference = np.random.default_rng(0).normal(0.0, 1.0, (2000, 2))
    registered = httpx.post(
        f"{pod.url}/models/register",
        json={
            "name": "your_model",
            "version": DRIFTING,
            "artifact_base64": artifact,
            "filename": "model.onnx",
            "feature_names": ["feature1", "feature2"],
            "task": "binary",
            "reference_rows": reference.tolist(),
        },
        headers=token(),
        timeout=120,
    )
    assert registered.status_code == 201, registered.text


def drifted_traffic(pod: podman_pod.Pod) -> None:
    """Rows pinned to DRIFTING, feature1 shifted by 3 standard deviations; more of them than
    TIFFIN_DRIFT_MIN_SAMPLES (100), below which the PSI gauge is not exported."""
    rng = np.random.default_rng()
    features = {
        "feature1": (rng.normal(0.0, 1.0, 150) + 3.0).tolist(),
        "feature2": rng.normal(0.0, 1.0, 150).tolist(),
    }
    body = {"model_name": "your_model", "version": DRIFTING, "features": features}
    answer = httpx.post(f"{pod.url}/predict", json=body, timeout=30)
    assert answer.status_code == 200, answer.text


def test_every_promql_expression_has_data(
    stable: podman_pod.Pod, canary: podman_pod.Pod, prometheus: Prometheus
) -> None:
    """So every metric name in the AnalysisTemplate, the rules and the dashboard is one Tiffin
    exports. A model version that fails to load (a corrupted file in the pod's model store,
    requested by version) produces the load-failure series; a version registered with reference
    rows and sent shifted rows, the drift series."""
    register_drifting_version(stable)
    store = "/home/bentoml/bento/models/your_model"
    corrupt = (
        f"cp -R {store}/1.0.0 {store}/6.6.6-corrupt && "
        f"sed -i 's/^version: 1.0.0$/version: 6.6.6-corrupt/' {store}/6.6.6-corrupt/model.yaml && "
        f"for f in {store}/6.6.6-corrupt/*.onnx; do echo corrupt > $f; done"
    )
    podman_pod.podman("exec", stable.main, "sh", "-c", corrupt)
    body = {**seed_bodies.GENERIC, "version": "6.6.6-corrupt"}
    failed = httpx.post(f"{stable.url}/predict", json=body, timeout=30)
    assert failed.status_code >= 400, failed.text
    exprs = every_expression()
    deadline = time.monotonic() + 90
    empty = list(exprs)
    while time.monotonic() < deadline:
        traffic(stable, 3, llm=True)
        traffic(canary, 3)
        drifted_traffic(stable)
        time.sleep(SCRAPE_S * 2)
        empty = [name for name, expr in exprs.items() if not prometheus.query(expr)]
        if not empty:
            return
    raise AssertionError("no data for:\n" + "\n".join(f"{n}: {exprs[n]}" for n in empty))


# --- the other images ---------------------------------------------------------------------------


def test_tabular_image_serves_without_the_llm() -> None:
    values = ["llm.inEntry=false"]
    pod = podman_pod.start(workload("tab", TABULAR, free_port(), *values), "tab-0", SECRETS)
    try:
        answers = traffic(pod, 1)
        assert all(r.status_code == 200 for r in answers), [r.text[:200] for r in answers]
        health = httpx.get(f"{pod.url}/health", timeout=5).json()
        assert health["components"]["llm"]["status"] == "disabled"
        no_mlx = podman_pod.podman("exec", pod.main, "python", "-c", "import mlx", check=False)
        assert no_mlx.returncode != 0
    finally:
        pod.delete()


def test_llm_runner_runs_as_its_own_deployment() -> None:
    repository, tag = LLM.rsplit(":", 1)
    port = free_port()
    docs = render(
        "tiffin",
        "llm.inEntry=false",
        "llm.separate.enabled=true",
        f"llm.separate.image.repository={repository}",
        f"llm.separate.image.tag={tag}",
        f"port={port}",
        show="templates/llm.yaml",
    )
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = podman_pod.start(deployment, "tiffin-llm-0", SECRETS)
    try:
        out = httpx.post(
            f"{pod.url}/generate", json={"prompt": "The card shows", "max_tokens": 8}, timeout=60
        )
        assert out.status_code == 200, out.text
        assert out.json()["usage"]["completion_tokens"] > 0
        models = httpx.get(f"{pod.url}/openai/v1/models", timeout=10)
        assert models.status_code == 200, models.text
    finally:
        pod.delete()


def test_external_redis_values_reach_a_real_redis(tmp_path: Path) -> None:
    """redis.enabled=false + redis.url (the external-Redis values): the rendered pod keeps its
    features and traffic state in that Redis (Debian's redis-server here)."""
    binary = shutil.which("redis-server")
    assert binary, "make test installs redis-server"
    port = free_port()
    redis = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    try:
        url = f"redis://127.0.0.1:{port}/0"
        doc = workload("ext", TABULAR, free_port(), "llm.inEntry=false", f"redis.url={url}")
        env = doc["spec"]["template"]["spec"]["containers"][0]["env"]
        assert {"name": "REDIS_URL", "value": url} in env
        pod = podman_pod.start(doc, "ext-0", SECRETS)
        try:
            health = httpx.get(f"{pod.url}/health", timeout=5).json()["components"]
            assert health["feature_store"]["backend"] == "redis", health
            assert health["traffic"]["backend"] == "redis", health
            scored = httpx.post(f"{pod.url}/score/fraud", json=seed_bodies.CARD_FRAUD, timeout=30)
            assert scored.status_code == 200
            assert scored.headers["x-tiffin-feature-source"] == "redis"
        finally:
            pod.delete()
    finally:
        redis.terminate()
        redis.wait(10)
