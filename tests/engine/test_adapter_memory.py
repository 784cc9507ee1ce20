"""Loading then deleting 200 adapters returns device and host memory to their baseline."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
from pathlib import Path

import psutil
import torch
from safetensors.torch import save
from serving_support import EngineHarness, build_test_model

from loraserve.adapters.weights import lora_keys
from loraserve.server.adapter_service import FileDeclaration

COUNT = 200
RANK = 32


def _write_adapter(service, tenant: str, name: str, spec, seed: int) -> None:
    """Uploads a rank-RANK adapter on every target layer through the real upload path.

    Sized so 200 of them hold about 50 MB in each tier: far above the allocator noise (a few
    MB) that process RSS shows, so the check below measures the adapters, not the noise.
    """
    import hashlib

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module in spec.modules.values():
        key_a, key_b = lora_keys(module.name)
        tensors[key_a] = torch.randn(RANK, module.in_features, generator=generator) * 0.1
        tensors[key_b] = torch.randn(module.out_features, RANK, generator=generator) * 0.1
    targets = sorted({m.name.rsplit(".", 1)[-1] for m in spec.modules.values()})
    config = json.dumps(
        {"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "target_modules": targets}
    ).encode()
    weights = save(tensors)
    files = {"config": config, "weights": weights}
    session = service.begin_upload(
        tenant,
        name,
        "",
        [FileDeclaration(k, len(v), hashlib.sha256(v).hexdigest()) for k, v in files.items()],  # type: ignore[arg-type]
    )
    for kind, data in files.items():
        session.add_chunk(kind, data)  # type: ignore[arg-type]
    session.finish()


def _trim_heap() -> None:
    """Returns freed heap pages to the OS (glibc keeps them otherwise), so RSS shows frees."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def test_loading_and_deleting_200_adapters_frees_device_and_host_memory(
    model_cache: Path, tmp_path: Path
) -> None:
    model = build_test_model("llama", model_cache)
    harness = EngineHarness(model, tmp_path, max_batch_size=8)
    pool, host = harness.engine.device_pool, harness.engine.host_cache
    process = psutil.Process()
    try:
        for i in range(COUNT):
            _write_adapter(harness.service, "t", f"a{i}", harness.loaded.spec, seed=i)
        warm = harness.submit([5, 6, 7], None, max_new_tokens=1)
        harness.run([warm])
        # One load-and-delete cycle before the baseline, so the allocator's one-time growth
        # (arenas, mmap thresholds) is in the baseline and the figure below is what stays.
        for i in range(8):
            _write_adapter(harness.service, "t", f"warm{i}", harness.loaded.spec, seed=1000 + i)
        harness.run([harness.submit([5, 6, 7], f"warm{i}", max_new_tokens=1) for i in range(8)])
        for i in range(8):
            harness.service.delete("t", f"warm{i}")
        harness.run([harness.submit([5, 6, 7], None, max_new_tokens=1)])  # a step collects
        gc.collect()
        _trim_heap()
        baseline_rss = process.memory_info().rss
        assert pool.allocated_bytes() == 0 and host.resident_bytes() == 0

        for start in range(0, COUNT, 8):
            jobs = [
                harness.submit([5, 6, 7], f"a{i}", max_new_tokens=1)
                for i in range(start, start + 8)
            ]
            harness.run(jobs)
        assert len(host.resident()) == COUNT, "every adapter passed through the host tier"
        assert host.resident_bytes() > 0 and pool.allocated_bytes() > 0
        loaded_rss = process.memory_info().rss

        for i in range(COUNT):
            harness.service.delete("t", f"a{i}")
        harness.run([harness.submit([5, 6, 7], None, max_new_tokens=1)])  # a step collects
        assert pool.resident() == {}
        assert pool.reserved_bytes() == 0
        assert pool.allocated_bytes() == 0, "page stacks must be freed when no adapter is left"
        assert host.resident() == [] and host.resident_bytes() == 0
        assert all(layer.lora_a is None for layer in harness.loaded.lora_layers.values())
        gc.collect()
        _trim_heap()
        after_rss = process.memory_info().rss
    finally:
        harness.close()
    # Process memory comes back near the baseline: allow for allocator caching, but far less
    # than what the 200 adapters held.
    grown = loaded_rss - baseline_rss
    assert after_rss - baseline_rss <= max(grown // 2, 8 << 20), (
        baseline_rss,
        loaded_rss,
        after_rss,
    )
