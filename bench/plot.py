"""The PNG: throughput vs distinct adapters in the batch, and vs registered adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_results(results: dict[str, Any], path: Path) -> Path | None:
    """Writes the two-panel plot; None when neither sweep ran (nothing to draw)."""
    sweep = (results.get("batch") or {}).get("distinct_sweep") or {}
    by_n = (results.get("nsweep") or {}).get("by_n") or {}
    if not sweep and not by_n:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = (results.get("batch") or {}).get("modes") or {}
    base = (modes.get("base") or {}).get("tokens_per_s")
    meta = results.get("meta", {})
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    if sweep:
        ks = [int(k) for k in sweep]
        left.plot(ks, [e["tokens_per_s"] for e in sweep.values()], "o-", label="loraserve")
        if base:
            left.axhline(base, color="gray", linestyle="--", label="base model (no adapters)")
        for name, marker in (("peft-mixed", "s"), ("naive-swap", "^")):
            entry = modes.get(name)
            if entry:
                left.plot(
                    [entry.get("distinct_adapters", ks[-1])],
                    [entry["tokens_per_s"]],
                    marker,
                    label=name,
                )
        left.set_xscale("log", base=2)
        left.set_xticks(ks, [str(k) for k in ks])
        left.minorticks_off()
        left.set_xlabel("distinct adapters in the batch")
        left.set_ylabel("generated tokens / s")
        left.set_title(f"batch of {meta.get('batch', '?')} requests")
        left.set_ylim(bottom=0)
        left.legend(fontsize=8)
    if by_n:
        ns = [int(n) for n in by_n]
        right.plot(ns, [e["tokens_per_s"] for e in by_n.values()], "o-", label="loraserve (zipf)")
        nbase = ((results.get("nsweep") or {}).get("base") or {}).get("tokens_per_s")
        if nbase:
            right.axhline(nbase, color="gray", linestyle="--", label="base model, same requests")
        right.set_xscale("log")
        right.set_xticks(ns, [str(n) for n in ns])
        right.minorticks_off()  # log-scale minor labels collide with few n values
        right.set_xlabel("registered adapters n")
        right.set_ylabel("generated tokens / s")
        alpha = (results.get("nsweep") or {}).get("alpha")
        right.set_title(f"popularity zipf alpha {alpha}")
        right.set_ylim(bottom=0)
        right.legend(fontsize=8)
    fig.suptitle(
        f"loraserve bench: {meta.get('device', '?')} {meta.get('dtype', '?')}, "
        f"model {meta.get('size', '?')}, rank {meta.get('rank', '?')}"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
