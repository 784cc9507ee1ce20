#!/usr/bin/env bash
# One-shot GPU check (run on a machine with CUDA, in the repo root): versions, the CUDA parity
# tests, a real server on --device cuda driven by the CLI, and the bench on a
# ~1.2B Llama in bf16. Results go to $OUT (or /tmp) as gpu_*.json / gpu_*.log.
set -uo pipefail
out="${OUT:-/tmp}"
export LORASERVE_CACHE=/tmp/lscache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$py" -c "import torch, transformers, peft, grpc; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'grpc', grpc.__version__, 'cuda', torch.cuda.is_available())"

echo "== CUDA parity tests"
"$py" -m pytest -q -p no:cacheprovider tests/engine/test_cuda.py 2>&1 | tail -8

echo "== server on cuda, through the CLI"
# Port 0: the server binds a free port and prints it on its "serving on" line.
"$py" -m loraserve serve --device cuda --port 0 --no-metrics --model embedded \
  --data-dir /tmp/lsdata > "$out/gpu_server.log" 2>&1 &
server=$!
for _ in $(seq 120); do grep -q "serving on" "$out/gpu_server.log" && break; sleep 0.5; done
port=$(sed -n 's/.*loraserve: serving on [^ ]*:\([0-9]*\).*/\1/p' "$out/gpu_server.log" | head -1)
"$py" scripts/make_example_adapter.py /tmp/example-adapter > /dev/null 2>&1
"$py" -m loraserve adapters upload /tmp/example-adapter --name ex --target 127.0.0.1:$port --json
"$py" -m loraserve generate --adapter ex --max-new-tokens 8 --ignore-eos --json --target 127.0.0.1:$port hello
"$py" -m loraserve info --target 127.0.0.1:$port | grep -E "device|dtype"
kill -TERM $server; wait $server; echo "server exit code: $?"

