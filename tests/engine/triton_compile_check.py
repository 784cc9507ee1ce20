"""Compiles every Triton kernel of the engine to a cubin, without a GPU (run as a script).

Used by tests/engine/test_triton_compile.py in a subprocess: the test session runs kernels
under Triton's interpreter (TRITON_INTERPRET=1), which patches triton.language in-process, and a
real compile must not see those patches. Prints one line per failure; exits 1 if any failed.
"""

from __future__ import annotations

import itertools
import sys
import traceback

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from loraserve.server.engine import fused_ops, lora_kernels, paged_attention

TARGETS = [GPUTarget("cuda", 90, 32), GPUTarget("cuda", 80, 32)]
DTYPES = ["bf16", "fp16", "fp32"]


def compile_one(kernel, signature: dict[str, str], constants: dict[str, object], target) -> None:
    full = {**signature, **dict.fromkeys(constants, "constexpr")}
    names = list(full)
    constexprs = {(names.index(k),): v for k, v in constants.items()}
    compiled = triton.compile(ASTSource(fn=kernel, signature=full, constexprs=constexprs), target)
    assert compiled.asm["cubin"]


def cases():
    bk = lora_kernels.BLOCK_K
    shapes = [(2048, 2, 3, 8), (8192, 2, 1, 32), (80, 1, 2, 1)]  # d_in, pages/row, members, splits
    for target, dtype, has_live, (d_in, n, members, splits) in itertools.product(
        TARGETS, DTYPES, [True, False], shapes
    ):
        shrink = {
            "d_in": d_in, "n": n, "M": members, "R": 8,
            "K_PER_PROGRAM": -(-d_in // (splits * bk)) * bk, "BLOCK_K": bk, "HAS_LIVE": has_live,
        }  # fmt: skip
        signature = {
            "x_ptr": f"*{dtype}", "a_ptr": f"*{dtype}", "table_ptr": "*i64", "live_ptr": "*i32",
            "out_ptr": "*fp32", "table_stride": "i32", "tokens": "i32",
        }  # fmt: skip
        yield (
            f"shrink {dtype} {shrink} sm_{target.arch}",
            lora_kernels._shrink,
            signature,
            shrink,
            target,
        )
        expand = {
            "out_features": 3072, "n": n, "M": members, "R": 8, "SPLITS": splits,
            "BLOCK_O": lora_kernels.BLOCK_O, "HAS_LIVE": has_live,
        }  # fmt: skip
        signature = {
            "y_ptr": f"*{dtype}", "xa_ptr": "*fp32", "b_ptr": f"*{dtype}", "seg_ptr": "*i64",
            "table_ptr": "*i64", "live_ptr": "*i32", "table_stride": "i32", "tokens": "i32",
        }  # fmt: skip
        yield (
            f"expand {dtype} {expand} sm_{target.arch}",
            lora_kernels._expand,
            signature,
            expand,
            target,
        )
    for target, dtype, (group, head_dim) in itertools.product(
        TARGETS, DTYPES, [(4, 64), (1, 128), (7, 64)]
    ):
        constants = {
            "KV_HEADS": 8, "GROUP": group, "GROUP_PAD": max(16, triton.next_power_of_2(group)),
            "D": head_dim, "BS": 16,
        }  # fmt: skip
        signature = {
            "q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "table_ptr": "*i64",
            "pos_ptr": "*i64", "out_ptr": f"*{dtype}", "table_stride": "i32", "scale": "fp32",
            "window": "i32",
        }  # fmt: skip
        yield (
            f"decode attention {dtype} {constants} sm_{target.arch}",
            paged_attention._decode,
            signature,
            constants,
            target,
        )
    yield from fused_cases()


def fused_cases():
    """fused_ops: the norm with and without the residual add (hidden 2048 and 8192), RoPE + KV
    writes (GQA, head_dim 64 and 128, and 80, whose half is no power of two), silu * mul."""
    for target, dtype in itertools.product(TARGETS, DTYPES):
        for has_delta, block in itertools.product([True, False], [2048, 8192]):
            constants = {"HAS_DELTA": has_delta, "BLOCK": block}
            signature = {
                "x_ptr": f"*{dtype}", "delta_ptr": f"*{dtype}", "w_ptr": f"*{dtype}",
                "out_ptr": f"*{dtype}", "sum_ptr": f"*{dtype}", "n_cols": "i32", "eps": "fp32",
            }  # fmt: skip
            yield (
                f"add_rms_norm {dtype} {constants} sm_{target.arch}",
                fused_ops._add_rms_norm,
                signature,
                constants,
                target,
            )
        for heads, kv_heads, head_dim in [(32, 8, 64), (28, 4, 128), (8, 8, 80)]:
            constants = {
                "HEADS": heads, "KV_HEADS": kv_heads, "D": head_dim,
                "HALF_PAD": triton.next_power_of_2(head_dim // 2),
            }  # fmt: skip
            signature = {
                "qkv_ptr": f"*{dtype}", "cos_ptr": f"*{dtype}", "sin_ptr": f"*{dtype}",
                "q_ptr": f"*{dtype}", "k_cache_ptr": f"*{dtype}", "v_cache_ptr": f"*{dtype}",
                "slots_ptr": "*i64",
            }  # fmt: skip
            yield (
                f"rope_write_kv {dtype} {constants} sm_{target.arch}",
                fused_ops._rope_write_kv,
                signature,
                constants,
                target,
            )
        constants = {"BLOCK": fused_ops.SILU_BLOCK}
        signature = {"gu_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "inner": "i32"}
        yield (
            f"silu_mul {dtype} sm_{target.arch}",
            fused_ops._silu_mul,
            signature,
            constants,
            target,
        )


def main() -> int:
    failed = 0
    count = 0
    for name, kernel, signature, constants, target in cases():
        count += 1
        try:
            compile_one(kernel, signature, constants, target)
        except Exception:
            failed += 1
            print(f"FAILED {name}\n{traceback.format_exc(limit=1)}", flush=True)
    print(f"compiled {count - failed} of {count}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
