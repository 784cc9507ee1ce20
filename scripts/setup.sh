#!/usr/bin/env bash
# Creates ./.venv and installs loraserve with its test tools. Idempotent; safe to re-run.
#
#   bash scripts/setup.sh            # CPU: torch 2.13.0 (a CPU build)
#   TORCH_SPEC=torch bash scripts/setup.sh   # GPU: the default PyPI torch, a CUDA build on Linux
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned, so the project's own `torch>=...` does not pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
if [ -z "${TORCH_SPEC:-}" ]; then
  # Triton for the tests only: without CUDA its interpreter runs the multi-LoRA kernels on CPU
  # against the torch reference (tests/engine/test_lora_kernels.py). A CUDA torch brings its own.
  .venv/bin/python -m pip install -q "triton==3.9.0"
fi
.venv/bin/python -m pip install -q -e ".[dev]"
