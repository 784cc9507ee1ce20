"""Every Triton kernel compiles for the GPUs the engine runs on, checked without a GPU.

Elsewhere on CPU the kernels run under Triton's interpreter, which executes them as Python and
so cannot see what only the compiler rejects: a loop- or branch-carried value whose type changes
(`first = 0` int32 re-bound to an int64 in a branch failed `--attention triton` at start on an
H200), an unsupported construct, a shape the code generator refuses. Here each kernel goes
through Triton's whole pipeline to a cubin for Hopper (sm_90) and Ampere (sm_80), with the
constexpr combinations the engine launches (tests/engine/triton_compile_check.py, in a fresh
interpreter: the in-process interpreter patches triton.language). Needs Triton's bundled ptxas.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")


def test_every_kernel_compiles_for_hopper_and_ampere() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("triton_compile_check.py")
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "compiled 138 of 138" in done.stdout
