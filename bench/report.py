"""The bench's results: the issue's target ratios, a human-readable table, and the JSON file."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

Results = dict[str, Any]


@dataclass(frozen=True)
class Ratio:
    """One measured ratio and, when the issue sets one, its target."""

    name: str
    value: float | None
    target: float | None = None
    op: str = ">="
    """">=" (higher is better) or "<" (lower is better)."""
    detail: str = ""

    @property
    def met(self) -> bool | None:
        if self.value is None or self.target is None or math.isnan(self.value):
            return None
        return self.value >= self.target if self.op == ">=" else self.value < self.target

    @property
    def shortfall(self) -> float | None:
        """How far from the target, as a fraction of it (positive = missed by that much)."""
        if self.met is not False or self.value is None or self.target is None:
            return None
        if self.op == ">=":
            return 1.0 - self.value / self.target
        return self.value / self.target - 1.0


def _get(results: Results, *path: str) -> Any:
    node: Any = results
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _div(a: Any, b: Any) -> float | None:
    if not isinstance(a, int | float) or not isinstance(b, int | float) or b == 0:
        return None
    return float(a) / float(b)


def compute_ratios(results: Results) -> list[Ratio]:
    """The issue's targets, from whatever parts ran (a missing part gives no ratio)."""
    modes = _get(results, "batch", "modes") or {}

    def tps(mode: str) -> Any:
        return _get(modes, mode, "tokens_per_s")

    ratios: list[Ratio] = []
    if tps("loraserve-distinct") is not None and tps("base") is not None:
        ratios.append(
            Ratio("loraserve-distinct / base", _div(tps("loraserve-distinct"), tps("base")), 0.90)
        )
        for pattern in ("identical", "uniform", "skewed"):
            if tps(f"loraserve-{pattern}") is not None:
                ratios.append(
                    Ratio(
                        f"loraserve-{pattern} / base",
                        _div(tps(f"loraserve-{pattern}"), tps("base")),
                    )
                )
    for baseline, target in (("peft-mixed", 1.5), ("naive-swap", 8.0)):
        if tps("loraserve-distinct") is not None and tps(baseline) is not None:
            ratios.append(
                Ratio(
                    f"loraserve-distinct / {baseline}",
                    _div(tps("loraserve-distinct"), tps(baseline)),
                    target,
                )
            )
    by_n = _get(results, "nsweep", "by_n") or {}
    if len(by_n) >= 2:
        ns = sorted(by_n, key=int)
        low, high = ns[0], ns[-1]
        ratios.append(
            Ratio(
                f"n={high} / n={low} registered",
                _div(by_n[high]["tokens_per_s"], by_n[low]["tokens_per_s"]),
                0.90,
            )
        )
    cold = results.get("cold_start")
    if cold:
        ratios.append(
            Ratio(
                "cold / warm TTFT",
                cold.get("cold_over_warm"),
                1.5,
                "<",
                f"added {_ms(cold['added_ttft_s'], 1)} (cold {_ms(cold['cold_ttft_s'], 1)}, "
                f"warm {_ms(cold['warm_ttft_s'], 1)})",
            )
        )
    replay = _get(results, "trace", "replay")
    if replay and "base" in replay and "loraserve" in replay:
        b, lo = replay["base"]["ttft_p99_s"], replay["loraserve"]["ttft_p99_s"]
        ratios.append(
            Ratio(
                "trace p99 TTFT loraserve / base",
                _div(lo, b),
                detail=f"{_ms(lo)} vs {_ms(b)} at {results['trace']['rate_rps']:.2f} req/s",
            )
        )
    grpc = _get(results, "grpc", "modes")
    if grpc and "base" in grpc and "loraserve" in grpc:
        ratios.append(
            Ratio(
                "gRPC loraserve / base",
                _div(grpc["loraserve"]["tokens_per_s"], grpc["base"]["tokens_per_s"]),
                0.90,
                detail=f"p99 TTFT {_ms(grpc['loraserve']['ttft_p99_s'])} vs "
                f"{_ms(grpc['base']['ttft_p99_s'])}",
            )
        )
    # The same load through the real server against the in-process engine, end to end: what
    # serialization, the servicer, the event loop and streaming cost (the GPU target).
    for grpc_mode, mode, label in (
        ("base", "base", "base"),
        ("loraserve", "loraserve-distinct", "adapters"),
    ):
        if grpc and grpc_mode in grpc and tps(mode) is not None:
            ratios.append(
                Ratio(
                    f"gRPC / in-process, {label}",
                    _div(grpc[grpc_mode]["tokens_per_s"], tps(mode)),
                    0.85,
                    detail=f"{grpc[grpc_mode]['tokens_per_s']:.0f} vs {tps(mode):.0f} tokens/s",
                )
            )
    return ratios


