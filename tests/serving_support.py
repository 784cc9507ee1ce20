"""Shared test helpers: tiny base models per architecture, PEFT adapters, an engine harness.

Servers are started with loraserve.server.background (BackgroundServer in a thread, ServerProcess
as a child): both bind port 0 and report it.

Models are built with the project's own deterministic builder (no hub) with a large
initializer_range, so logits are well separated and float noise cannot flip a greedy near-tie.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from loraserve.server.background import BackgroundServer, ServerProcess
from loraserve.server.config import ServerConfig
from loraserve.testing.tiny_model import TinyModelSpec, cached_model_path

ARCH_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def model_spec_for(arch: str) -> TinyModelSpec:
    """A small model of `arch` with well-separated logits."""
    return TinyModelSpec(
        arch=arch,  # type: ignore[arg-type]
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        max_position_embeddings=256,
        initializer_range=0.2,
        seed=7,
    )


def build_test_model(arch: str, cache_dir: Path) -> Path:
    return cached_model_path(model_spec_for(arch), cache_dir=cache_dir)


@dataclass(frozen=True)
class AdapterShape:
    """One LoRA configuration to test."""

    rank: int
    alpha: float
    targets: list[str] | str
    use_rslora: bool = False
    seed: int = 0


def make_peft_adapter(model_dir: Path, out_dir: Path, shape: AdapterShape) -> Path:
    """Saves a non-trivial PEFT adapter (init_lora_weights=False: B is not zero)."""
    torch.manual_seed(shape.seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    config = LoraConfig(
        r=shape.rank,
        lora_alpha=shape.alpha,
        use_rslora=shape.use_rslora,
        target_modules=shape.targets,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base, config)
    # init_lora_weights=False draws B like A; shrink it so outputs change but stay sane.
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.5)
    peft_model.save_pretrained(out_dir)
    return out_dir


KEYS = {"acme": "acme-secret-key", "globex": "globex-secret-key", "root": "root-admin-key"}
"""API keys of the integration tests' tenants (root is an admin)."""


def client_for(server: BackgroundServer | ServerProcess, tenant: str | None):
    """A sync client for `tenant` (a KEYS name, or any other string used as a raw key)."""
    from loraserve.client.config import ClientConfig
    from loraserve.client.sync import LoraServeClient

    key = None if tenant is None else KEYS.get(tenant, tenant)
    return LoraServeClient(ClientConfig(target=server.target, api_key=key, timeout_s=60))


def store_adapter(service, tenant: str, name: str, adapter_dir: Path):
    """Uploads a PEFT directory through AdapterService's upload session (validation included)."""
    import hashlib

    from loraserve.server.adapter_service import FileDeclaration

    files = {
        "config": (adapter_dir / "adapter_config.json").read_bytes(),
        "weights": (adapter_dir / "adapter_model.safetensors").read_bytes(),
    }
    declarations = [
        FileDeclaration(kind, len(data), hashlib.sha256(data).hexdigest())  # type: ignore[arg-type]
        for kind, data in files.items()
    ]
    session = service.begin_upload(tenant, name, "", declarations)
    for kind, data in files.items():
        session.add_chunk(kind, data)
    return session.finish()


