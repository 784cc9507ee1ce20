#!/usr/bin/env bash
# One prepared GPU run (run in the repo root on a CUDA machine; on an H200 it took 457 s with
# GPU_CHECK_SKIP=sync,grpc-switch,kernels,grpcproxy, the eagerprefill part 50 s of it; every
# part adds about 3 more minutes):
# versions,
# the CUDA parity tests (again with async_decode off), the kernel bench (bench/kernels.py:
# multi-LoRA kernel variants and one whole decode step, base vs distinct adapters, sdpa vs triton
# attention, fused_ops on and off; KERNELS_ONLY adds profile / first_calls), then loraserve's bench
# on the ~1.2B Llama in bf16 (batch 32, 64 rank-16 adapters, prompt 128, output 64: base /
# identical / distinct / uniform / skewed, end-to-end and decode-only tokens/s, cold and warm
# time to first token, and the same load through the real gRPC server; base and distinct again
# with async_decode off), the plain-PyTorch anchor
# (../shared/gpu/anchor.py, or ./anchor.py, or $ANCHOR), cold loads beside running rows, and a
# CLI smoke of the server. Parts run in that order (most telling first) and each has its own
# time limit, so a cut-short run still leaves what it measured. Logs go to $OUT (default
# /tmp/gpu_check); the last thing printed is the issue's table.
#   GPU_CHECK_REPEATS (default 2) timed runs per bench mode;
#   GPU_CHECK_SKIP=parity,parity-sync,kernels,bench,loraoverlap,sync,grpc-switch,eagerprefill,anchor,
#   overlap,coldload,commit,hoststep,grpcproxy,server skips parts (loraoverlap: base and distinct
#   again with lora_overlap=true, one run, printed as "(shrinks beside)"; grpc-switch: the gRPC part again with
#   a 0.5 ms thread switch interval; eagerprefill: the bench's distinct, cold and gRPC parts
#   again with prefill graphs off, one run, and cold_overlap likewise; commit: bench.commit_cost, the engine thread's commit of one cold
#   adapter, with room and evicting; hoststep: bench.host_step, the engine thread's host work per decode step;
#   grpcproxy: bench.grpc_overhead, gRPC against in process on a stubbed device, CPU only);
#   GPU_CHECK_GRPC=0 drops the bench's gRPC part; PARITY_TIMEOUT / PARITY_SYNC_TIMEOUT /
#   KERNELS_TIMEOUT / BENCH_TIMEOUT / SYNC_TIMEOUT / SWITCH_TIMEOUT / ANCHOR_TIMEOUT /
#   OVERLAP_TIMEOUT cap each part (s);
#   PARITY_FILES (default: the CUDA engine, side-stream, kernel and fused-op tests) picks the parity part's
#   test files;
#   KERNELS_ONLY (default lora,step) picks the kernel bench's parts: lora, step, profile,
#   first_calls (python -m loraserve.bench.kernels --help).
#   LORASERVE_ENGINE_OPTS adds --engine-opt FIELD=VALUE (e.g. enforce_eager=true).
#   GPU_CHECK_ATTENTION=1 also benches decode attention=sdpa against attention=triton end to end.
#   GPU_CHECK_SAMPLED=1 also runs the distinct modes sampled (temperature 0.8, top-p 0.95).
#   GPU_CHECK_PROFILE=1 also samples the engine thread's stacks during base and distinct decode:
#   waiting on the device against host work. With py-spy (GPU_WHEELS may carry its wheel) from
#   outside the process, which sees host work in Python as it is; else bench.run --profile.
# With py-spy, the hoststep part also profiles the stubbed decode steps, base and distinct.
set -uo pipefail
out="${OUT:-/tmp/gpu_check}"
mkdir -p "$out"
export LORASERVE_CACHE="${LORASERVE_CACHE:-/tmp/lscache}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
# GPU_WHEELS=DIR: wheels the machine lacks or has too old (grpcio >= 1.85.1 for the stubs,
# grpcio-health-checking, grpcio-reflection), installed beside its own packages.
if [ -n "${GPU_WHEELS:-}" ]; then
  "$py" -m pip install -q --no-index --no-deps --upgrade --target /tmp/gpu_site "$GPU_WHEELS"/*.whl \
    && export PYTHONPATH="/tmp/gpu_site${PYTHONPATH:+:$PYTHONPATH}"
fi
pyspy="$(command -v py-spy || true)"
[ -z "$pyspy" ] && [ -x /tmp/gpu_site/bin/py-spy ] && pyspy=/tmp/gpu_site/bin/py-spy
# py-spy from outside the process, not pausing it (--nonblocking), waits included (--idle).
spy=("$pyspy" record --threads --idle --nonblocking -r 500 -f raw)
skip="${GPU_CHECK_SKIP:-}"
opts=()
for o in ${LORASERVE_ENGINE_OPTS:-}; do opts+=(--engine-opt "$o"); done
repeats="${GPU_CHECK_REPEATS:-2}"
# Every bench.run part runs the issue's setup: the ~1.2B Llama in bf16, batch 32, 64 rank-16
# adapters, prompt 128, output 64; and its gRPC part unless GPU_CHECK_GRPC=0.
bench=("$py" -m loraserve.bench.run --size 1b --device cuda --dtype bfloat16 --batch 32
  --adapters 64 --rank 16 --prompt-len 128 --output-len 64)
grpc_part=",grpc"
[ "${GPU_CHECK_GRPC:-1}" = 0 ] && grpc_part=""
anchor="${ANCHOR:-}"
for candidate in ../shared/gpu/anchor.py anchor.py; do
  [ -z "$anchor" ] && [ -f "$candidate" ] && anchor="$candidate"
done

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$out/gpu.txt"

if [[ ",$skip," != *",parity,"* ]]; then
  echo "== CUDA parity tests"
  start=$SECONDS
  # shellcheck disable=SC2086  # PARITY_FILES is a list of paths
  timeout "${PARITY_TIMEOUT:-150}" "$py" -m pytest -q -p no:cacheprovider \
    ${PARITY_FILES:-tests/engine/test_cuda.py tests/engine/test_side_stream.py tests/engine/test_lora_kernels.py tests/engine/test_fused_ops.py} \
    > "$out/parity.log" 2>&1
  echo "parity exit $? in $((SECONDS - start)) s: $(tail -1 "$out/parity.log")"
fi

if [[ ",$skip," != *",parity-sync,"* ]]; then
  echo "== CUDA engine tests with async_decode off (each step's tokens read before the next)"
  start=$SECONDS
  timeout "${PARITY_SYNC_TIMEOUT:-120}" "$py" -m pytest -q -p no:cacheprovider tests/engine/test_cuda.py \
    --sync-decode > "$out/parity-sync.log" 2>&1
  echo "parity-sync exit $? in $((SECONDS - start)) s: $(tail -1 "$out/parity-sync.log")"
fi

if [[ ",$skip," != *",kernels,"* ]]; then
  echo "== kernel bench: multi-LoRA kernel variants, one decode step (base vs distinct, sdpa vs triton)"
  start=$SECONDS
  timeout "${KERNELS_TIMEOUT:-150}" "$py" -m loraserve.bench.kernels --size 1b --dtype bfloat16 \
    --batch 32 --only "${KERNELS_ONLY:-lora,step}" --json "$out/kernels.json" > "$out/kernels.log" 2>&1
  echo "kernels exit $? in $((SECONDS - start)) s"
  sed -n '/^multi-LoRA kernels/,$p' "$out/kernels.log"
fi

if [[ ",$skip," != *",bench,"* ]]; then
  echo "== bench, ~1.2B Llama, bf16"
  start=$SECONDS
  timeout "${BENCH_TIMEOUT:-330}" "${bench[@]}" --repeats "$repeats" --distinct-sweep 32 \
    --cold-samples 4 --only "distinct,cold${grpc_part}" --grpc-requests 96 \
    --out "$out/bench" --no-plot "${opts[@]}" > "$out/bench.log" 2>&1
  echo "bench exit $? in $((SECONDS - start)) s"
fi

if [[ ",$skip," != *",loraoverlap,"* ]]; then
  # --lora-overlap: each adapter shrink on a side stream beside its base matmul (off by
  # default until this part measures it); base rows run no adapter term, so base / distinct
  # within this run is the comparison.
  echo "== bench with the adapter shrinks beside the base matmuls (lora_overlap=true), one run"
  start=$SECONDS
  timeout "${LORAOVERLAP_TIMEOUT:-150}" "${bench[@]}" --repeats 1 --distinct-sweep 32 \
    --only distinct --out "$out/bench-loraoverlap" --no-plot \
    --engine-opt lora_overlap=true "${opts[@]}" > "$out/bench-loraoverlap.log" 2>&1
  echo "loraoverlap exit $? in $((SECONDS - start)) s"
fi

if [[ ",$skip," != *",sync,"* ]]; then
  echo "== bench with async_decode off, base and distinct rows"
  start=$SECONDS
  timeout "${SYNC_TIMEOUT:-150}" "${bench[@]}" --repeats "$repeats" --distinct-sweep 32 \
    --only distinct --out "$out/bench-sync" --no-plot \
    --engine-opt async_decode=false "${opts[@]}" > "$out/bench-sync.log" 2>&1
  echo "sync bench exit $? in $((SECONDS - start)) s"
fi

if [[ ",$skip," != *",grpc-switch,"* && "${GPU_CHECK_GRPC:-1}" != 0 ]]; then
  echo "== gRPC part again, the server's thread switch interval at 0.5 ms (Python's is 5 ms)"
  start=$SECONDS
  timeout "${SWITCH_TIMEOUT:-120}" "${bench[@]}" --repeats "$repeats" --only grpc \
    --grpc-requests 96 --out "$out/grpc-switch" --no-plot \
    --engine-opt gil_switch_interval_seconds=0.0005 "${opts[@]}" > "$out/grpc-switch.log" 2>&1
  echo "grpc-switch exit $? in $((SECONDS - start)) s"
fi

if [[ ",$skip," != *",eagerprefill,"* ]]; then
  # Prefill graphs (--prefill-graph-tokens) against every prefill eager, the rest as the bench.
  echo "== bench again with every prefill eager (prefill_graph_tokens=0), one run"
  start=$SECONDS
  timeout "${EAGERPREFILL_TIMEOUT:-240}" "${bench[@]}" --repeats 1 --cold-samples 4 \
    --only "distinct,cold${grpc_part}" --grpc-requests 96 \
    --out "$out/bench-eagerprefill" --no-plot --engine-opt prefill_graph_tokens=0 "${opts[@]}" \
    > "$out/bench-eagerprefill.log" 2>&1
  echo "eagerprefill exit $? in $((SECONDS - start)) s"
fi

if [[ ",$skip," != *",anchor,"* && -n "$anchor" ]]; then
  echo "== anchor ($anchor)"
  start=$SECONDS
  timeout "${ANCHOR_TIMEOUT:-150}" "$py" "$anchor" > "$out/anchor.jsonl" 2> "$out/anchor.err"
  echo "anchor exit $? in $((SECONDS - start)) s"
fi

if [[ ",$skip," != *",overlap,"* ]]; then
  # With prefill graphs (the default), then every prefill eager: the cold rounds' joiners'
  # prefills stall the running rows. (At b5d15f2 a 0.5 ms thread switch interval took 2.45x to
  # 2.20x: OVERLAP_SWITCH=1 runs that too.)
  runs=("overlap:")
  [[ ",$skip," != *",eagerprefill,"* ]] && runs+=("overlap-eagerprefill:--engine-opt prefill_graph_tokens=0")
  [ -n "${OVERLAP_SWITCH:-}" ] && runs+=("overlap-switch:--gil-switch-interval 0.0005")
  for run in "${runs[@]}"; do
    name="${run%%:*}"
    echo "== cold loads beside running rows (time per output token, cold vs warm joiners) ${run#*:}"
    start=$SECONDS
    # shellcheck disable=SC2086  # the flag and its value are two words
    timeout "${OVERLAP_TIMEOUT:-90}" "$py" -m loraserve.bench.cold_overlap --size 1b --device cuda \
      --dtype bfloat16 --batch 32 --joiners 8 ${run#*:} --json "$out/$name.json" \
      > "$out/$name.log" 2>&1
    echo "$name exit $? in $((SECONDS - start)) s"
    # Each round's TPOT line and where the engine thread's time went, warm and cold.
    grep -E '^round|^  (warm|cold):' "$out/$name.log" | tail -9
    grep -E '"(tpot_cold_over_warm|decode_step_warm_s|decode_step_cold_s)"' "$out/$name.log"
  done
fi

if [[ ",$skip," != *",coldload,"* ]]; then
  echo "== one cold adapter's host work: read, checksum, validate, stage on the GPU (and on the host) (1b rank-16 q/k/v/o, bf16)"
  start=$SECONDS
  timeout "${COLDLOAD_TIMEOUT:-60}" "$py" -m loraserve.bench.cold_load --size 1b --storage bfloat16 \
    --page-dtype bfloat16 --device cuda > "$out/coldload.log" 2>&1
  echo "coldload exit $? in $((SECONDS - start)) s"
  grep -v "^ \\|^{\\|^}" "$out/coldload.log"; grep -A2 -E "\"(read|sha256|sha256 pieces|validate|stage|stage, host layout)\"" "$out/coldload.log" | grep -v best | tr -s " \\n" " "; echo
fi

if [[ ",$skip," != *",commit,"* ]]; then
  echo "== committing one cold adapter on the engine thread (16 layers' q/k/v/o groups, CUDA launches)"
  start=$SECONDS
  timeout "${COMMIT_TIMEOUT:-60}" "$py" -m loraserve.bench.commit_cost --size 1b --device cuda \
    > "$out/commit.log" 2>&1
  echo "commit exit $? in $((SECONDS - start)) s"
  grep "^commit" "$out/commit.log"
fi

if [[ ",$skip," != *",hoststep,"* ]]; then
  echo "== the engine thread's host work per decode step on this machine's CPU (forwards stubbed)"
  start=$SECONDS
  timeout "${HOSTSTEP_TIMEOUT:-60}" "$py" -m loraserve.bench.host_step > "$out/hoststep.log" 2>&1
  echo "hoststep exit $? in $((SECONDS - start)) s"
  tail -3 "$out/hoststep.log"
  if [ -n "$pyspy" ]; then
    # Where it goes, per mode (timed above without the profiler).
    for mode in base distinct; do
      timeout "${HOSTSTEP_TIMEOUT:-60}" "${spy[@]}" -o "$out/hoststep-$mode.pyspy" -- "$py" -m \
        loraserve.bench.host_step --modes "$mode" --repeats 1 --tokens 1024 > /dev/null 2>&1
      # By function, not thread name: py-spy keeps the first name it saw for a thread id, and
      # the OS reuses the ids of the bench's finished threads. Only the engine decodes.
      "$py" -m loraserve.bench.pyspy_report "$out/hoststep-$mode.pyspy" --top 20 \
        --within _decode_step > "$out/hoststep-$mode.profile" 2>&1
      head -22 "$out/hoststep-$mode.profile"
    done
  fi
fi

if [[ ",$skip," != *",grpcproxy,"* ]]; then
  echo "== gRPC / in-process on a stubbed 1.5 ms device (bench.grpc_overhead; CPU only, compare with the bench's gRPC part)"
  start=$SECONDS
  timeout "${GRPCPROXY_TIMEOUT:-120}" "$py" -m loraserve.bench.grpc_overhead --repeats 1 \
    > "$out/grpcproxy.log" 2>&1
  echo "grpcproxy exit $? in $((SECONDS - start)) s"
  tail -3 "$out/grpcproxy.log"
fi

if [[ ",$skip," != *",server,"* ]]; then
  echo "== server on cuda, through the CLI"
  # Port 0: the server binds a free port and prints it on its "serving on" line.
  "$py" -m loraserve serve --device cuda --port 0 --no-metrics --model embedded \
    --data-dir /tmp/lsdata > "$out/server.log" 2>&1 &
  server=$!
  for _ in $(seq 120); do grep -q "serving on" "$out/server.log" && break; sleep 0.5; done
  port=$(sed -n 's/.*loraserve: serving on [^ ]*:\([0-9]*\).*/\1/p' "$out/server.log" | head -1)
  "$py" scripts/make_example_adapter.py /tmp/example-adapter > /dev/null 2>&1
  timeout 60 "$py" -m loraserve adapters upload /tmp/example-adapter --name ex --target "127.0.0.1:$port" --json
  timeout 60 "$py" -m loraserve generate --adapter ex --max-new-tokens 8 --ignore-eos --json \
    --target "127.0.0.1:$port" hello
  kill -TERM $server; wait $server; echo "server exit code: $?"
