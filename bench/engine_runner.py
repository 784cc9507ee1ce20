"""Drives loraserve's in-process Engine through its public API only (Engine.submit + events).

`EngineBench` builds an Engine over a local checkpoint and a real AdapterStore, the same way the
server does; adapters are registered through AdapterService's upload session, so the measured
load path (store read, checksum, validation, copy into device pages) is the server's. `run()`
submits requests either all at once or at their wall-clock arrival times and collects each request's
Usage; it never looks inside the scheduler, so it measures whatever engine is there.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from loraserve.bench.stats import RequestResult, RunResult


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload."""

    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    adapter: str | None
    """Adapter name within `tenant`; None is the bare base model."""
    tenant: str = "bench"
    arrival_s: float = 0.0
    """Seconds after the run's start at which it is submitted (0: at once)."""


@dataclass(frozen=True)
class EngineLimits:
    """The engine's bounds for a bench run (ServerConfig fields)."""

    max_batch_size: int = 16
    device_adapters: int = 16
    """Adapters of rank max_rank the device tier must hold at once (sizes its byte budget)."""
    max_rank: int = 16
    max_new_tokens: int = 1024
    max_waiting_requests: int = 100_000
    extra: tuple[tuple[str, str], ...] = ()
    """Other ServerConfig fields by name, as text (converted to the field's type)."""


def device_budget_bytes(model_dir: Path, adapters: int, rank: int, dtype: str) -> int:
    """A device adapter budget that holds `adapters` adapters of `rank` (with 25% headroom).

    Sized from the model's shapes alone (built on the meta device: no weights are read).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from loraserve.server.engine.device_pool import DEFAULT_PAGE_RANK
    from loraserve.server.engine.model import find_lora_targets

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    targets, _ = find_lora_targets(model)
    widths = sum(sum(m.weight.shape) for m in targets.values())  # sum of d_in + d_out
    itemsize = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    page_bytes = DEFAULT_PAGE_RANK * widths * itemsize
    pages = -(-rank // DEFAULT_PAGE_RANK)
    return int(adapters * pages * page_bytes * 1.25) + page_bytes


def apply_config_overrides(config, extra: tuple[tuple[str, str], ...]):
    """`config` with the named fields set; the text is converted to each field's current type."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config)}
    changes: dict[str, object] = {}
    for key, text in extra:
        if key not in names:
            raise ValueError(f"--engine-opt: ServerConfig has no field {key!r}")
        current = getattr(config, key)
        if isinstance(current, bool):
            changes[key] = text.lower() in ("1", "true", "yes", "on")
        elif isinstance(current, int | float):
            changes[key] = type(current)(text)
        elif isinstance(current, Path) or (current is None and key.endswith(("_path", "_dir"))):
            changes[key] = Path(text)
        else:
            changes[key] = text
    return dataclasses.replace(config, **changes)


class _Collector:
    """Receives engine events on the engine thread; never blocks it."""

    def __init__(self, count: int, start: float) -> None:
        self._start = start
        self._lock = threading.Lock()
        self._left = count
        self.done = threading.Event()
        self.results: list[RequestResult | None] = [None] * count
        self.last_finish = start
        if count == 0:
            self.done.set()

    def sink(self, index: int, arrival_s: float):
        from loraserve.server.engine.types import ErrorEvent, FinishEvent

        def on_event(event: object) -> None:
            if isinstance(event, FinishEvent):
                usage = event.usage
                result = RequestResult(
                    arrival_s=arrival_s,
                    completion_tokens=usage.completion_tokens,
                    ttft_s=usage.time_to_first_token_seconds,
                    total_s=usage.total_seconds,
                    queue_s=usage.queue_seconds,
                )
            elif isinstance(event, ErrorEvent):
                result = RequestResult(
                    arrival_s=arrival_s,
                    completion_tokens=0,
                    ttft_s=float("nan"),
                    total_s=float("nan"),
                    queue_s=float("nan"),
                    error=f"{event.error.kind.value}: {event.error.message}",
                )
            else:
                return
            self._record(index, result)

        return on_event

    def _record(self, index: int, result: RequestResult) -> None:
        with self._lock:
            if self.results[index] is not None:
                return
            self.results[index] = result
            self.last_finish = time.perf_counter()
            self._left -= 1
            if self._left == 0:
                self.done.set()


