"""Runs one replica of a rendered Deployment (or Rollout) with podman, as the kubelet would.

`podman kube play` (4.3, Debian bookworm) cannot run this chart's pods here: it refuses host
networking with declared container ports, and with a bridge network it races its own
init-container cleanup ("cannot remove container ... as it is running"). So this reads the
rendered pod template and starts the same containers with podman run: the init containers to
completion first, then the main container with the rendered image, args, env (values,
secretKeyRef from the given secrets, fieldRef metadata.name), security context (user, read-only
root filesystem, dropped capabilities, no privilege escalation), emptyDir volumes (podman
volumes shared by the pod's containers), memory limit, and readiness judged by the rendered
readiness probe. Networking is the host's: give each release its own port (values `port`).
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

ENGINE = "podman"


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ENGINE, *args], check=check, capture_output=True, text=True)


@dataclass
class Pod:
    name: str
    port: int
    containers: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    grace_s: int = 30

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def main(self) -> str:
        return self.containers[-1]

    def logs(self) -> str:
        return podman("logs", self.main, check=False).stdout[-4000:]

    def delete(self) -> None:
        for name in self.containers:
            podman("stop", "-t", str(self.grace_s), name, check=False)
            podman("rm", "-f", name, check=False)
        for volume in self.volumes:
            podman("volume", "rm", "-f", volume, check=False)


def _env(container: dict[str, Any], pod: str, secrets: dict[str, dict[str, str]]) -> list[str]:
    args = []
    for var in container.get("env", []):
        if "value" in var:
            value = str(var["value"])
        elif ref := var.get("valueFrom", {}).get("secretKeyRef"):
            value = secrets[ref["name"]][ref["key"]]
        elif var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
            value = pod
        else:
            raise ValueError(f"unsupported env source: {var}")
        args += ["--env", f"{var['name']}={value}"]
    return args


def _security(container: dict[str, Any], pod_security: dict[str, Any]) -> list[str]:
    sc = {**pod_security, **container.get("securityContext", {})}
    args = []
    if "runAsUser" in sc:
        args += ["--user", f"{sc['runAsUser']}:{sc.get('runAsGroup', sc['runAsUser'])}"]
    if sc.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    for cap in sc.get("capabilities", {}).get("drop", []):
        args += ["--cap-drop", cap]
    if sc.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    return args


def _memory(container: dict[str, Any]) -> list[str]:
    limit = container.get("resources", {}).get("limits", {}).get("memory")
    if not limit:
        return []
    units = {"Ki": "k", "Mi": "m", "Gi": "g"}
    for suffix, unit in units.items():
        if str(limit).endswith(suffix):
            return ["--memory", str(limit)[: -len(suffix)] + unit]
    return ["--memory", str(limit)]


def start(
    workload: dict[str, Any], pod: str, secrets: dict[str, dict[str, str]], ready_s: float = 180
) -> Pod:
    template = workload["spec"]["template"]
    spec = template["spec"]
    main = spec["containers"][0]
    port = next(p["containerPort"] for p in main["ports"] if p["name"] == "http")
    running = Pod(pod, port, grace_s=spec.get("terminationGracePeriodSeconds", 30))
    volumes = {}
    for volume in spec.get("volumes", []):
        if "emptyDir" not in volume:
            raise ValueError(f"unsupported volume: {volume}")
        volumes[volume["name"]] = f"{pod}-{volume['name']}"
        podman("volume", "create", volumes[volume["name"]])
        running.volumes.append(volumes[volume["name"]])
    pod_security = {
        k: v for k, v in spec.get("securityContext", {}).items() if k in ("runAsUser", "runAsGroup")
    }

    def run_args(container: dict[str, Any], name: str) -> list[str]:
        args = ["--name", name, "--network", "host", "--label", f"tiffin.pod={pod}"]
        args += _env(container, pod, secrets) + _security(container, pod_security)
        args += _memory(container)
        for mount in container.get("volumeMounts", []):
            # :U gives the volume to the container's user, as fsGroup does on a kubelet.
            args += ["--volume", f"{volumes[mount['name']]}:{mount['mountPath']}:U"]
        if "command" in container:
            args += ["--entrypoint", container["command"][0]]
        args.append(container["image"])
        args += container.get("command", [])[1:] + [str(a) for a in container.get("args", [])]
        return args

    try:
        for init in spec.get("initContainers", []):
            name = f"{pod}-{init['name']}"
            running.containers.append(name)
            result = podman("run", *run_args(init, name), check=False)
            if result.returncode != 0:
                raise RuntimeError(f"init container {name} failed: {result.stderr[-2000:]}")
        name = f"{pod}-{main['name']}"
        running.containers.append(name)
        podman("run", "--detach", *run_args(main, name))
        probe = main["readinessProbe"]["httpGet"]["path"]
        deadline = time.monotonic() + ready_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{running.url}{probe}", timeout=2) as response:
                    if response.status == 200:
                        return running
            except OSError:
                pass
            state = podman("inspect", "--format", "{{.State.Running}}", name).stdout.strip()
            if state != "true":
                raise RuntimeError(f"{name} exited:\n{running.logs()}")
            time.sleep(1)
        raise TimeoutError(f"{name} not ready after {ready_s}s:\n{running.logs()}")
    except BaseException:
        running.delete()
        raise


def run_job(
    job: dict[str, Any],
    name: str,
    secrets: dict[str, dict[str, str]],
    env: dict[str, str] | None = None,
) -> str:
    """Runs a rendered Job's container to completion and returns its output; `env` replaces
    rendered values (e.g. a Service URL that only cluster DNS resolves)."""
    spec = job["spec"]["template"]["spec"]
    container = json.loads(json.dumps(spec["containers"][0]))
    overrides = env or {}
    container["env"] = [
        {"name": v["name"], "value": overrides[v["name"]]} if v["name"] in overrides else v
        for v in container.get("env", [])
    ]
    pod_security = {
        k: v for k, v in spec.get("securityContext", {}).items() if k in ("runAsUser", "runAsGroup")
    }
    args = ["--rm", "--name", name, "--network", "host"]
    args += _env(container, name, secrets) + _security(container, pod_security)
    for mount in container.get("volumeMounts", []):
        args += ["--tmpfs", mount["mountPath"]]  # the Job's volumes are emptyDirs
    if "command" in container:
        args += ["--entrypoint", container["command"][0]]
    args.append(container["image"])
    args += container.get("command", [])[1:] + [str(a) for a in container.get("args", [])]
    result = podman("run", *args, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"job {name} failed: {result.stdout[-2000:]}{result.stderr[-2000:]}")
    return result.stdout