fi

if [[ -n "${GPU_CHECK_ATTENTION:-}" ]]; then
  echo "== decode attention: the paged Triton kernel vs SDPA (distinct mode, one run each)"
  for backend in sdpa triton; do
    start=$SECONDS
    timeout "${ATTENTION_TIMEOUT:-120}" "${bench[@]}" --repeats 1 --only distinct \
      --out "$out/attention-$backend" --no-plot \
      --engine-opt "attention=$backend" > "$out/attention-$backend.log" 2>&1
    echo "attention=$backend exit $? in $((SECONDS - start)) s: $(grep -i 'decode' "$out/attention-$backend.log" | tail -2 | tr '\n' ' ')"
  done
fi

if [[ -n "${GPU_CHECK_PROFILE:-}" ]]; then
  # Where the engine thread's time goes per decode step in process (bench/sampler.py): time
  # waiting on the device (event synchronize, the token read) against host work. In process a
  # decode step took about 0.37 ms more than its captured graph at b5d15f2, base and adapters
  # alike, while the host work fits inside the graph's time: this tells which side it is on.
  echo "== the engine thread's stacks during base and distinct decode (bench.run --profile)"
  start=$SECONDS
  run=("${bench[@]}" --repeats 1 --only distinct --out "$out/profile" --no-plot "${opts[@]}")
  if [ -n "$pyspy" ]; then
    # Base and distinct together (the bench runs both); decode steps only.
    timeout "${PROFILE_TIMEOUT:-150}" "${spy[@]}" -o "$out/profile.pyspy" -- "${run[@]}" \
      > "$out/profile.log" 2>&1
    echo "profile exit $? in $((SECONDS - start)) s"
    "$py" -m loraserve.bench.pyspy_report "$out/profile.pyspy" --within _decode_step \
      --top 30 | tee "$out/profile.txt"
  else
    timeout "${PROFILE_TIMEOUT:-150}" "${run[@]}" --profile > "$out/profile.log" 2>&1
    echo "profile exit $? in $((SECONDS - start)) s"
    head -60 "$out/profile/profile.txt" 2>/dev/null
  fi
