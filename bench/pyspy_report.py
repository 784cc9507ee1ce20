"""Where a thread's time goes, from a py-spy raw profile (run by hand and by gpu_check.sh).

bench.sampler samples from inside the process, so it only sees the engine thread when that
thread has let go of the GIL (a torch op, a wait on the device): host work in Python is under-
counted, which is the very thing to measure when a decode step takes longer than its graph.
py-spy samples from outside, whatever holds the GIL. Record with thread names, e.g.

    py-spy record --threads --idle --nonblocking -r 500 -f raw -o prof.txt -- \\
        python -m loraserve.bench.host_step --modes distinct
    python -m loraserve.bench.pyspy_report prof.txt --within _decode_step

and this prints, for the samples whose stack passes through a function named like --within
(and, with --thread, of threads whose name starts so), the share of samples per innermost
function (self) and per function anywhere on the stack (inclusive). Prefer --within to
--thread: py-spy keeps the first name it saw for a thread id, and the OS reuses the ids of
finished threads (the bench's model builders), so a thread's name in the profile may be stale.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

_FRAME = re.compile(r"^(?P<function>.*?) \((?P<path>.*?)(?::(?P<line>\d+))?\)$")
_THREAD = re.compile(r"^thread \(\d+\): (?P<name>.*)$")


@dataclass
class Profile:
    """Sample counts of the stacks kept (py-spy's raw lines: frames joined by ';', a count)."""

    samples: int
    self_time: Counter[str]
    inclusive: Counter[str]


def _short(frame: str) -> str:
    """'function (path:line)' as 'function (file)': one entry per function, not per line."""
    match = _FRAME.match(frame)
    if match is None:
        return frame
    path = match["path"]
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    return f"{match['function']} ({path})"


def read_profile(text: str, thread: str | None = None, within: str | None = None) -> Profile:
    """The samples of `text` (py-spy raw) in threads named `thread...` whose stack passes
    through a function whose name contains `within` (both optional)."""
    profile = Profile(0, Counter(), Counter())
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        named = _THREAD.match(frames[0])
        if named is not None:
            if thread is not None and not named["name"].startswith(thread):
                continue
            frames = frames[1:]
        elif thread is not None:
            continue  # recorded without --threads: no thread to match
        if not frames:
            continue
        functions = [_short(f) for f in frames]
        if within is not None and not any(within in f.split(" (", 1)[0] for f in functions):
            continue
        n = int(count)
        profile.samples += n
        profile.self_time[functions[-1]] += n
        for function in set(functions):
            profile.inclusive[function] += n
    return profile


def report(profile: Profile, title: str, top: int = 25) -> str:
    n = max(profile.samples, 1)
    lines = [f"== {title}: {profile.samples} samples", "-- self (innermost function)"]
    lines += [f"{100 * c / n:6.1f}%  {k}" for k, c in profile.self_time.most_common(top)]
    lines.append("-- inclusive (anywhere on the stack)")
    lines += [f"{100 * c / n:6.1f}%  {k}" for k, c in profile.inclusive.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path, help="py-spy record -f raw output")
    parser.add_argument("--thread", default=None, help="only threads whose name starts so")
    parser.add_argument("--within", default=None, help="only stacks through such a function")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    profile = read_profile(args.profile.read_text(), args.thread, args.within)
    where = ", ".join(
        part
        for part in (
            f"thread {args.thread}*" if args.thread else "",
            f"within {args.within}" if args.within else "",
        )
        if part
    )
    text = report(profile, f"{args.profile.name}{f' ({where})' if where else ''}", args.top)
    print(text)
    return text


if __name__ == "__main__":
    main()
