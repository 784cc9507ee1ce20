"""Writes a random but valid, non-trivial PEFT LoRA adapter for a base model, to try things out.

    python scripts/make_example_adapter.py OUT_DIR [--model PATH] [--rank 8] [--alpha 16]
        [--targets q_proj,v_proj] [--seed 0]

Without --model it targets the embedded test model (`loraserve serve --model embedded`). Real
adapters come from fine-tuning (PEFT); this one only changes the outputs in a repeatable way.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loraserve.testing.tiny_model import default_model_path

    model_dir = args.model or default_model_path()
    torch.manual_seed(args.seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    config = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        target_modules=args.targets.split(","),
        init_lora_weights=False,  # random A and B, so the adapter visibly changes outputs
        task_type="CAUSAL_LM",
    )
    get_peft_model(base, config).save_pretrained(args.out_dir)
    print(f"wrote {args.out_dir}/adapter_config.json and adapter_model.safetensors")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
