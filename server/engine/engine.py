"""The engine facade: the one object the gRPC layer talks to.

Owns the loaded model, the adapter tiers and the scheduler thread. Turns prompts into
token ids, checks request bounds, and hands requests to the scheduler.
"""

from __future__ import annotations

import functools
import threading
import uuid
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from loraserve.server.engine.accounting import EngineObserver
from loraserve.server.engine.config import EngineConfig
from loraserve.server.engine.device_pool import AdapterLoader, AdapterResolver, DevicePool
from loraserve.server.engine.host_cache import HostCache
from loraserve.server.engine.model import LoadedModel
from loraserve.server.engine.prompt_bounds import longest_token_bytes
from loraserve.server.engine.sampling import MAX_SEED, MAX_TEMPERATURE, MIN_TEMPERATURE
from loraserve.server.engine.scheduler import RequestHandle, Scheduler, SchedulerSettings
from loraserve.server.engine.types import (
    AdapterRef,
    EngineError,
    ErrorKind,
    EventSink,
    GenerationRequest,
    SamplingParams,
)


@dataclass(frozen=True)
class SamplingOverrides:
    """Sampling fields as a caller gave them; None means "use the server default"."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool | None = None


class Engine:
    """Serves generation requests for one loaded base model."""

    def __init__(
        self,
        config: EngineConfig,
        loaded: LoadedModel,
        resolver: AdapterResolver,
        loader: AdapterLoader,
        observer: EngineObserver | None = None,
    ) -> None:
        self.config = config
        self.loaded = loaded
        # Tiers: disk (the store, via `loader`) -> host memory (LRU) -> device pages.
        self.host_cache = HostCache(loader, config.adapter_host_bytes, observer)
        self.device_pool = DevicePool(
            loaded.lora_layers,
            budget_bytes=config.adapter_device_bytes,
            loader=self.host_cache.get,
            observer=observer,
        )
        self.scheduler = Scheduler(
            loaded,
            self.device_pool,
            resolver,
            SchedulerSettings(
                max_batch_size=config.max_batch_size,
                max_waiting_requests=config.max_waiting_requests,
                tenant_max_requests=config.tenant_max_requests,
                tenant_max_queued_tokens=config.tenant_max_queued_tokens,
                max_batch_tokens=config.max_batch_tokens,
                max_seq_len=self.max_seq_len,
                price_per_device_hour=config.price_per_device_hour,
                kv_cache_bytes=config.kv_cache_bytes,
                kv_cache_fraction=config.kv_cache_fraction,
                enforce_eager=config.enforce_eager,
                max_lora_rank=config.max_lora_rank,
            ),
            observer,
            prefetch=self.host_cache.prefetch,
        )
        self._thread: threading.Thread | None = None

    @property
    def max_seq_len(self) -> int:
        """Tokens per request (prompt plus completion): the KV row length."""
        return min(self.config.max_seq_len, self.loaded.max_context)

    @property
    def max_prompt_tokens(self) -> int:
        return min(self.config.max_prompt_tokens, self.max_seq_len - 1)

    @functools.cached_property
    def max_prompt_bytes(self) -> int:
        """Longest prompt (or sum of chat message contents) in UTF-8 bytes that can still fit
        in max_prompt_tokens: anything longer is refused before tokenizing."""
        return self.max_prompt_tokens * longest_token_bytes(self.loaded.tokenizer)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.loaded.tokenizer, "chat_template", None))

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.scheduler.run_forever, name="loraserve-engine", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stops admitting; the thread exits once queued requests are done (or on timeout)."""
        self.scheduler.stop()
        if self._thread is not None:
            self._thread.join(timeout)
        self.device_pool.close()
        self.host_cache.close()

    def encode(self, prompt: str, messages: Seq[tuple[str, str]]) -> list[int]:
        """Token ids of a plain prompt or of chat messages rendered with the chat template."""
        tokenizer = self.loaded.tokenizer
        if bool(prompt) == bool(messages):
            raise EngineError(ErrorKind.INVALID_ARGUMENT, "set exactly one of prompt and messages")
        # Refused by length before tokenizing: tokenizing megabytes takes seconds. Every chat
        # message adds at least one token, so a count over the limit cannot fit either.
        if len(messages) > self.max_prompt_tokens:
            raise EngineError(
                ErrorKind.INVALID_ARGUMENT,
                f"messages: {len(messages)} messages exceeds the limit of "
                f"{self.max_prompt_tokens} tokens",
            )
        size = len(prompt.encode()) + sum(len(c.encode()) + len(r.encode()) for r, c in messages)
        if size > self.max_prompt_bytes:
            raise EngineError(
                ErrorKind.INVALID_ARGUMENT,
                f"prompt: {size} bytes exceeds the limit of {self.max_prompt_bytes} bytes (no "
                f"text this long fits in {self.max_prompt_tokens} tokens)",
            )
        if messages:
            if not self.has_chat_template:
                raise EngineError(
                    ErrorKind.INVALID_ARGUMENT,
                    "messages: the base model's tokenizer has no chat template; send a prompt",
                )
            for role, _ in messages:
                if role not in ("system", "user", "assistant"):
                    raise EngineError(
                        ErrorKind.INVALID_ARGUMENT,
                        f"messages: role {role!r} is not one of system, user, assistant",
                    )
            rendered = tokenizer.apply_chat_template(
                [{"role": r, "content": c} for r, c in messages],
                tokenize=False,
                add_generation_prompt=True,
            )
            ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(prompt)["input_ids"]
        if not ids:
            raise EngineError(ErrorKind.INVALID_ARGUMENT, "prompt: encodes to no tokens")
        if len(ids) > self.max_prompt_tokens:
            raise EngineError(
                ErrorKind.INVALID_ARGUMENT,
                f"prompt: {len(ids)} tokens exceeds the limit of {self.max_prompt_tokens}",
            )
        return list(ids)

    def sampling(self, given: SamplingOverrides) -> SamplingParams:
        """Applies defaults and checks bounds; raises EngineError INVALID_ARGUMENT."""
        cfg = self.config

        def bad(message: str) -> EngineError:
            return EngineError(ErrorKind.INVALID_ARGUMENT, message)

        max_new = (
            cfg.default_max_new_tokens if given.max_new_tokens is None else given.max_new_tokens
        )
        if not 1 <= max_new <= cfg.max_new_tokens_limit:
            raise bad(f"max_new_tokens: {max_new} is not in 1..{cfg.max_new_tokens_limit}")
        temperature = 0.0 if given.temperature is None else given.temperature
        # Comparisons with NaN are False, so each check below also refuses NaN.
        if not (temperature == 0.0 or MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE):
            raise bad(
                f"temperature: {temperature:g} must be 0 (greedy) or in "
                f"[{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]"
            )
        top_p = 1.0 if given.top_p is None else given.top_p
        if not 0.0 < top_p <= 1.0:
            raise bad(f"top_p: {top_p:g} is not in (0, 1]")
        top_k = 0 if given.top_k is None else given.top_k
        if top_k < 0:
            raise bad(f"top_k: {top_k} is negative")
        if given.seed is not None and not 0 <= given.seed <= MAX_SEED:
            raise bad(f"seed: {given.seed} is not in 0..{MAX_SEED} (2^63 - 1)")
        if len(given.stop) > cfg.max_stop_sequences:
            raise bad(
                f"stop: {len(given.stop)} sequences exceeds the limit of {cfg.max_stop_sequences}"
            )
        for stop in given.stop:
            if not stop or len(stop.encode()) > 256:
                raise bad("stop: each stop sequence must be 1 to 256 bytes")
        return SamplingParams(
            max_new_tokens=max_new,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=given.seed,
            stop=tuple(given.stop),
            ignore_eos=bool(given.ignore_eos),
        )

    def submit(
        self,
        *,
        tenant: str,
        adapter: AdapterRef | None,
        prompt_ids: list[int],
        sampling: SamplingParams,
        sink: EventSink,
    ) -> RequestHandle:
        """Queues one request; events reach `sink` on the engine thread."""
        request = GenerationRequest(
            request_id=uuid.uuid4().hex[:16],
            tenant=tenant,
            adapter=adapter,
            prompt_ids=prompt_ids,
            sampling=sampling,
        )
        return self.scheduler.submit(request, sink)

    def forget_adapter(
        self,
        tenant: str,
        name: str,
        below_version: int | None = None,
        *,
        version: int | None = None,
    ) -> None:
        """Frees device memory of a deleted (or pruned) adapter once no request uses it: every
        version, those below `below_version`, or only `version`."""
        self.device_pool.forget(tenant, name, below_version, version=version)
        self.host_cache.forget(tenant, name, below_version, version=version)
        self.scheduler.request_collect()