def upload_adapter_dir(service, tenant: str, name: str, adapter_dir: Path):
    """Uploads a PEFT directory through `service` (an AdapterService: checksums, validation,
    commit) as an upload session does; returns the stored AdapterRecord."""
    from loraserve.server.adapter_service import MAX_CHUNK_BYTES, FileDeclaration

    files = {
        "config": (Path(adapter_dir) / "adapter_config.json").read_bytes(),
        "weights": (Path(adapter_dir) / "adapter_model.safetensors").read_bytes(),
    }
    declarations = [
        FileDeclaration(kind, len(data), hashlib.sha256(data).hexdigest())  # type: ignore[arg-type]
        for kind, data in files.items()
    ]
    session = service.begin_upload(tenant, name, "", declarations)
    try:
        for kind, data in files.items():
            for offset in range(0, len(data), MAX_CHUNK_BYTES):  # the upload's chunk bound
                session.add_chunk(kind, data[offset : offset + MAX_CHUNK_BYTES])  # type: ignore[arg-type]
        return session.finish()
    except BaseException:
        session.abort()
        raise


class EngineBench:
    """One loraserve Engine over `model_dir`, with its adapter store under `data_dir`."""

    def __init__(
        self,
        model_dir: Path,
        data_dir: Path,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        limits: EngineLimits | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        observer=None,
    ) -> None:
        """temperature, top_p: the sampling of every request `run` submits (0: greedy);
        observer: the engine's EngineObserver (the server passes its Metrics; default none)."""
        from loraserve.server.config import ServerConfig
        from loraserve.server.runtime import build_runtime

        limits = limits or EngineLimits()
        self.temperature, self.top_p = temperature, top_p
        wanted: dict[str, object] = {
            "model_path": Path(model_dir),
            "data_dir": Path(data_dir),
            "device": device,
            "dtype": dtype,
            "metrics_port": None,
            "max_lora_rank": limits.max_rank,
            "adapter_device_bytes": device_budget_bytes(
                Path(model_dir), limits.device_adapters, limits.max_rank, dtype
            ),
            "max_batch_size": limits.max_batch_size,
            "max_waiting_requests": limits.max_waiting_requests,
            "max_new_tokens_limit": limits.max_new_tokens,
            "default_max_new_tokens": min(64, limits.max_new_tokens),
        }
        config = ServerConfig(**wanted)  # type: ignore[arg-type]
        self.config = apply_config_overrides(config, limits.extra).validate()
        # The server's own wiring (server/runtime.py), without the gRPC layer.
        parts = build_runtime(self.config, observer=observer)
        self.loaded, self.service, self.engine = parts.loaded, parts.adapter_service, parts.engine
        self.engine.start()

    @property
    def device(self) -> str:
        return str(self.loaded.device)

    def register(self, tenant: str, name: str, adapter_dir: Path) -> None:
        """Uploads a PEFT directory through AdapterService (checksums, validation, commit)."""
        upload_adapter_dir(self.service, tenant, name, adapter_dir)

    def registered(self, tenant: str) -> set[str]:
        return {record.name for record in self.service.list(tenant)}

    def run(
        self, requests: list[BenchRequest], *, timed: bool = False, timeout_s: float = 900.0
    ) -> RunResult:
        """Submits `requests` (at their arrival times when `timed`) and waits for all of them.

        Wall time runs from the first submission to the last finish event.
        """
        from loraserve.server.engine.engine import SamplingOverrides
        from loraserve.server.engine.types import AdapterRef

        order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)
        scheduler = self.engine.scheduler
        decode_s0, decode_tokens0 = scheduler.decode_seconds, scheduler.decode_tokens
        cpu_start = time.process_time()
        start = time.perf_counter()
        collector = _Collector(len(requests), start)
        for index in order:
            request = requests[index]
            if timed:
                delay = start + request.arrival_s - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            sampling = self.engine.sampling(
                SamplingOverrides(
                    max_new_tokens=request.max_new_tokens,
                    temperature=self.temperature,
                    top_p=self.top_p,
                    ignore_eos=True,
                )
            )
            adapter = (
                None if request.adapter is None else AdapterRef(request.tenant, request.adapter)
            )
            self.engine.submit(
                tenant=request.tenant,
                adapter=adapter,
                prompt_ids=list(request.prompt_ids),
                sampling=sampling,
                sink=collector.sink(index, request.arrival_s if timed else 0.0),
            )
        if not collector.done.wait(timeout_s):
            raise TimeoutError(f"the engine did not finish {len(requests)} requests in time")
        cpu_s = time.process_time() - cpu_start
        results = [r for r in collector.results if r is not None]
        return RunResult(
            wall_s=collector.last_finish - start,
            requests=results,
            cpu_s=cpu_s,
            decode_s=scheduler.decode_seconds - decode_s0,
            decode_tokens=scheduler.decode_tokens - decode_tokens0,
        )

    def close(self) -> None:
        self.engine.stop(10)
