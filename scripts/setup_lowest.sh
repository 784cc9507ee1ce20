#!/usr/bin/env bash
# Creates ./.venv-lowest: loraserve with the LOWEST versions pyproject.toml admits of the libraries
# whose internals the engine touches (transformers, peft, tokenizers, safetensors, numpy), so CI
# can prove that the lower bounds still work, not only the newest releases that
# `scripts/setup.sh` installs.
#
#   bash scripts/setup_lowest.sh
#   .venv-lowest/bin/python -m pytest -q tests/engine/test_peft_parity.py
#
# The pins are read from pyproject.toml's own `>=` bounds, so raising a bound moves this venv
# with it. torch is the same CPU wheel as ./.venv (TORCH_SPEC to override): torch's lower bound
# exists on PyPI only as a multi-GB CUDA build, so it is run by hand (README, "Supported versions").
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
venv=.venv-lowest
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip
if [ -z "${TORCH_SPEC:-}" ] && [ -x .venv/bin/python ]; then
  # The same torch as ./.venv, hard-linked from it rather than unpacked again: a second copy is
  # 750 MB, and CI machines have run out of disk here. Falls back to pip where linking fails.
  .venv/bin/python scripts/link_torch.py "$venv" || true
fi
"$venv/bin/python" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
pins="$venv/lowest-pins.txt"
"$venv/bin/python" - "$pins" <<'PY'
"""Writes `name==lower` for each lowest-tested dependency, from pyproject's `>=` bounds."""
import re
import sys
import tomllib

LOWEST = ("transformers", "peft", "tokenizers", "safetensors", "numpy")
with open("pyproject.toml", "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
pins = []
for dep in deps:
    match = re.match(r"^([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+)", dep)
    if match and match.group(1).lower() in LOWEST:
        pins.append(f"{match.group(1)}=={match.group(2)}")
missing = set(LOWEST) - {p.split("==")[0].lower() for p in pins}
if missing:
    sys.exit(f"pyproject.toml has no '>=' lower bound for {sorted(missing)}")
with open(sys.argv[1], "w") as f:
    f.write("\n".join(pins) + "\n")
print("lowest pins:", " ".join(pins))
PY
# The pins are constraints, so the project's own requirements still have to accept them: a pin
# that pyproject does not admit fails the install instead of being silently replaced.
"$venv/bin/python" -m pip install -q -c "$pins" -e ".[dev]"
"$venv/bin/python" -m pip list 2>/dev/null | grep -iE '^(torch|transformers|peft|tokenizers|safetensors|numpy) '
