#!/usr/bin/env bash
# Builds the Docker image for real and runs it: build, start with a mounted checkpoint, health
# SERVING (both our probe and Docker's own HEALTHCHECK), one Generate, `docker stop` exits 0.
#
# Needs root and nothing else running Docker: it installs Debian's docker.io and debootstrap,
# starts its own dockerd (own --data-root/--exec-root/socket, --bridge=none --iptables=false, so
# it touches no host networking), builds a python base image with `debootstrap --variant=minbase`
# (imported with `docker import`; the host's CA bundle copied in so pip trusts the package
# proxy), serves the local CPU torch wheel from a loopback package index (TORCH_INDEX), and runs
# everything with --network=host on 127.0.0.1. On exit it stops the daemon by PID and unmounts
# what it mounted.
#
#   sudo bash scripts/docker_smoke.sh
#
# Env: SMOKE_WORK (scratch dir, default /var/tmp/loraserve-docker-smoke, ~2 GB, removed at the
# end unless SMOKE_KEEP=1), SMOKE_CACHE (the base rootfs tarball is cached there between runs),
# DEBIAN_MIRROR, TORCH_WHEEL (default: the torch wheel in /opt/wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
started=$(date +%s)
say() { echo "[docker-smoke +$(($(date +%s) - started))s] $*"; }

[ "$(id -u)" = 0 ] || { echo "docker_smoke.sh must run as root (it starts dockerd)" >&2; exit 2; }

WORK=${SMOKE_WORK:-/var/tmp/loraserve-docker-smoke}
CACHE=${SMOKE_CACHE:-/var/cache/loraserve-docker-smoke}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm # python3 3.11, as the project requires
DOCKER=/usr/bin/docker # Debian's client, matching its daemon (a newer one may sit earlier on PATH)
TAG=loraserve:smoke
BASE_TAG=loraserve-smoke-base:$SUITE

need=()
command -v dockerd >/dev/null 2>&1 && [ -x "$DOCKER" ] || need+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
fi

# One run at a time: a second run would remove this one's roots under its daemon.
mkdir -p "$CACHE"
exec 9>"$CACHE/run.lock"
flock -n 9 || { echo "another docker_smoke.sh is running" >&2; exit 2; }
rm -rf "$WORK"
mkdir -p "$WORK"
SOCK="$WORK/docker.sock"
dockerd_pid=""
index_pid=""
container=""

cleanup() {
  rc=$?
  set +e
  if [ -n "$container" ]; then "$DOCKER" -H "unix://$SOCK" rm -f "$container" >/dev/null 2>&1; fi
  if [ -n "$index_pid" ]; then kill "$index_pid" 2>/dev/null; wait "$index_pid" 2>/dev/null; fi
  if [ -n "$dockerd_pid" ]; then
    kill "$dockerd_pid" 2>/dev/null # SIGTERM: dockerd stops its containerd and containers
    for _ in $(seq 1 60); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$dockerd_pid" 2>/dev/null
    wait "$dockerd_pid" 2>/dev/null
  fi
  # Whatever the daemon (overlay layers, netns, shm) mounted under our roots, deepest first.
  findmnt -rn -o TARGET | grep -F "$WORK/" | sort -r | while read -r target; do
    umount "$target" 2>/dev/null || umount -l "$target"
  done
  if [ "${SMOKE_KEEP:-0}" != 1 ]; then rm -rf "$WORK"; fi
  say "cleaned up (exit $rc)"
  exit $rc
}
trap cleanup EXIT
trap 'exit 143' TERM INT

# 1. The daemon: private roots and socket, no bridge, no iptables.
say "starting dockerd"
dockerd \
  --data-root "$WORK/data-root" --exec-root "$WORK/exec-root" \
  --pidfile "$WORK/dockerd.pid" -H "unix://$SOCK" \
  --bridge=none --iptables=false --ip6tables=false \
  >"$WORK/dockerd.log" 2>&1 &
dockerd_pid=$!
d() { "$DOCKER" -H "unix://$SOCK" "$@"; }
for _ in $(seq 1 120); do
  d version >/dev/null 2>&1 && break
  kill -0 "$dockerd_pid" 2>/dev/null || { cat "$WORK/dockerd.log"; echo "dockerd died" >&2; exit 1; }
  sleep 0.5
done
d version --format 'dockerd {{.Server.Version}}, storage: ' | tr -d '\n'
d info --format '{{.Driver}}'

# 2. The base image: Debian minbase with python3 + venv + pip; pip in a venv on PATH (Debian's
# system pip refuses to install into the system python, PEP 668).
base_tar="$CACHE/base-$SUITE.tar"
if [ ! -s "$base_tar" ]; then
  say "debootstrap --variant=minbase $SUITE (cached afterwards in $base_tar)"
  rootfs="$WORK/rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    "$SUITE" "$rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -30 "$WORK/debootstrap.log"; exit 1; }
  chroot "$rootfs" python3 -m venv /opt/venv
  # The host's CA bundle: pip inside the build must trust the same package proxy as the host.
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -cf "$base_tar.tmp" . && mv "$base_tar.tmp" "$base_tar"
  rm -rf "$rootfs"
