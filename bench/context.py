"""Shared state of one bench run: the model, adapter files, the engine and registered tenants.

Everything expensive is built once and lazily, so `--only cold` does not pay for 1,000
adapters, and every part that runs uses the same base model, the same engine and the same
prompts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from loraserve.bench.adapter_factory import AdapterFactory, LoraShape
from loraserve.bench.engine_runner import BenchRequest, EngineBench, EngineLimits
from loraserve.bench.models import SIZES, bench_model_path, model_digest
from loraserve.bench.settings import BenchSettings
from loraserve.bench.workloads import prompt_from_corpus

log = logging.getLogger("bench")


@dataclass
class BenchContext:
    """Lazily built resources shared by the parts of one run."""

    settings: BenchSettings
    work_dir: Path
    """Scratch space for this run (adapter stores); removed by the caller."""
    timings: dict[str, float] = field(default_factory=dict)
    """Setup costs, seconds (reported in the JSON)."""
    _model_dir: Path | None = None
    _factory: AdapterFactory | None = None
    _engine: EngineBench | None = None
    _tenants: dict[str, list[str]] = field(default_factory=dict)
    _corpus: list[int] | None = None
    engine_info: dict = field(default_factory=dict)
    """The engine's device and its whole ServerConfig, once built (kept after close)."""

    # ---- model, adapters, engine ------------------------------------------------------------

    @property
    def model_dir(self) -> Path:
        if self._model_dir is None:
            s = self.settings
            with self.timed("build_model_s"):
                self._model_dir = bench_model_path(
                    s.size,
                    seed=s.seed,
                    storage_dtype="float32" if s.dtype == "float32" else "bfloat16",
                    cache_dir=s.cache_dir,
                )
        return self._model_dir

    @property
    def factory(self) -> AdapterFactory:
        if self._factory is None:
            import torch

            s = self.settings
            self._factory = AdapterFactory(
                self.model_dir,
                LoraShape(rank=s.rank, alpha=2.0 * s.rank),
                seed=s.seed,
                dtype=torch.float32 if s.dtype == "float32" else torch.bfloat16,
            )
        return self._factory

    def adapter_dirs(self, count: int) -> list[Path]:
        """Directories of adapters 0..count-1 (cached across runs: they depend on the seed)."""
        s = self.settings
        size = SIZES[s.size]
        key = model_digest(size, s.seed, s.dtype)
        root = s.cache_dir / "adapters" / f"{s.size}-{key}-r{s.rank}"
        with self.timed("write_adapters_s"):
            return self.factory.ensure(root, count)

    @property
    def engine(self) -> EngineBench:
        if self._engine is None:
            s = self.settings
            with self.timed("load_engine_s"):
                self._engine = EngineBench(
                    self.model_dir,
                    self.work_dir / "engine-data",
                    device=s.device,
                    dtype=s.dtype,
                    limits=EngineLimits(
                        max_batch_size=s.batch,
                        device_adapters=s.device_adapters,
                        max_rank=s.rank,
                        max_new_tokens=max(s.output_len, s.trace_output_len[1], 8),
                        extra=s.engine_opts,
                    ),
                    temperature=s.temperature,
                    top_p=s.top_p,
                )
            config = dataclasses.asdict(self._engine.config)
            self.engine_info = {
                "device": self._engine.device,
                "engine_config": {
                    k: v if isinstance(v, int | float | bool | None) else str(v)
                    for k, v in config.items()
                },
            }
        return self._engine

    def tenant_with(self, tenant: str, count: int) -> list[str]:
        """Adapter names of `tenant`, registering adapters 0..count-1 through AdapterService."""
        names = self._tenants.get(tenant)
        if names is not None and len(names) >= count:
            return names[:count]
        dirs = self.adapter_dirs(count)
        have = set(names or [])
        with self.timed("register_adapters_s"):
            for index, directory in enumerate(dirs):
                name = f"a{index:04d}"
                if name not in have:
                    self.engine.register(tenant, name, directory)
        self._tenants[tenant] = [f"a{i:04d}" for i in range(count)]
        return self._tenants[tenant]

    # ---- prompts ------------------------------------------------------------------------------

    @property
    def corpus_ids(self) -> list[int]:
        """Token ids of the embedded corpus, the source of every prompt (ids < 1,024)."""
        if self._corpus is None:
            from loraserve.testing.tiny_model import CORPUS, build_tokenizer

            self._corpus = list(build_tokenizer()(CORPUS)["input_ids"])
        return self._corpus

    def prompt(self, length: int, index: int) -> tuple[int, ...]:
        return prompt_from_corpus(self.corpus_ids, length, index)

    def batch_requests(
        self, adapters: list[str | None], tenant: str = "bench"
    ) -> list[BenchRequest]:
        """One request per entry, all with the batch-mode prompt and output lengths."""
        s = self.settings
        return [
            BenchRequest(self.prompt(s.prompt_len, i), s.output_len, name, tenant)
            for i, name in enumerate(adapters)
        ]

    # ---- bookkeeping --------------------------------------------------------------------------

    @contextlib.contextmanager
    def timed(self, key: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - start

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