fi

if [[ -n "${GPU_CHECK_SAMPLED:-}" ]]; then
  echo "== sampled requests (temperature 0.8, top-p 0.95), distinct modes, one run"
  start=$SECONDS
  timeout "${SAMPLED_TIMEOUT:-120}" "${bench[@]}" --repeats 1 --distinct-sweep 32 --only distinct \
    --temperature 0.8 --top-p 0.95 \
    --out "$out/sampled" --no-plot > "$out/sampled.log" 2>&1
  echo "sampled exit $? in $((SECONDS - start)) s: $(grep -E '^(base|loraserve-distinct) ' "$out/sampled.log" | tr -s ' ' | tr '\n' ';')"
fi

"$py" - "$out" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
anchor = {}
for line in (out / "anchor.jsonl").read_text().splitlines() if (out / "anchor.jsonl").exists() else []:
    try:
        row = json.loads(line)
    except ValueError:
        continue
    if "mode" in row:
        anchor[row["mode"]] = row
bench = {}
if (out / "bench" / "bench.json").exists():
    bench = json.loads((out / "bench" / "bench.json").read_text())
modes = dict(bench.get("batch", {}).get("modes", {}))
others = {}
for part, label in (
    ("bench-sync", "async_decode off"),
    ("bench-eagerprefill", "prefills eager"),
    ("bench-loraoverlap", "shrinks beside"),
):
    if (out / part / "bench.json").exists():
        others[label] = json.loads((out / part / "bench.json").read_text())
        for name, entry in others[label].get("batch", {}).get("modes", {}).items():
            modes[f"{name} ({label})"] = entry
