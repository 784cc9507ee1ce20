"""Scale-out bench: the through-gRPC bench against `loraserve serve-ray` with 1, 2, ... replicas.

For each replica count it starts a cluster (`serve-ray --replicas N`, the same server flags as
the single-server gRPC bench), runs `loraserve bench --only grpc --grpc-target` against it, and
stops it; then prints tokens/s and time to first token side by side with the CPU cores the run
had. Ray listens on every interface, so on a loopback-only machine run it in a private network:

    unshare -n python -m loraserve.server.ray.netns -- \\
        python -m loraserve.bench.ray_scaleout --replicas 1,2 -- \\
        --quick --adapters 64 --grpc-popularity zipf --skew-alpha 1.0

All replicas share the machine's cores: on N CPU cores, N replicas cannot beat one replica that
already uses them all; the design target, one device per replica, is close to N x one replica.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from loraserve.bench.grpc_server import settings_serve_flags
from loraserve.bench.models import bench_model_path
from loraserve.bench.settings import settings_from_args


def _first_line(process: subprocess.Popen[str], timeout: float) -> str:
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return lines[0] if lines else ""


def run_one(replicas: int, threads: int, bench_args: list[str], out_dir: Path) -> dict:
    s = settings_from_args(["--only", "grpc", *bench_args])
    model_dir = bench_model_path(
        s.size,
        seed=s.seed,
        storage_dtype="float32" if s.dtype == "float32" else "bfloat16",
        cache_dir=s.cache_dir,
    )
    work = Path(tempfile.mkdtemp(prefix=f"scaleout-{replicas}-"))
    flags = settings_serve_flags(s, model_dir, work / "data")
    argv = [sys.executable, "-m", "loraserve", "serve-ray", "--replicas", str(replicas)]
    argv += ["--threads-per-replica", str(threads), "--port", "0"]
    argv += [x for kv in flags.items() for x in kv]
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "serve-ray.log", "w") as log:
        cluster = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            line = _first_line(cluster, 600)
            if "serving on" not in line:
                raise RuntimeError(f"serve-ray did not start; see {out_dir / 'serve-ray.log'}")
            target = "127.0.0.1:" + line.split("serving on ")[1].split()[0].rsplit(":", 1)[1]
            bench = [sys.executable, "-m", "loraserve", "bench", "--only", "grpc"]
            bench += ["--grpc-target", target, "--out", str(out_dir), "--no-plot", *bench_args]
            subprocess.run(bench, check=True)
        finally:
            cluster.send_signal(signal.SIGTERM)
            cluster.wait(120)
    grpc = json.loads((out_dir / "bench.json").read_text())["grpc"]
    return {"replicas": replicas, "threads_per_replica": threads, **grpc}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraserve.bench.ray_scaleout")
    parser.add_argument("--replicas", default="1,2", help="replica counts, e.g. 1,2")
    parser.add_argument(
        "--threads-per-replica",
        type=int,
        default=0,
        help="torch threads per replica (0: the cores divided among the replicas)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/scaleout"))
    parser.add_argument("bench_args", nargs="*", help="after --: `loraserve bench` flags")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    runs = []
    for n in (int(x) for x in args.replicas.split(",")):
        threads = args.threads_per_replica or max(1, cores // n)
        runs.append(run_one(n, threads, args.bench_args, args.out / f"replicas-{n}"))
    summary = {"cpu_cores": cores, "bench_args": args.bench_args, "runs": runs}
    (args.out / "scaleout.json").write_text(json.dumps(summary, indent=2))
    print(f"\nscale-out on {cores} CPU cores (all replicas, Ray and the client share them)")
    print(
        f"{'replicas':>8} {'threads':>7} {'mode':>10} {'tokens/s':>10} "
        f"{'TTFT p50 s':>11} {'TTFT p99 s':>11}"
    )
    for run in runs:
        for mode, m in run["modes"].items():
            print(
                f"{run['replicas']:>8} {run['threads_per_replica']:>7} {mode:>10} "
                f"{m['tokens_per_s']:>10.1f} "
                f"{m['ttft_p50_s']:>11.3f} {m['ttft_p99_s']:>11.3f}"
            )
    print(f"JSON: {args.out / 'scaleout.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
