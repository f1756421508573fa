"""Static delivery checks: the chart, the rendered manifests, the custom resources, the rules,
the dashboard and the generated Dockerfile. Each validator is also shown a broken input and must
refuse it, so none of these checks passes by accepting everything.

Run with `make deploy-check` (tools from deploy/tools/install.sh).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1]
ROOT = DEPLOY.parent
TOOLS = DEPLOY / "tools"
HELM = TOOLS / "bin" / "helm"
CHART = DEPLOY / "helm" / "tiffin"
RULES = CHART / "files" / "prometheus-rules.yaml"
RULES_TEST = DEPLOY / "monitoring" / "rules-test.yaml"
DASHBOARD = CHART / "files" / "grafana-dashboard.json"
GENERATED = TOOLS / "generated"
VALUES = sorted((CHART / "ci").glob("*.yaml"))
CUSTOM_GROUPS = ("argoproj.io", "gateway.networking.k8s.io", "monitoring.coreos.com")
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion >= 1.27 allows it, and the
# HPA/PDB/NetworkPolicy APIs used are GA there) and the newest kubernetes-validate knows.
KUBE_VERSIONS = ("1.29.0", None)
BIN = Path(sys.executable).parent


def run(*args: str | Path, cwd: Path = ROOT, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))}\n{result.stdout}\n{result.stderr}")
    return result


def render(values: Path) -> list[dict[str, Any]]:
    out = run(HELM, "template", "tiffin", CHART, "--namespace", "ml", "-f", values).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def is_custom(doc: dict[str, Any]) -> bool:
    return str(doc["apiVersion"]).split("/")[0] in CUSTOM_GROUPS


def kubernetes_validate(docs: list[dict[str, Any]], tmp: Path) -> subprocess.CompletedProcess:
    path = tmp / "core.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    results = []
    for version in KUBE_VERSIONS:
        args: list[str | Path] = [BIN / "kubernetes-validate", "--strict", "--quiet", path]
        if version:
            args[1:1] = ["-k", version]
        results.append(run(*args, check=False))
    failed = [r for r in results if r.returncode != 0]
    return failed[0] if failed else results[0]


def validate_crs(docs: list[dict[str, Any]]) -> subprocess.CompletedProcess:
    lines = "".join(json.dumps(d) + "\n" for d in docs)
    return subprocess.run(
        ["node", "validate-crs.mjs"], cwd=TOOLS, input=lines, capture_output=True, text=True
    )


MODULES = {
    "argoproj.io/v1alpha1": "@kubernetes-models/argo-rollouts/argoproj.io/v1alpha1",
    "gateway.networking.k8s.io/v1": "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1",
    "monitoring.coreos.com/v1": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1",
}


def ts_source(docs: list[dict[str, Any]], dashboard: dict | None = None) -> str:
    """The documents as object literals of their model types, for tsc: excess-property checks
    refuse any field the type does not declare, at every depth."""
    lines = []
    for i, doc in enumerate(docs):
        module = MODULES[doc["apiVersion"]]
        lines.append(f'import type {{ I{doc["kind"]} as T{i} }} from "{module}";')
    for i, doc in enumerate(docs):
        lines.append(f"export const r{i}: T{i} = {json.dumps(doc, indent=2)};")
    if dashboard is not None:
        lines.append('import type { Dashboard } from "@grafana/schema";')
        lines.append(f"export const dashboard: Dashboard = {json.dumps(dashboard, indent=2)};")
    return "\n".join(lines) + "\n"


def typecheck(files: dict[str, str]) -> Any:
    """One tsc run over generated/<name>.ts for every file given (tsc takes seconds to start)."""
    shutil.rmtree(GENERATED, ignore_errors=True)
    GENERATED.mkdir()
    for name, source in files.items():
        (GENERATED / f"{name}.ts").write_text(source)
    return run("npx", "--no-install", "tsc", "-p", "tsconfig.json", cwd=TOOLS, check=False)


# --- the chart ----------------------------------------------------------------------------------


def test_helm_lint_strict() -> None:
    for values in VALUES:
        run(HELM, "lint", "--strict", CHART, "-f", values)


def test_values_schema_refuses_unknown_and_contradictory_values() -> None:
    typo = run(HELM, "template", "t", CHART, "--set", "replicas=3", check=False)
    assert typo.returncode != 0 and "replicas" in typo.stderr
    both = run(HELM, "template", "t", CHART, "--set", "redis.url=redis://r:6379", check=False)
    assert both.returncode != 0


@pytest.mark.parametrize("values", VALUES, ids=[v.stem for v in VALUES])
def test_rendered_core_resources_validate_strictly(values: Path, tmp_path: Path) -> None:
    docs = [d for d in render(values) if not is_custom(d)]
    kinds = {d["kind"] for d in docs}
    assert {"Service", "PodDisruptionBudget", "NetworkPolicy"} <= kinds
    assert "Deployment" in kinds or values.stem == "canary"  # there: an Argo Rollout
    result = kubernetes_validate(docs, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_validate_refuses_an_unknown_field(tmp_path: Path) -> None:
    docs = [d for d in render(CHART / "ci" / "default.yaml") if not is_custom(d)]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    assert kubernetes_validate(docs, tmp_path).returncode != 0


def test_pod_hardening_and_probes_as_rendered() -> None:
    docs = render(CHART / "ci" / "default.yaml")
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    main = pod["containers"][0]
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert main["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert main["startupProbe"]["httpGet"]["path"] == "/livez"
    for container in [*pod["initContainers"], main]:
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] and sc["runAsNonRoot"]
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["allowPrivilegeEscalation"]
    mounts = {m["mountPath"] for m in main["volumeMounts"]}
    assert {"/tmp", "/home/bentoml/bento/models"} <= mounts
    assert pod["terminationGracePeriodSeconds"] > int(
        main["lifecycle"]["preStop"]["exec"]["command"][1]
    )
    secret = next(e for e in main["env"] if e["name"] == "JWT_SECRET_KEY")
    assert secret["valueFrom"]["secretKeyRef"]["name"] == "tiffin-jwt"
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
    assert {m["type"] for m in hpa["spec"]["metrics"]} == {"Resource", "Pods"}


def test_rollout_canary_wiring() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in render(CHART / "ci" / "canary.yaml")}
    rollout = docs[("Rollout", "tiffin")]
    canary = rollout["spec"]["strategy"]["canary"]
    route = docs[("HTTPRoute", "tiffin")]
    backends = {b["name"]: b["weight"] for b in route["spec"]["rules"][0]["backendRefs"]}
    assert backends == {canary["stableService"]: 100, canary["canaryService"]: 0}
    assert canary["trafficRouting"]["plugins"]["argoproj-labs/gatewayAPI"]["httpRoute"] == "tiffin"
    assert ("AnalysisTemplate", canary["analysis"]["templates"][0]["templateName"]) in docs
    assert ("Service", canary["stableService"]) in docs and (
        "Service",
        canary["canaryService"],
    ) in docs
    assert (
        docs[("HorizontalPodAutoscaler", "tiffin-hpa")]["spec"]["scaleTargetRef"]["kind"]
        == "Rollout"
    )
    job = docs[("Job", "tiffin-model-canary")]
    env = {
        e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert json.loads(env["WEIGHTS"]) == {"v1": 90, "v2": 10}
    # the Gateway's namespace may reach the pods through the NetworkPolicy
    ingress = docs[("NetworkPolicy", "tiffin")]["spec"]["ingress"][0]["from"]
    namespaces = [
        f["namespaceSelector"]["matchLabels"] for f in ingress if "namespaceSelector" in f
    ]
    assert {"kubernetes.io/metadata.name": "gateway-system"} in namespaces


def test_plain_manifests_are_rendered_from_the_chart() -> None:
    result = run(sys.executable, DEPLOY / "render.py", "--check", check=False)
    assert result.returncode == 0, result.stdout


# --- custom resources ---------------------------------------------------------------------------


def canary_custom_resources() -> list[dict[str, Any]]:
    docs = [d for d in render(CHART / "ci" / "canary.yaml") if is_custom(d)]
    assert {d["kind"] for d in docs} == {
        "Rollout", "AnalysisTemplate", "HTTPRoute", "ServiceMonitor", "PrometheusRule",
    }  # fmt: skip
    return docs


def test_custom_resources_validate_against_their_models() -> None:
    docs = canary_custom_resources()
    result = validate_crs(docs)
    assert result.returncode == 0, result.stdout + result.stderr
    checked = typecheck({"crs": ts_source(docs)})
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_custom_resource_checks_refuse_bad_documents() -> None:
    docs = canary_custom_resources()
    wrong_type = json.loads(json.dumps(docs))
    rollout = next(d for d in wrong_type if d["kind"] == "Rollout")
    rollout["spec"]["replicas"] = "three"
    assert validate_crs(wrong_type).returncode != 0
    kinds = ("Rollout", "AnalysisTemplate", "HTTPRoute", "ServiceMonitor", "PrometheusRule")
    files = {}
    for kind in kinds:
        unknown = json.loads(json.dumps(docs))
        next(d for d in unknown if d["kind"] == kind)["spec"]["unknownField"] = 1
        files[f"unknown-{kind}"] = ts_source(unknown)
    result = typecheck(files)
    errors = [line for line in result.stdout.splitlines() if "unknownField" in line]
    for kind in kinds:  # each file refused for its own unknown field
        assert any(f"unknown-{kind}.ts" in line for line in errors), (kind, result.stdout)


# --- monitoring ---------------------------------------------------------------------------------


def test_promtool_checks_and_unit_tests_the_rules() -> None:
    run("promtool", "check", "rules", RULES)
    result = run("promtool", "test", "rules", RULES_TEST, cwd=RULES_TEST.parent)
    assert "SUCCESS" in result.stdout


def test_every_seed_alert_has_a_firing_unit_test() -> None:
    alerts = [
        r["alert"]
        for g in yaml.safe_load(RULES.read_text())["groups"]
        for r in g["rules"]
        if "alert" in r
    ]
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    fired = {
        case["alertname"]
        for t in tests
        for case in t.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert set(alerts) == fired


def test_dashboard_type_checks() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    result = typecheck({"dashboard": ts_source([], dashboard)})
    assert result.returncode == 0, result.stdout + result.stderr
    dashboard["panels"][1]["gridPos"]["width"] = 12
    refused = typecheck({"dashboard": ts_source([], dashboard)})
    assert refused.returncode != 0 and "width" in refused.stdout


# --- the Dockerfile -----------------------------------------------------------------------------


def test_hadolint_reports_no_errors_on_the_generated_dockerfiles() -> None:
    # make deploy-check builds the Bentos and lists their generated Dockerfiles here
    dockerfiles = os.environ.get("TIFFIN_DOCKERFILES", "").split()
    assert dockerfiles, "TIFFIN_DOCKERFILES is empty: run through make deploy-check"
    for dockerfile in dockerfiles:
        result = run(BIN / "hadolint", "--failure-threshold", "error", dockerfile, check=False)
        assert result.returncode == 0, f"{dockerfile}\n{result.stdout}"


# --- the compose stack --------------------------------------------------------------------------

COMPOSE = DEPLOY / "compose"


def test_compose_stack_mounts_existing_files_and_a_valid_prometheus_config(tmp_path: Path) -> None:
    compose = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    assert {"tiffin", "redis", "prometheus", "grafana"} <= set(compose["services"])
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE / source).exists(), source
    config = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    config["rule_files"] = [str(RULES)]  # where compose mounts it: the chart's rule file
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    run("promtool", "check", "config", tmp_path / "prometheus.yml")
    broken = {**config, "scrape_configs": [{"job_name": "x", "scrape_interval": "soon"}]}
    (tmp_path / "broken.yml").write_text(yaml.safe_dump(broken))
    assert run("promtool", "check", "config", tmp_path / "broken.yml", check=False).returncode != 0
