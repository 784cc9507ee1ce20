"""The libraries a user would reach for instead of loraserve, on the same model and requests.

`peft-mixed`: one HF PeftModel holding every adapter of the batch, one `generate` call with
`adapter_names=[...]` (PEFT's mixed-adapter batches). `naive-swap`: one request at a time,
`set_adapter(name)` then `generate`. Both decode greedily and exactly `max_new_tokens` tokens
(`min_new_tokens` = `max_new_tokens`), as loraserve does with ignore_eos.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from loraserve.bench.stats import RequestResult, RunResult

BASE_ADAPTER = "__base__"
"""PEFT's name for "no adapter" in adapter_names."""


class PeftBaseline:
    """An HF PeftModel over the bench checkpoint with the given adapters loaded."""

    def __init__(
        self, model_dir: Path, adapters: dict[str, Path], *, device: str, dtype: str
    ) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        if not adapters:
            raise ValueError("the PEFT baseline needs at least one adapter")
        self.device = torch.device("cuda:0" if device == "cuda" else device)
        torch_dtype = getattr(torch, dtype)
        base = AutoModelForCausalLM.from_pretrained(
            model_dir, local_files_only=True, dtype=torch_dtype, use_safetensors=True
        )
        names = list(adapters)
        model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(adapters[name], adapter_name=name)
        self.model = model.to(self.device).eval()
        self.pad_id = int(base.config.pad_token_id or 0)

    def _inputs(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded input ids and attention mask, (batch, width) each."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)  # (batch, width)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (batch, width)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def _generate(self, prompts, max_new_tokens: int, **kwargs) -> int:
        ids, mask = self._inputs(prompts)
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.pad_id,
            **kwargs,
        )
        return int(out.shape[0]) * (int(out.shape[1]) - int(ids.shape[1]))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def mixed(
        self,
        prompts: Sequence[Sequence[int]],
        adapter_names: Sequence[str | None],
        max_new_tokens: int,
    ) -> RunResult:
        """All prompts in one `generate(..., adapter_names=[...])` batch."""
        names = [BASE_ADAPTER if n is None else n for n in adapter_names]
        self._sync()
        cpu_start = time.process_time()
        start = time.perf_counter()
        tokens = self._generate(prompts, max_new_tokens, adapter_names=names)
        self._sync()
        wall = time.perf_counter() - start
        cpu_s = time.process_time() - cpu_start
        per = tokens // max(len(prompts), 1)
        return RunResult(
            wall_s=wall,
            requests=[
                RequestResult(
                    arrival_s=0.0, completion_tokens=per, ttft_s=float("nan"), total_s=wall
                )
                for _ in prompts
            ],
            cpu_s=cpu_s,
        )

    def naive_swap(
        self,
        prompts: Sequence[Sequence[int]],
        adapter_names: Sequence[str | None],
        max_new_tokens: int,
    ) -> RunResult:
        """One request at a time: set_adapter(name) (or disable adapters for None), generate."""
        results = []
        self._sync()
        cpu_start = time.process_time()
        start = time.perf_counter()
        for prompt, name in zip(prompts, adapter_names, strict=True):
            began = time.perf_counter()
            if name is None:
                with self.model.disable_adapter():
                    tokens = self._generate([prompt], max_new_tokens)
            else:
                self.model.set_adapter(name)
                tokens = self._generate([prompt], max_new_tokens)
            self._sync()
            done = time.perf_counter()
            results.append(
                RequestResult(
                    arrival_s=0.0,
                    completion_tokens=tokens,
                    ttft_s=float("nan"),
                    total_s=done - start,
                    queue_s=began - start,
                )
            )
        wall = time.perf_counter() - start
        return RunResult(wall_s=wall, requests=results, cpu_s=time.process_time() - cpu_start)