cold = bench.get("cold_start", {})


def fmt(v, f="{:,.0f}"):
    return "-" if not isinstance(v, (int, float)) else f.format(v)


print("\n| what | tokens/s | decode tokens/s | vs base of its run (decode) |")
print("| --- | --- | --- | --- |")
base = modes.get("base", {})
for name, entry in modes.items():
    # Against the base rows of the same run: "distinct (label)" against "base (label)".
    label = name[name.index(" ("):] if " (" in name else ""
    own = modes.get(f"base{label}", base)
    ratio = None
    if entry.get("decode_tokens_per_s") and own.get("decode_tokens_per_s"):
        ratio = entry["decode_tokens_per_s"] / own["decode_tokens_per_s"]
    print(f"| loraserve {name} | {fmt(entry.get('tokens_per_s'))} | "
          f"{fmt(entry.get('decode_tokens_per_s'))} | {fmt(ratio, '{:.3f}')} |")
for mode in ("eager-base", "eager-lora", "graph-base", "graph-lora", "limit"):
    if mode in anchor:
        row = anchor[mode]
        print(f"| anchor {mode} | {fmt(row.get('tokens_per_s'))} | "
              f"({fmt(row.get('ms_per_step'), '{:.2f}')} ms/step) | |")
if "graph-base" in anchor and base.get("decode_tokens_per_s"):
    print(f"\nloraserve base decode / anchor graph-base: "
          f"{base['decode_tokens_per_s'] / anchor['graph-base']['tokens_per_s']:.2f}x")
