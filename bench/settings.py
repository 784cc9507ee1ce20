"""Typed settings of a bench run and the command-line flags that set them (`--quick` too)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from loraserve.bench.models import SIZES, default_cache_dir

PARTS: tuple[str, ...] = ("distinct", "peft", "naive", "nsweep", "trace", "cold", "grpc")
"""Selectable parts (--only): distinct = loraserve base + Punica patterns + distinct sweep."""


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _pair(text: str) -> tuple[int, int]:
    low, high = _ints(text.replace(":", ","))
    return low, high


def _opt(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    return key.strip().replace("-", "_"), value.strip()


@dataclass(frozen=True)
class BenchSettings:
    """Everything one run needs; defaults are the full CPU run, QUICK overrides a few."""

    size: str = "small"
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    batch: int = 16
    """Requests per batch-mode run, and the engine's max batch size (equal concurrency)."""
    adapters: int = 16
    """Adapter pool of the batch modes (uniform/skewed draw from it)."""
    device_adapters: int = 0
    """Adapters the engine's device tier holds at once (sizes its byte budget); 0 means
    max(batch, adapters, 16), so the batch modes measure warm serving."""
    rank: int = 16
    prompt_len: int = 64
    output_len: int = 64
    repeats: int = 3
    naive_repeats: int = 1
    stat: str = "best"
    """How repeats combine into one number: best (highest tokens/s) or median."""
    skew_alpha: float = 1.5
    """Zipf exponent of Punica's skewed pattern."""
    temperature: float = 0.0
    """Sampling temperature of every bench request; 0 is greedy (the parity-checked default)."""
    top_p: float = 1.0
    """Top-p of every bench request (with a temperature above 0)."""
    distinct_sweep: tuple[int, ...] = ()
    """Distinct adapters per batch to sweep; () means powers of two up to --batch."""
    nsweep: tuple[int, ...] = (5, 100, 1000)
    nsweep_requests: int = 64
    nsweep_alpha: float = 1.0
    trace_requests: int = 96
    trace_adapters: int = 1000
    trace_alpha: float = 1.0
    trace_cv: float = 1.0
    trace_load: float = 0.8
    """Replay rate as a fraction of the measured saturation throughput."""
    trace_prompt_len: tuple[int, int] = (8, 128)
    trace_output_len: tuple[int, int] = (8, 64)
    trace_length_dist: str = "uniform"
    slo_ttft_s: float = 2.0
    cold_samples: int = 5
    grpc_requests: int = 48
    grpc_concurrency: int = 0
    """0 means --batch."""
    grpc_duration_s: float = 120.0
    grpc_server: str = "process"
    grpc_target: str = ""
    """HOST:PORT of a running server or cluster (`loraserve serve-ray`) to load instead of
    starting one; its adapters are uploaded through it."""
    grpc_popularity: str = "roundrobin"
    """How loraserve-mode requests pick adapters: roundrobin, or zipf (alpha --skew-alpha)."""
    out_dir: Path = Path("bench/results")
    cache_dir: Path = field(default_factory=default_cache_dir)
    work_dir: Path | None = None
    only: tuple[str, ...] = PARTS
    quick: bool = False
    engine_opts: tuple[tuple[str, str], ...] = ()
    """Extra ServerConfig fields (--engine-opt max_seq_len=256), for the engine and the server."""
    plot: bool = True
    profile: bool = False
    """Also sample where the engine's time goes (bench/sampler.py) into <out>/profile.txt."""

    @property
    def engine_device_adapters(self) -> int:
        return self.device_adapters or max(self.batch, self.adapters, 16)

    def resolved(self) -> BenchSettings:
        """Fills the automatic fields (device adapters, distinct sweep)."""
        sweep = self.distinct_sweep or _powers_of_two_upto(self.batch)
        sweep = tuple(sorted({k for k in sweep if 1 <= k <= self.batch}))
        return replace(self, device_adapters=self.engine_device_adapters, distinct_sweep=sweep)


def _powers_of_two_upto(n: int) -> tuple[int, ...]:
    out = [1]
    while out[-1] * 2 <= n:
        out.append(out[-1] * 2)
    return (*out, n) if out[-1] != n else tuple(out)


QUICK = {
    "prompt_len": 32,
    "output_len": 32,
    "repeats": 3,
    "nsweep": (5, 1000),
    "nsweep_requests": 48,
    "trace_requests": 48,
    "trace_prompt_len": (8, 64),
    "trace_output_len": (8, 32),
    "cold_samples": 3,
    "grpc_requests": 32,
    "grpc_duration_s": 60.0,
}
"""--quick: a few minutes on 2 CPU cores; an explicit flag still wins."""