class EngineHarness:
    """An Engine over a tiny model with a real store, driven synchronously for tests."""

    def __init__(
        self,
        model_dir: Path,
        data_dir: Path,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        observer: object = None,
        loader: object = None,
        limits: dict[str, dict[str, int]] | None = None,
        **config_overrides: object,
    ) -> None:
        """`loader` replaces the store read the engine uses (default: AdapterService.load);
        `limits`: per-tenant overrides, as a tenants file's tables give them."""
        from loraserve.server.runtime import build_runtime

        self.config = ServerConfig(
            model_path=model_dir, data_dir=data_dir, device=device, dtype=dtype, **config_overrides
        ).validate()
        from loraserve.server.limits import TenantLimitTable

        self.limits = TenantLimitTable(self.config.limit_defaults(), limits)
        parts = build_runtime(self.config, observer, loader, self.limits)  # type: ignore[arg-type]
        self.loaded, self.service, self.engine = parts.loaded, parts.adapter_service, parts.engine

    def submit(
        self,
        prompt_ids: list[int],
        adapter: str | None,
        tenant: str = "t",
        logprobs: object = None,
        **sampling,
    ):
        """Queues one request; returns the list its events will be appended to.

        logprobs: a LogprobOptions (None asks for none)."""
        from loraserve.server.engine.engine import SamplingOverrides
        from loraserve.server.engine.types import AdapterRef

        events: list = []
        self.engine.submit(
            tenant=tenant,
            adapter=None if adapter is None else AdapterRef(tenant, adapter),
            prompt_ids=prompt_ids,
            sampling=self.engine.sampling(SamplingOverrides(**sampling)),
            sink=events.append,
            logprobs=logprobs,  # type: ignore[arg-type]
        )
        return events

    def run(self, jobs: list[list], timeout: float = 120.0) -> None:
        """Starts the engine thread (if needed) and waits until every job finished or failed."""
        import time

        from loraserve.server.engine.types import ErrorEvent, FinishEvent

        if self.engine._thread is None:
            self.engine.start()
        deadline = time.monotonic() + timeout
        while any(not ev or not isinstance(ev[-1], FinishEvent | ErrorEvent) for ev in jobs):
            if time.monotonic() > deadline:
                raise TimeoutError("engine did not finish the jobs")
            time.sleep(0.005)

    def close(self) -> None:
        self.engine.stop(10)


@dataclass
class CheckedSide:
    """A stand-in for side_stream.SideStream where there are no streams (CPU): runs the side
    work inline and checks the forward's use of it: every beside() is joined before the next
    one, and nothing is left unjoined (`assert_joined`)."""

    log: list[str] = field(default_factory=list)
    """"beside", "end" (the side work's last launch) and "join", in call order (a test may log
    its own entries here too)."""

    def _last(self) -> str | None:
        mine = [e for e in self.log if e in ("beside", "end", "join")]
        return mine[-1] if mine else None

    @contextmanager
    def beside(self) -> Iterator[None]:
        assert self._last() in (None, "join"), f"beside() before a join: {self.log[-3:]}"
        self.log.append("beside")
        yield
        self.log.append("end")

    def join(self) -> None:
        assert self._last() == "end", f"join() without side work: {self.log[-3:]}"
        self.log.append("join")

    def assert_joined(self) -> None:
        assert self._last() == "join", self.log[-3:]


def prefill_then_decode(
    loaded,
    prompts: list[list[int]],
    pages: list[tuple[int, ...]],
    attention: str = "sdpa",
    fused_ops: bool = False,
    lora_kernels: bool = False,
    lora_side: object = None,
):
    """Logits after each prompt (batch, vocab), then after one greedy decode step (batch, vocab).

    fused_ops / lora_kernels: the own forward runs fused_ops' / the multi-LoRA Triton kernels
    (on CPU under the interpreter, which the executor itself never turns on); lora_side (with
    lora_kernels): each shrink runs beside its base matmul on this (a CheckedSide on CPU).

    Runs the engine's own executor for `loaded` (paged KV for the Llama family, KV rows for
    the generic path). Rows sit in slots in reverse order and the decode step lists them by
    slot, so the row-to-slot mapping is exercised in both directions.
    """
    from loraserve.server.engine.executor import ExecutorSettings, make_executor
    from loraserve.server.engine.planner import RowPlan, StepPlan, blocks_for

    batch = len(prompts)
    longest = max(len(p) for p in prompts) + 8
    executor = make_executor(
        loaded,
        ExecutorSettings(
            max_batch_size=batch,
            max_seq_len=longest,
            max_batch_tokens=2048,
            attention=attention,
        ),
    )
    if fused_ops:
        loaded.model.fused_ops = True
    if lora_kernels:
        loaded.model.lora_kernels = True
        loaded.model.lora_side = lora_side
    slots = list(range(batch))[::-1]
    blocks: list[tuple[int, ...]] = []
    for p in prompts:
        if executor.allocator is None:
            blocks.append(())
        else:
            got = executor.allocator.allocate(blocks_for(len(p) + 1))
            assert got is not None
            blocks.append(tuple(got))
    prefill = tuple(
        RowPlan(slot=slots[i], tokens=tuple(p), start=0, blocks=blocks[i], pages=pages[i])
        for i, p in enumerate(prompts)
    )
    first = executor.execute(StepPlan("prefill", prefill))
    next_tokens = first.argmax(-1).tolist()
    by_slot = sorted(range(batch), key=lambda i: slots[i])
    decode = tuple(
        RowPlan(
            slot=slots[i],
            tokens=(next_tokens[i],),
            start=len(prompts[i]),
            blocks=blocks[i],
            pages=pages[i],
        )
        for i in by_slot
    )
    second_by_slot = executor.execute(StepPlan("decode", decode))
    second = second_by_slot[[by_slot.index(i) for i in range(batch)]]
    return first, next_tokens, second