fi
say "docker import $BASE_TAG"
d import \
  --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
  --change 'CMD ["python3"]' \
  "$base_tar" "$BASE_TAG" >/dev/null

# 3. A loopback package index: the local CPU torch wheel, plus its dependencies from the
# machine's local simple index (/opt/pypi), served on 127.0.0.1 (port 0: the server reports it).
wheel=${TORCH_WHEEL:-$(ls /opt/wheels/torch-*+cpu-cp311-*.whl | head -1)}
index="$WORK/index"
mkdir -p "$index/simple/torch" "$index/files"
if [ -d /opt/pypi/simple ]; then
  for dep in filelock typing-extensions setuptools sympy mpmath networkx jinja2 markupsafe fsspec; do
    [ -d "/opt/pypi/simple/$dep" ] && ln -s "/opt/pypi/simple/$dep" "$index/simple/$dep"
  done
  ln -s /opt/pypi/files/* "$index/files/"
fi
ln -sf "$wheel" "$index/files/$(basename "$wheel")"
sha=$(sha256sum "$wheel" | cut -d' ' -f1)
printf '<a href="../../files/%s#sha256=%s">%s</a>\n' \
  "$(basename "$wheel" | sed 's/+/%2B/')" "$sha" "$(basename "$wheel")" >"$index/simple/torch/index.html"
python3 -u -m http.server --bind 127.0.0.1 --directory "$index" 0 >"$WORK/index.log" 2>&1 &
index_pid=$!
for _ in $(seq 1 50); do grep -q "port" "$WORK/index.log" && break; sleep 0.1; done
index_port=$(sed -n 's/.* port \([0-9]*\) .*/\1/p' "$WORK/index.log" | head -1)
[ -n "$index_port" ] || { cat "$WORK/index.log"; exit 1; }
say "loopback index on 127.0.0.1:$index_port ($(basename "$wheel"))"

# 4. Build.
say "docker build --network=host"
build_start=$(date +%s)
d build --network=host \
  --build-arg PYTHON_IMAGE="$BASE_TAG" \
  --build-arg TORCH_INDEX="http://127.0.0.1:$index_port/simple" \
  -t "$TAG" "$REPO" >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; exit 1; }
say "built in $(($(date +%s) - build_start)) s; image $(d image inspect "$TAG" --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}')"

# 5. A checkpoint to mount: the embedded test model, built on the host into a directory.
model="$WORK/model"
"$REPO/.venv/bin/python" - "$model" <<'EOF'
import sys
from pathlib import Path

from loraserve.testing.tiny_model import TinyModelSpec, build_checkpoint

build_checkpoint(Path(sys.argv[1]), TinyModelSpec())
EOF
chmod -R a+rX "$model"

# 6. Run: a non-default port 0 (the server binds a free one and prints it), loopback host,
# development mode, the checkpoint read-only; Docker's own HEALTHCHECK probed every second.
say "docker run"
container=$(d run -d --network=host --health-interval=1s --health-start-period=120s \
  -v "$model:/models/tiny:ro" "$TAG" \
  --host 127.0.0.1 --port 0 --metrics-port 0 --model /models/tiny)
port=""
for _ in $(seq 1 240); do
  port=$(d logs "$container" 2>&1 | sed -n 's/.*loraserve: serving on 127.0.0.1:\([0-9]*\).*/\1/p' | head -1)
  [ -n "$port" ] && break
  [ "$(d inspect -f '{{.State.Running}}' "$container")" = true ] || break
  sleep 0.5
done
[ -n "$port" ] || { d logs "$container"; echo "the container never served" >&2; exit 1; }
say "serving on 127.0.0.1:$port"

# 7. Health SERVING (Docker's HEALTHCHECK and a client), then one Generate through the client.
for _ in $(seq 1 60); do
  health=$(d inspect -f '{{.State.Health.Status}}' "$container")
  [ "$health" = healthy ] && break
  sleep 1
done
[ "$health" = healthy ] || { d inspect -f '{{json .State.Health}}' "$container"; exit 1; }
say "docker HEALTHCHECK: $health"
"$REPO/.venv/bin/python" - "127.0.0.1:$port" <<'EOF'
import sys

from loraserve.client.config import ClientConfig
from loraserve.client.sync import LoraServeClient
from loraserve.v1 import inference_pb2

with LoraServeClient(ClientConfig(target=sys.argv[1], timeout_s=60)) as client:
    client.wait_until_serving(60)
    print("health: SERVING")
    reply = client.generate("Hello", max_new_tokens=8, ignore_eos=True)
    assert len(reply.token_ids) == 8, reply
    finish = inference_pb2.FinishReason.Name(reply.finish_reason)
    print(f"Generate: {len(reply.token_ids)} tokens, {finish}")
EOF

# 8. docker stop: SIGTERM, drain, exit 0.
say "docker stop"
d stop -t 30 "$container" >/dev/null
code=$(d inspect -f '{{.State.ExitCode}}' "$container")
[ "$code" = 0 ] || { d logs "$container" | tail -20; echo "exit code $code" >&2; exit 1; }
say "container exited 0; smoke test passed in $(($(date +%s) - started)) s"
