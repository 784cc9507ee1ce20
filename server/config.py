"""The one typed configuration of a loraserve server, validated at start.

Every field has a docstring; `ServerConfig.validate()` checks bounds and cross-field rules and
raises ConfigError with a message naming the field.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from loraserve.adapters.errors import AdapterValidationError
from loraserve.adapters.names import split_version, validate_tenant_name
from loraserve.server.engine.config import ATTENTION_BACKENDS, EngineConfig
from loraserve.server.limits import LimitDefaults

DeviceChoice = Literal["auto", "cpu", "cuda"]
DtypeChoice = Literal["auto", "float32", "bfloat16", "float16"]


class ConfigError(ValueError):
    """A configuration value is out of bounds or inconsistent."""


@dataclass(frozen=True)
class ServerConfig:
    """Everything a server needs to start; built from CLI flags by server.main."""

    model_path: Path | None = None
    """Local Hugging Face checkpoint directory. Required to serve (`build_runtime` refuses None);
    `loraserve serve` fills it from --model (or the embedded test model in development mode)."""
    host: str = "127.0.0.1"
    """Address the gRPC port binds to."""
    port: int = 50051
    """gRPC port; 0 picks a free one (tests)."""
    data_dir: Path = Path("./loraserve-data")
    """Durable state: uploaded adapters under data_dir/adapters."""
    tenants_file: Path | None = None
    """TOML file of tenants and hashed API keys; None means single-tenant development mode."""
    tls_cert: Path | None = None
    """PEM server certificate chain: serve gRPC over TLS (needs tls_key)."""
    tls_key: Path | None = None
    """PEM private key of tls_cert."""
    tls_client_ca: Path | None = None
    """PEM CA bundle for mutual TLS: clients must present a certificate it signed."""
    device: DeviceChoice = "auto"
    """"auto" picks CUDA when available, else CPU."""
    dtype: DtypeChoice = "auto"
    """"auto" is bfloat16 on CUDA and float32 on CPU."""
    metrics_port: int | None = 9400
    """Prometheus /metrics HTTP port on host; 0 picks a free one (reported); None disables."""
    max_lora_rank: int = 64
    """Largest adapter rank accepted at upload."""
    adapter_device_bytes: int = 1 << 30
    """Device tier budget for adapter weights, in bytes (pages of 8 ranks across every target
    layer; memory is taken as pages are used, up to this budget)."""
    adapter_host_bytes: int = 4 << 30
    """Host-memory tier budget (LRU) for validated adapters, in bytes."""
    max_batch_size: int = 32
    """Requests running at once (each holds one KV row of max_seq_len tokens)."""
    max_batch_tokens: int = 2048
    """Tokens per engine iteration: prompt chunks plus one per decoding request. A long prompt
    is read in chunks under this budget, so it never stalls everyone else's decoding."""
    max_seq_len: int = 2048
    """Longest request, prompt plus completion (also bounded by the model's context); sizes the
    preallocated KV memory: max_batch_size x max_seq_len tokens."""
    kv_cache_bytes: int = 0
    """Paged KV pool (Llama family), in bytes; 0 takes kv_cache_fraction of the device memory
    free after loading on CUDA, and room for max_batch_size full-length requests on CPU."""
    kv_cache_fraction: float = 0.5
    """Share of free device memory the paged KV pool takes when kv_cache_bytes is 0."""
    enforce_eager: bool = False
    """Run without CUDA graphs, decode and prefill alike (debugging)."""
    prefill_graph_tokens: int = 2048
    """Prefills of up to this many padded tokens (rows x tokens per row, padded to the graphs'
    buckets) replay CUDA graphs captured at start, as decode steps do; larger ones, and every
    prefill on CPU or with enforce_eager, run eagerly. 0: no prefill graphs."""
    async_decode: bool = True
    """Launch each decode step before reading the previous one's tokens (own forward only): the
    host's work on step N (text, stops, events) overlaps the device computing step N+1, whose
    input tokens come from step N's output on the device (on an H200, 1b model, batch 32:
    base rows 6,850 -> 8,833 tokens/s end to end). A step with a row that asks for logprobs
    runs synchronously. False (--no-async-decode) reads every step's tokens before the next."""
    cold_join_hold_seconds: float = 0.02
    """While rows decode, how long a request whose adapter finished loading in the background
    may wait for other queued requests' loads still in flight, so that they join in one prefill
    instead of one each (EngineConfig.cold_join_hold_seconds); 0 admits each at once."""
    attention: str = "sdpa"
    """Decode attention of the own Llama-family forward: "sdpa" (gather the row's KV blocks, then
    PyTorch SDPA) or "triton" (a Triton kernel reading the blocks in place; CUDA with Triton)."""
    lora_overlap: bool = False
    """Run each adapter shrink on a side CUDA stream beside its projection's base matmul (own
    forward with the Triton multi-LoRA kernels; EngineConfig.lora_overlap)."""
    max_waiting_requests: int = 1024
    """Requests queued for a batch, at most; beyond it calls get RESOURCE_EXHAUSTED."""
    tenant_max_requests: int = LimitDefaults.max_requests
    """Requests one tenant may have waiting or running at once (RESOURCE_EXHAUSTED beyond).
    Like every tenant_max_*, the default for tenants whose table in the tenants file sets no
    max_requests of their own (server.limits)."""
    tenant_max_queued_tokens: int = LimitDefaults.max_queued_tokens
    """Prompt plus requested completion tokens one tenant may have waiting."""
    tenant_max_adapters: int = LimitDefaults.max_adapters
    """Adapters one tenant may store."""
    tenant_max_adapter_bytes: int = LimitDefaults.max_adapter_bytes
    """Bytes of adapter weights one tenant may store, counting every kept version."""
    adapter_versions_kept: int = 5
    """Versions of each adapter name kept on disk, the latest included (older ones can be
    pinned with `name@N` or rolled back to); an upload prunes the oldest beyond it."""
    max_new_tokens_limit: int = 1024
    """Largest max_new_tokens a request may ask for."""
    default_max_new_tokens: int = 64
    """max_new_tokens when a request does not set it."""
    max_prompt_tokens: int = 4096
    """Longest prompt in tokens (also bounded by the model's context length)."""
    max_adapter_bytes: int = 512 * 1024 * 1024
    """Largest adapter_model.safetensors accepted at upload."""
    max_adapter_config_bytes: int = 64 * 1024
    """Largest adapter_config.json accepted at upload."""
    max_stop_sequences: int = 8
    """Stop sequences per request, at most."""
    tenant_max_uploads: int = LimitDefaults.max_uploads
    """Uploads one tenant may have in progress at once (RESOURCE_EXHAUSTED beyond): each holds
    open files and a temp directory, so an unbounded number would exhaust descriptors."""
    max_uploads: int = 64
    """Uploads in progress on the whole server, at most (RESOURCE_EXHAUSTED beyond)."""
    upload_idle_seconds: float = 30.0
    """An upload that sends nothing for this long is ended (DEADLINE_EXCEEDED) and removed."""
    upload_deadline_seconds: float = 900.0
    """Longest an upload may take from its first message to its last (DEADLINE_EXCEEDED)."""
    max_message_bytes: int = 8 * 1024 * 1024
    """Largest single gRPC message (prompts, upload chunks)."""
    stream_interval_seconds: float = 0.02
    """GenerateStream sends a request's first tokens at once, then at most one message per
    this interval, each with every token produced since the last (0: one per step); the finish
    leaves at once. Per-token messages cost the event loop, which shares the GIL with the
    engine thread, as much as a GPU decode step for a whole batch; 20 ms is ~10 tokens per
    message on a GPU (server.api.stream_pacing)."""
    gc_freeze: bool = True
    """`loraserve serve` only: once started (model, CUDA graphs, preloaded adapters), move every
    object alive into the cyclic collector's permanent generation (gc.freeze). A full
    collection then scans only what serving created since, not the ~370,000 objects torch,
    transformers and the model leave behind: on the embedded bench model it fell from 174 ms,
    a pause of the engine thread whenever one ran there, to under 1 ms."""
    gil_switch_interval_seconds: float | None = None
    """`loraserve serve` only: Python's thread switch interval for the whole process (None keeps
    Python's 5 ms). The engine thread and the gRPC event loop share one GIL; when the engine
    thread wants it back, the loop keeps it until it blocks or this interval passes, so a
    shorter one bounds how long a burst of stream messages can hold up a decode step (not yet
    measured on a GPU: scripts/gpu_check.sh runs the gRPC bench with 0.5 ms beside the
    default)."""
    grace_seconds: float = 10.0
    """On SIGTERM, time in-flight requests get to finish before the server exits."""
    price_per_device_hour: float = 0.0
    """Price of one hour of the whole device (GPU, or the CPU box), in `currency`: prices each
    tenant's attributed compute seconds (loraserve_tenant_cost_total, Usage.cost)."""
    price_per_gb_hour: float = 0.0
    """Price of holding 1 GB (1e9 bytes) of adapter weights on the device for an hour."""
    currency: str = "USD"
    """Unit of every cost figure; a label on loraserve_build_info."""
    access_log: str = "-"
    """Where the JSON access log goes: "-" for stderr, a file path, or "" to disable."""
    access_log_content: bool = False
    """Also log prompts and completions (off by default: tenants' data stays private)."""
    replica_id: str = ""
    """Stable id of this server replica, sent as `served_by` and logged; "" means the host name
    (`loraserve serve-ray` sets the Ray Serve replica id)."""
    preload: tuple[str, ...] = ()
    """`TENANT/NAME` (or `TENANT/NAME@N`) adapters loaded onto the device tier and pinned before
    health turns SERVING (--preload); a missing one, or one that does not fit, fails the start.
    Pins made over the API (PinAdapter) are not persisted: only these come back on a restart."""
    shared_store: bool = False
    """The data directory is shared with other server processes (Ray Serve replicas): no cached
    latest records, cross-process file locks (adapters.shared_store)."""

    def validate(self) -> ServerConfig:
        """Checks bounds and cross-field rules; returns self for chaining."""
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port: {self.port} is not in 0..65535")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port: {self.metrics_port} is not in 0..65535")
        _positive = (
            "max_lora_rank",
            "adapter_device_bytes",
            "adapter_host_bytes",
            "max_batch_size",
            "max_batch_tokens",
            "max_seq_len",
            "max_waiting_requests",
            "tenant_max_requests",
            "tenant_max_queued_tokens",
            "tenant_max_adapters",
            "tenant_max_adapter_bytes",
            "adapter_versions_kept",
            "max_new_tokens_limit",
            "default_max_new_tokens",
            "max_prompt_tokens",
            "max_adapter_bytes",
            "max_adapter_config_bytes",
            "max_message_bytes",
            "tenant_max_uploads",
            "max_uploads",
        )
        for name in _positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.kv_cache_bytes < 0:
            raise ConfigError(f"kv_cache_bytes: {self.kv_cache_bytes} is negative")
        if self.attention not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"attention: {self.attention!r} is not one of {', '.join(ATTENTION_BACKENDS)}"
            )
        if not 0.0 < self.kv_cache_fraction <= 0.95:
            raise ConfigError(f"kv_cache_fraction: {self.kv_cache_fraction} is not in (0, 0.95]")
        if self.max_lora_rank > 1024:
            raise ConfigError(f"max_lora_rank: {self.max_lora_rank} is above 1024")
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ConfigError(
                f"default_max_new_tokens: {self.default_max_new_tokens} exceeds "
                f"max_new_tokens_limit {self.max_new_tokens_limit}"
            )
        for name in ("upload_idle_seconds", "upload_deadline_seconds"):
            value = getattr(self, name)
            if not 0 < value < float("inf"):
                raise ConfigError(f"{name}: must be a finite number > 0, got {value}")
        if not 0 <= self.stream_interval_seconds <= 10:  # also refuses NaN
            raise ConfigError(
                "stream_interval_seconds: must be a number from 0 to 10, got "
                f"{self.stream_interval_seconds}"
            )
        if not 0 <= self.prefill_graph_tokens <= 1 << 16:
            raise ConfigError(
                f"prefill_graph_tokens: must be from 0 to 65536, got {self.prefill_graph_tokens}"
            )
        if not 0 <= self.cold_join_hold_seconds <= 1:  # also refuses NaN
            raise ConfigError(
                "cold_join_hold_seconds: must be a number from 0 to 1, got "
                f"{self.cold_join_hold_seconds}"
            )
        interval = self.gil_switch_interval_seconds
        if interval is not None and not 1e-6 <= interval <= 1:  # also refuses NaN
            raise ConfigError(
                f"gil_switch_interval_seconds: must be a number from 1e-06 to 1, got {interval}"
            )
        if not self.grace_seconds >= 0:  # also refuses NaN
            raise ConfigError(f"grace_seconds: must be a number >= 0, got {self.grace_seconds}")
        for name in ("price_per_device_hour", "price_per_gb_hour"):
            value = getattr(self, name)
            if not 0 <= value < float("inf"):
                raise ConfigError(f"{name}: must be a finite number >= 0, got {value}")
        if not self.currency or not self.currency.isascii() or len(self.currency) > 16:
            raise ConfigError(f"currency: {self.currency!r} must be 1-16 ASCII characters")
        if self.max_stop_sequences < 0:
            raise ConfigError(
                f"max_stop_sequences: must not be negative, got {self.max_stop_sequences}"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert/tls_key: TLS needs both a certificate and its key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("tls_client_ca: mutual TLS needs the server's tls_cert and tls_key")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{name}: {path} is not a readable file")
        for spec in self.preload:
            parse_preload(spec)
        if self.tenants_file is None and not is_loopback(self.host):
            raise ConfigError(
                f"host: {self.host!r} is not a loopback address; without --tenants the server runs "
                "in single-tenant development mode with no authentication and binds loopback only "
                "(pass --tenants FILE to serve other hosts)"
            )
        return self

    def preloads(self) -> list[tuple[str, str]]:
        """The --preload entries as (tenant, adapter spec) pairs, in order."""
        return [parse_preload(spec) for spec in self.preload]

    def engine_config(self) -> EngineConfig:
        """The engine's share of the settings."""
        return EngineConfig(
            max_batch_size=self.max_batch_size,
            max_waiting_requests=self.max_waiting_requests,
            max_batch_tokens=self.max_batch_tokens,
            max_seq_len=self.max_seq_len,
            max_prompt_tokens=self.max_prompt_tokens,
            max_new_tokens_limit=self.max_new_tokens_limit,
            default_max_new_tokens=self.default_max_new_tokens,
            max_stop_sequences=self.max_stop_sequences,
            adapter_device_bytes=self.adapter_device_bytes,
            adapter_host_bytes=self.adapter_host_bytes,
            price_per_device_hour=self.price_per_device_hour,
            max_lora_rank=self.max_lora_rank,
            kv_cache_bytes=self.kv_cache_bytes,
            kv_cache_fraction=self.kv_cache_fraction,
            enforce_eager=self.enforce_eager,
            prefill_graph_tokens=self.prefill_graph_tokens,
            attention=self.attention,
            lora_overlap=self.lora_overlap,
            async_decode=self.async_decode,
            cold_join_hold_seconds=self.cold_join_hold_seconds,
        )

    def limit_defaults(self) -> LimitDefaults:
        """The server-wide per-tenant limits, which the tenants file may override per tenant."""
        return LimitDefaults(
            max_requests=self.tenant_max_requests,
            max_queued_tokens=self.tenant_max_queued_tokens,
            max_adapters=self.tenant_max_adapters,
            max_adapter_bytes=self.tenant_max_adapter_bytes,
            max_uploads=self.tenant_max_uploads,
        )

    @property
    def dev_mode(self) -> bool:
        """True without a tenants file: one tenant, no API keys, loopback only."""
        return self.tenants_file is None


def is_loopback(host: str) -> bool:
    """True for localhost and loopback IP literals (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_preload(spec: str) -> tuple[str, str]:
    """`TENANT/NAME[@N]` -> (tenant, `NAME[@N]`); ConfigError naming the entry if malformed."""
    tenant, slash, adapter = spec.partition("/")
    try:
        if not slash:
            raise AdapterValidationError("preload", "must be TENANT/NAME or TENANT/NAME@N")
        validate_tenant_name(tenant)
        split_version(adapter)
    except AdapterValidationError as exc:
        raise ConfigError(f"preload: {spec!r}: {exc.message}") from None
    return tenant, adapter