eager = others.get("prefills eager", {})
for label, run in (("", bench), (" (prefills eager)", eager)):
    cold_run = run.get("cold_start", {})
    if cold_run:
        print(f"cold / warm TTFT{label}: {fmt(cold_run.get('cold_ttft_s', 0) * 1e3, '{:.1f}')} / "
              f"{fmt(cold_run.get('warm_ttft_s', 0) * 1e3, '{:.1f}')} ms = "
              f"{fmt(cold_run.get('cold_over_warm'), '{:.2f}')}x")
    for ratio in run.get("ratios", []):  # the bench's own: gRPC vs in process, end to end
        if ratio["name"].startswith("gRPC / in-process"):
            print(f"{ratio['name']}{label}: {fmt(ratio['value'], '{:.2f}')}x ({ratio['detail']})")
grpc_runs = {"": bench.get("grpc", {})}
if eager.get("grpc"):
    grpc_runs[", prefills eager"] = eager["grpc"]
if (out / "grpc-switch" / "bench.json").exists():
    switched = json.loads((out / "grpc-switch" / "bench.json").read_text())
    grpc_runs[", switch interval 0.5 ms"] = switched.get("grpc", {})
for label, grpc in grpc_runs.items():
    for mode, entry in grpc.get("modes", {}).items():
        steps = entry.get("server_steps") or {}
        if not steps.get("decode_steps"):
            continue
        requests = entry.get("requests") or 0
        loop_ms = steps.get("cpu_s:MainThread", float("nan")) * 1e3 / max(requests, 1)
        print(f"gRPC {mode}{label}: {fmt(entry.get('tokens_per_s'))} tokens/s; the server's "
              f"engine: {fmt(steps['prefill_steps'])} prefills "
              f"({fmt(steps['prefill_s'] * 1e3)} ms), {fmt(steps['decode_steps'])} decode steps "
              f"({fmt(steps['decode_s'] * 1e3 / steps['decode_steps'], '{:.2f}')} ms each), "
              f"{fmt(steps['mean_rows_per_step'], '{:.1f}')} rows per step; event loop CPU "
              f"{fmt(loop_ms, '{:.2f}')} ms per request")
for name in ("parity", "parity-sync"):
    log = out / f"{name}.log"
    if log.exists() and log.read_text().strip():
        print(f"CUDA {name}:", log.read_text().strip().splitlines()[-1])
for name in ("errors",):
    if bench.get(name):
        print("bench errors:", bench[name])
EOF
