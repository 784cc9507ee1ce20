"""The engine thread's cost of turning tokens into streamed text, per step (run by hand).

Each decode step updates every running request's text (server.engine.detokenize.TextState).
This feeds `--batch` completions token by token, as the engine does, and times the updates per
step with the decode window (what the engine does) and with the whole completion re-decoded
(the reference algorithm), side by side at each completion length.

    python -m loraserve.bench.detok_cost --batch 32 --lengths 64,512,1024
"""

from __future__ import annotations

import argparse
import json
import time

from loraserve.server.engine.detokenize import TextState
from loraserve.testing.tiny_model import CORPUS, build_tokenizer


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lengths", default="64,512,1024", help="completion lengths, tokens")
    parser.add_argument("--repeats", type=int, default=3, help="best of")
    return parser.parse_args(argv)


def _ms_per_step(tokenizer, ids: list[int], batch: int, length: int, windowed: bool) -> float:
    states = [TextState(tokenizer, stop=()) for _ in range(batch)]
    if not windowed:
        for state in states:
            state._windowed = None  # the reference: decode the whole completion every step
    completions: list[list[int]] = [[] for _ in range(batch)]
    started = time.perf_counter()
    for n in range(length):
        for row in range(batch):
            completions[row].append(ids[(row * 37 + n) % len(ids)])
            states[row].update(completions[row])
    return (time.perf_counter() - started) / length * 1e3


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    tokenizer = build_tokenizer()
    text = CORPUS if isinstance(CORPUS, str) else " ".join(CORPUS)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    result: dict = {"batch": args.batch, "lengths": {}}
    for length in (int(x) for x in args.lengths.split(",")):
        whole = min(
            _ms_per_step(tokenizer, ids, args.batch, length, False) for _ in range(args.repeats)
        )
        window = min(
            _ms_per_step(tokenizer, ids, args.batch, length, True) for _ in range(args.repeats)
        )
        result["lengths"][str(length)] = {
            "whole_ms_per_step": whole,
            "window_ms_per_step": window,
            "window_over_whole": window / whole,
        }
        print(
            f"{length:>6} tokens out, batch {args.batch}: {window:.3f} ms per step with the "
            f"window, {whole:.3f} ms decoding whole ({window / whole:.3f}x)"
        )
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