def _ms(seconds: Any, digits: int = 0) -> str:
    if not isinstance(seconds, int | float) or math.isnan(seconds):
        return "-"
    return f"{1000 * seconds:.{digits}f} ms"


def _num(value: Any, fmt: str = "{:.1f}") -> str:
    if not isinstance(value, int | float) or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def _sampling(meta: dict) -> str:
    """How the requests chose tokens, when not greedy (the default)."""
    temperature = meta.get("temperature") or 0.0
    if not temperature:
        return ""
    return f", sampled (temperature {temperature:g}, top-p {meta.get('top_p', 1.0):g})"


def format_table(results: Results) -> str:
    """The whole report as aligned plain text."""
    meta = results.get("meta", {})
    lines = [
        f"loraserve bench: {meta.get('device', '?')}, {meta.get('dtype', '?')}, "
        f"model {meta.get('size', '?')} ({meta.get('model', '')}), batch {meta.get('batch', '?')}, "
        f"rank {meta.get('rank', '?')}, prompt {meta.get('prompt_len', '?')} / output "
        f"{meta.get('output_len', '?')} tokens, {meta.get('stat', '?')} of "
        f"{meta.get('repeats', '?')} runs{_sampling(meta)}",
    ]
    if meta.get("loadavg_start") is not None:
        lines.append(
            f"machine load average at start {meta['loadavg_start']}, at end "
            f"{meta.get('loadavg_end')} ({meta.get('cpu_count')} CPUs; other processes skew "
            "the numbers)"
        )
    modes = _get(results, "batch", "modes") or {}
    if modes:
        base = _get(modes, "base", "tokens_per_s")
        lines += [
            "",
            f"{'batch mode':<24}{'adapters':>9}{'tokens/s':>11}{'vs base':>9}{'cpu cores':>11}"
            f"{'decode tok/s':>14}{'vs base':>9}",
        ]
        decode_base = _get(modes, "base", "decode_tokens_per_s")
        for mode, entry in modes.items():
            ratio = _div(entry["tokens_per_s"], base)
            lines.append(
                f"{mode:<24}{entry.get('distinct_adapters', 0):>9}"
                f"{_num(entry['tokens_per_s']):>11}{_num(ratio, '{:.3f}'):>9}"
                f"{_num(entry.get('cpu_util'), '{:.2f}'):>11}"
                f"{_num(entry.get('decode_tokens_per_s')):>14}"
                f"{_num(_div(entry.get('decode_tokens_per_s'), decode_base), '{:.3f}'):>9}"
            )
    sweep = _get(results, "batch", "distinct_sweep") or {}
    if sweep:
        lines += ["", "distinct adapters in batch  " + "  ".join(f"{k:>7}" for k in sweep)]
        lines.append(
            "tokens/s                    "
            + "  ".join(f"{_num(e['tokens_per_s']):>7}" for e in sweep.values())
        )
    nsweep = results.get("nsweep")
    if nsweep:
        by_n = nsweep["by_n"]
        lines += [
            "",
            f"registered adapters (zipf {nsweep['alpha']}, {nsweep['requests']} requests)  "
            + "  ".join(f"{'n=' + k:>8}" for k in by_n),
        ]
        pad = len(lines[-1]) - len("  ".join(f"{'n=' + k:>8}" for k in by_n))
        values = "  ".join(f"{_num(e['tokens_per_s']):>8}" for e in by_n.values())
        lines.append(f"{'tokens/s':<{pad}}{values}")
        nbase = _get(nsweep, "base", "tokens_per_s")
        if nbase:
            shares = "  ".join(
                f"{_num(_div(e['tokens_per_s'], nbase), '{:.3f}'):>8}" for e in by_n.values()
            )
            label = f"vs base on the same requests ({_num(nbase)} tokens/s)"
            lines.append(f"{label:<{pad}}{shares}")
    trace = results.get("trace")
    if trace:
        lines += [
            "",
            f"trace: {trace['requests']} requests, {trace['adapters']} adapters (zipf "
            f"{trace['alpha']}, {trace['distinct_adapters']} used), cv {trace['cv']}, prompt "
            f"{trace['prompt_len']}, output {trace['output_len']}; replay at "
            f"{trace['rate_rps']:.2f} req/s = {trace['load']:.0%} of saturation",
            f"{'':<12}{'sat. req/s':>11}{'tokens/s':>10}{'TTFT p50':>10}{'TTFT p99':>10}"
            f"{'goodput':>9}{'SLO met':>9}   (SLO TTFT <= {trace['slo_ttft_s']} s)",
        ]
        for label in trace["replay"]:
            rep, sat = trace["replay"][label], trace["saturation"][label]
            lines.append(
                f"{label:<12}{_num(sat['requests_per_s'], '{:.2f}'):>11}"
                f"{_num(rep['tokens_per_s']):>10}{_ms(rep['ttft_p50_s']):>10}"
                f"{_ms(rep['ttft_p99_s']):>10}{_num(rep.get('goodput_rps'), '{:.2f}'):>9}"
                f"{_num(rep.get('slo_attainment'), '{:.0%}'):>9}"
            )
    grpc = results.get("grpc")
    if grpc:
        lines += [
            "",
            f"through gRPC ({grpc['server']} server, concurrency {grpc['concurrency']}, "
            f"{grpc['requests_per_run']} requests per run)",
            f"{'':<12}{'tokens/s':>10}{'TTFT p50':>10}{'TTFT p99':>10}{'server p99':>12}",
        ]
        for label, entry in grpc["modes"].items():
            lines.append(
                f"{label:<12}{_num(entry['tokens_per_s']):>10}{_ms(entry['ttft_p50_s']):>10}"
                f"{_ms(entry['ttft_p99_s']):>10}{_ms(entry['server_ttft_p99_s']):>12}"
            )
    ratios = [Ratio(**r) for r in results.get("ratios", [])]
    if ratios:
        lines += ["", f"{'ratio':<36}{'value':>8}{'target':>10}  result"]
        for r in ratios:
            target = "" if r.target is None else f"{r.op} {r.target:g}"
            if r.met is None:
                verdict = "(reported)"
            elif r.met:
                verdict = "met"
            else:
                verdict = f"MISSED by {r.shortfall:.1%}"
            detail = f"  {r.detail}" if r.detail else ""
            lines.append(f"{r.name:<36}{_num(r.value, '{:.3f}'):>8}{target:>10}  {verdict}{detail}")
    failed = results.get("errors") or {}
    for part, message in failed.items():
        lines.append(f"part {part} FAILED: {message}")
    return "\n".join(lines)


def with_ratios(results: Results) -> Results:
    """`results` with its "ratios" list (re)computed."""
    return {**results, "ratios": [asdict(r) for r in compute_ratios(results)]}


def write_json(results: Results, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=False, default=_jsonable) + "\n")
    return path


def command_result(args: argparse.Namespace, **fields: Any) -> Results:
    """A by-hand bench command's result: its arguments (as strings) under "args", then
    `fields`; written to `args.json` (write_json) when the command was given one."""
    result: Results = {"args": {k: str(v) for k, v in vars(args).items()}, **fields}
    if args.json is not None:
        write_json(result, args.json)
    return result


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