def make_pki(directory: Path) -> Path:
    """A throwaway CA, a server certificate for localhost/127.0.0.1 and a client certificate.

    Files in `directory`: ca.pem/ca.key, server.pem/server.key, client.pem/client.key, and a
    second CA (other-ca.pem) with a client certificate it signed (stranger.pem/stranger.key).
    Needs the openssl binary (.ci/run installs it); fails, never skips, without it.
    """
    import shutil
    import subprocess

    assert shutil.which("openssl"), "openssl missing: install the Debian package 'openssl'"

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    def new_ca(name: str) -> None:
        openssl(
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.pem",
            "-days",
            "1",
            "-subj",
            f"/CN={name}",
        )

    def issue(name: str, ca: str, san: str | None) -> None:
        openssl(
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        ext = directory / f"{name}.ext"
        ext.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            f"{ca}.pem",
            "-CAkey",
            f"{ca}.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            f"{name}.pem",
            "-extfile",
            ext.name,
        )

    directory.mkdir(parents=True, exist_ok=True)
    new_ca("ca")
    new_ca("other-ca")
    issue("server", "ca", "DNS:localhost,IP:127.0.0.1")
    issue("client", "ca", None)
    issue("stranger", "other-ca", None)
    return directory


def integration_config(
    default_model: Path, tenants_file: Path, data_dir: Path, **overrides: Any
) -> ServerConfig:
    """The integration server's config; `overrides` set further ServerConfig fields."""
    return ServerConfig(
        model_path=default_model,
        port=0,
        metrics_port=None,
        data_dir=data_dir,
        tenants_file=tenants_file,
        max_lora_rank=32,
        max_adapter_bytes=4 * 1024 * 1024,
        max_new_tokens_limit=256,
        **overrides,
    )


class EagerReplay:
    """Stands in for a CUDA graph where there is none: a replay runs the recorded forward
    again, into the same memory (the prefill graphs' shared output), as a graph replay does."""

    def __init__(self, forward: Callable[[], torch.Tensor]) -> None:
        self.forward = forward

    def replay(self) -> None:
        self.forward()


def eager_capture(forward: Callable[[], torch.Tensor]) -> tuple[EagerReplay, torch.Tensor]:
    """server.engine.prefill_graphs.Capture without CUDA: the forward runs once, as a capture's
    warm-up does, and again at every replay."""
    return EagerReplay(forward), forward()


def emulate_prefill_graphs(executor) -> None:
    """Gives a CPU PagedExecutor the prefill graphs a CUDA one captures at start (the shapes
    its settings give, every page-table width), replayed by EagerReplay. A CUDA executor
    captures adapter widths only over stacks reserved at start, whose addresses its graphs
    keep; a replay that reruns the forward reads the stacks where they are, so here the stacks
    stay as the CPU path keeps them."""
    if not executor._settings.enforce_eager:
        executor.capture_prefill_graphs(eager_capture, [0, *executor.page_buckets])
