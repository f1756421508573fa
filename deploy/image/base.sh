#!/usr/bin/env bash
# Makes the bentofile's base image (python:3.11-slim) exist locally when no registry can serve it.
#
# `bentoml containerize` writes `FROM python:3.11-slim` (docker.distro debian, python 3.11). On a
# machine that reaches Docker Hub the engine pulls it and this script does nothing. Where only
# Debian's archive is reachable (this project's CI), a stand-in is built from Debian bookworm
# (whose python3 is 3.11) with debootstrap and imported under the same name. It offers what
# BentoML's Dockerfile expects of the official image: python/pip on PATH, apt, bash.
set -euo pipefail
IMAGE=${BASE_IMAGE:-docker.io/library/python:3.11-slim}
ENGINE=${ENGINE:-podman}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

if $ENGINE image exists "$IMAGE" 2>/dev/null; then
  echo "base image $IMAGE present"; exit 0
fi
if [ "${TIFFIN_BASE_PULL:-1}" = 1 ] && timeout 20 $ENGINE pull -q "$IMAGE" >/dev/null 2>&1; then
  echo "base image $IMAGE pulled"; exit 0
fi

echo "building a stand-in for $IMAGE from Debian $SUITE (debootstrap --variant=minbase)"
root=$(mktemp -d /var/tmp/tiffin-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
  "$SUITE" "$root" "$MIRROR" >/dev/null
# The official image's python lives in /usr/local/bin; BentoML's Dockerfile calls `pip`.
ln -sf /usr/bin/python3 "$root/usr/local/bin/python"
ln -sf /usr/bin/pip3 "$root/usr/local/bin/pip"
# Debian marks its Python "externally managed" (PEP 668); the official image does not. BentoML's
# Dockerfile runs `pip install uv` into it, then installs everything else into /app/.venv.
rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
# Same trims as the official image: no apt lists or caches in the layer.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
tar -C "$root" -c . | $ENGINE import \
  --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$IMAGE" >/dev/null
echo "base image $IMAGE built: $($ENGINE image inspect --format '{{.Size}}' "$IMAGE") bytes"
