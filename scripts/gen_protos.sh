#!/usr/bin/env bash
# Regenerates the committed Python stubs in loraserve/v1 from protos/loraserve/v1/*.proto.
# Needs grpcio-tools (the exact version pinned in pyproject.toml's dev extra).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
python -m grpc_tools.protoc -Iprotos --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  protos/loraserve/v1/inference.proto protos/loraserve/v1/adapters.proto
