"""A small sampling profiler for one thread (the engine's), in pure Python: where time goes.

torch.profiler only sees the thread that started it, and the engine decodes on its own thread,
so this samples `sys._current_frames()` every few milliseconds instead (what py-spy does from
outside). Each sample is charged to the innermost frame (self time) and to every frame on the
stack (inclusive time); a torch op shows up as the Python line that called it.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import FrameType, TracebackType

_REPO = str(Path(__file__).resolve().parent.parent) + "/"
INTERESTING = ("server/", "adapters/", "peft/", "transformers/models/", "transformers/generation/")
"""Inclusive time is listed for these functions only (the rest is plumbing on every stack)."""


def _where(frame: FrameType) -> str:
    code = frame.f_code
    path = code.co_filename.replace(_REPO, "")
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    return f"{path}:{frame.f_lineno} {code.co_name}"


def _function(frame: FrameType) -> str:
    code = frame.f_code
    path = code.co_filename.replace(_REPO, "")
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    return f"{path} {code.co_qualname}"


class StackSampler:
    """Samples the stacks of the threads whose name starts with `thread_prefix` (or `ident`)."""

    def __init__(
        self, thread_prefix: str | None = None, ident: int | None = None, interval_s: float = 0.002
    ) -> None:
        self._prefix = thread_prefix
        self._ident = ident
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.samples = 0
        self.self_lines: Counter[str] = Counter()
        self.inclusive: Counter[str] = Counter()

    def _targets(self) -> set[int]:
        if self._ident is not None:
            return {self._ident}
        return {
            t.ident
            for t in threading.enumerate()
            if t.ident is not None and self._prefix and t.name.startswith(self._prefix)
        }

    def _run(self) -> None:
        while not self._stop.is_set():
            targets = self._targets()
            frames = sys._current_frames()
            for ident in targets:
                frame = frames.get(ident)
                if frame is None:
                    continue
                self.samples += 1
                self.self_lines[_where(frame)] += 1
                seen: set[str] = set()
                while frame is not None:
                    name = _function(frame)
                    if name not in seen:
                        seen.add(name)
                        self.inclusive[name] += 1
                    frame = frame.f_back
            time.sleep(self._interval)

    def __enter__(self) -> StackSampler:
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def report(self, title: str, top: int = 18) -> str:
        """Top self-time lines and top inclusive functions, as shares of all samples."""
        n = max(self.samples, 1)
        lines = [f"== {title}: {self.samples} samples", "-- self (innermost Python line)"]
        lines += [f"{100 * c / n:6.1f}%  {k}" for k, c in self.self_lines.most_common(top)]
        lines.append("-- inclusive (loraserve, PEFT and transformers functions on the stack)")
        shown = [(k, c) for k, c in self.inclusive.most_common() if k.startswith(INTERESTING)]
        lines += [f"{100 * c / n:6.1f}%  {k}" for k, c in shown[:top]]
        return "\n".join(lines)