def build_parser() -> argparse.ArgumentParser:
    d = BenchSettings()
    p = argparse.ArgumentParser(
        prog="loraserve bench",
        description="loraserve vs base model vs HF PEFT, side by side in one process run.",
    )
    a = p.add_argument
    a("--quick", action="store_true", help="small settings: a few minutes on 2 CPU cores")
    a("--only", default=",".join(PARTS), help=f"comma list of parts: {','.join(PARTS)}")
    a("--size", choices=sorted(SIZES), default=d.size, help="bench model (1b for a GPU)")
    a("--device", default=d.device, help="cpu or cuda")
    a("--dtype", default=d.dtype, help="float32, bfloat16 or float16")
    a("--seed", type=int, default=d.seed)
    a("--batch", type=int, default=d.batch, help="requests per batch mode = engine batch size")
    a("--adapters", type=int, default=d.adapters, help="adapter pool of the batch modes")
    a(
        "--device-adapters",
        type=int,
        default=d.device_adapters,
        help="adapters the device tier holds (sizes its byte budget; 0: auto)",
    )
    a("--rank", type=int, default=d.rank)
    a("--prompt-len", type=int, default=None)
    a("--output-len", type=int, default=None)
    a("--repeats", type=int, default=None, help="timed runs per mode, interleaved")
    a("--naive-repeats", type=int, default=None)
    a("--stat", choices=["best", "median"], default=d.stat)
    a("--skew-alpha", type=float, default=d.skew_alpha, help="Zipf alpha of Punica's skewed")
    a("--temperature", type=float, default=d.temperature, help="every request's; 0: greedy")
    a("--top-p", type=float, default=d.top_p, help="every request's (with --temperature > 0)")
    a("--distinct-sweep", type=_ints, default=None, help="e.g. 1,2,4,8,16")
    a("--nsweep", type=_ints, default=None, help="registered adapter counts, e.g. 5,100,1000")
    a("--nsweep-requests", type=int, default=None)
    a("--nsweep-alpha", type=float, default=d.nsweep_alpha)
    a("--trace-requests", type=int, default=None)
    a("--trace-adapters", type=int, default=d.trace_adapters)
    a("--trace-alpha", type=float, default=d.trace_alpha)
    a("--trace-cv", type=float, default=d.trace_cv, help="1 = Poisson, >1 burstier")
    a("--trace-load", type=float, default=d.trace_load, help="fraction of saturation")
    a("--trace-prompt-len", type=_pair, default=None, help="LOW,HIGH")
    a("--trace-output-len", type=_pair, default=None, help="LOW,HIGH")
    a("--trace-length-dist", choices=["uniform", "lognormal", "fixed"], default="uniform")
    a("--slo-ttft", type=float, default=d.slo_ttft_s, dest="slo_ttft_s", help="goodput SLO, s")
    a("--cold-samples", type=int, default=None)
    a("--grpc-requests", type=int, default=None)
    a("--grpc-concurrency", type=int, default=d.grpc_concurrency, help="0: --batch")
    a("--grpc-duration", type=float, default=None, dest="grpc_duration_s")
    a("--grpc-server", choices=["process", "thread"], default=d.grpc_server)
    a("--grpc-target", default=d.grpc_target, metavar="HOST:PORT", help="load a running server")
    a("--grpc-popularity", choices=["roundrobin", "zipf"], default=d.grpc_popularity)
    a("--out", type=Path, default=d.out_dir, dest="out_dir", help="results directory")
    a("--cache-dir", type=Path, default=None, help="model and adapter cache")
    a("--work-dir", type=Path, default=None, help="scratch (adapter stores); default a temp dir")
    a(
        "--engine-opt",
        action="append",
        default=[],
        type=_opt,
        dest="engine_opts",
        metavar="FIELD=VALUE",
        help="set a ServerConfig field of the engine and the gRPC server (repeatable)",
    )
    a("--no-plot", action="store_true")
    a("--profile", action="store_true", help="write <out>/profile.txt: where the time goes")
    return p


def settings_from_args(argv: list[str]) -> BenchSettings:
    args = build_parser().parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in fields(BenchSettings) if hasattr(args, f.name)}
    values = {k: v for k, v in values.items() if v is not None}
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key, None) is None:
                values[key] = value
    only = tuple(x.strip() for x in args.only.split(",") if x.strip())
    unknown = [x for x in only if x not in PARTS]
    if unknown:
        build_parser().error(f"--only: unknown part(s) {','.join(unknown)}; choose from {PARTS}")
    values["only"] = only
    values["engine_opts"] = tuple(args.engine_opts)
    values["plot"] = not args.no_plot
    if args.cache_dir is None:
        values.pop("cache_dir", None)
    settings = BenchSettings(**values)
    if settings.batch < 1 or settings.adapters < 1 or settings.repeats < 1:
        build_parser().error("--batch, --adapters and --repeats must be at least 1")
    if "distinct" in settings.only and settings.adapters < settings.batch:
        build_parser().error(
            f"--adapters {settings.adapters} is fewer than --batch {settings.batch}: the distinct "
            "mode gives every row of the batch its own adapter from the pool"
        )
    return settings.resolved()
