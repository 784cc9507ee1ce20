"""The engine facade: the one object the gRPC layer talks to.

Owns the loaded model, the adapter tiers and the scheduler thread. Turns prompts into
token ids, checks request bounds, and hands requests to the scheduler.
"""

from __future__ import annotations

import enum
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
    MAX_TOP_LOGPROBS,
    AdapterKey,
    AdapterRef,
    EngineError,
    ErrorKind,
    EventSink,
    GenerationRequest,
    LogprobOptions,
    SamplingParams,
    forgotten_versions,
)
from loraserve.server.engine.usage import AdapterUsageLedger, AdapterUsageTotals
from loraserve.server.limits import LimitsLookup, TenantLimitTable


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


class Residency(enum.Enum):
    """Where an adapter version's weights are right now."""

    DEVICE = "device"
    HOST = "host"
    DISK = "disk"


@dataclass(frozen=True)
class AdapterStatus:
    """What the engine knows of one adapter version, for AdapterInfo."""

    usage: AdapterUsageTotals
    """Of the adapter's name, all versions, since the start."""
    resident: Residency
    pinned: bool


@dataclass(frozen=True)
class _Pin:
    key: AdapterKey
    follow_latest: bool
    """Pinned by plain name: a new upload of the name moves the pin to the new version."""


PIN_TIMEOUT_SECONDS = 120.0
"""Longest a pin waits for the engine thread to load the adapter (it loads between steps)."""


class Engine:
    """Serves generation requests for one loaded base model."""

    def __init__(
        self,
        config: EngineConfig,
        loaded: LoadedModel,
        resolver: AdapterResolver,
        loader: AdapterLoader,
        observer: EngineObserver | None = None,
        limits: LimitsLookup | None = None,
    ) -> None:
        """`limits`: per-tenant request limits (default: the server defaults for everyone)."""
        self.config = config
        self.loaded = loaded
        self.usage = AdapterUsageLedger()
        """Per adapter name since the start; read through AdapterInfo.usage."""
        self._pins: dict[tuple[str, str], _Pin] = {}
        """Operator pins by (tenant, name); the device pool holds their pages."""
        self._pins_lock = threading.Lock()
        # Tiers: disk (the store, via `loader`) -> host memory (LRU) -> device pages.
        self.host_cache = HostCache(loader, config.adapter_host_bytes, observer)
        self.device_pool = DevicePool(
            loaded.lora_layers,
            budget_bytes=config.adapter_device_bytes,
            loader=self.host_cache.get,
            observer=observer,
            cold_read=self.host_cache.get,  # pages laid out beside the checksum on disk reads
        )
        self.scheduler = Scheduler(
            loaded,
            self.device_pool,
            resolver,
            SchedulerSettings(
                max_batch_size=config.max_batch_size,
                max_waiting_requests=config.max_waiting_requests,
                max_batch_tokens=config.max_batch_tokens,
                max_seq_len=self.max_seq_len,
                price_per_device_hour=config.price_per_device_hour,
                kv_cache_bytes=config.kv_cache_bytes,
                kv_cache_fraction=config.kv_cache_fraction,
                enforce_eager=config.enforce_eager,
                prefill_graph_tokens=config.prefill_graph_tokens,
                attention=config.attention,
                lora_overlap=config.lora_overlap,
                async_decode=config.async_decode,
                max_lora_rank=config.max_lora_rank,
                cold_join_hold_seconds=config.cold_join_hold_seconds,
            ),
            observer,
            prefetch=self.host_cache.prefetch,
            usage=self.usage,
            limits=limits or TenantLimitTable(),
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

    def encode(
        self, prompt: str, messages: Seq[tuple[str, str]], *, scoring: bool = False
    ) -> list[int]:
        """Token ids of a plain prompt or of chat messages rendered with the chat template.

        Chat messages get the assistant generation prompt appended, except when `scoring`
        (the request asks for prompt_logprobs) and the last message is the assistant's: then
        they are rendered as they stand, so that turn (with its end-of-turn marker) is part of
        the prompt and gets scored, as `loraserve train` tokenizes it.
        """
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
                add_generation_prompt=not (scoring and messages[-1][0] == "assistant"),
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

    @staticmethod
    def logprob_options(logprobs: bool, top_logprobs: int, prompt_logprobs: bool) -> LogprobOptions:
        """Checks what a request asks to be scored; raises EngineError INVALID_ARGUMENT.

        top_logprobs without logprobs or prompt_logprobs is refused rather than ignored: it
        would silently return nothing.
        """
        if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise EngineError(
                ErrorKind.INVALID_ARGUMENT,
                f"top_logprobs: {top_logprobs} is not in 0..{MAX_TOP_LOGPROBS}",
            )
        if top_logprobs and not (logprobs or prompt_logprobs):
            raise EngineError(
                ErrorKind.INVALID_ARGUMENT,
                "top_logprobs: set logprobs or prompt_logprobs too (top_logprobs alone "
                "returns nothing)",
            )
        return LogprobOptions(
            logprobs=logprobs, top_logprobs=top_logprobs, prompt_logprobs=prompt_logprobs
        )

    def submit(
        self,
        *,
        tenant: str,
        adapter: AdapterRef | None,
        prompt_ids: list[int],
        sampling: SamplingParams,
        sink: EventSink,
        logprobs: LogprobOptions | None = None,
    ) -> RequestHandle:
        """Queues one request; events reach `sink` on the engine thread."""
        request = GenerationRequest(
            request_id=uuid.uuid4().hex[:16],
            tenant=tenant,
            adapter=adapter,
            prompt_ids=prompt_ids,
            sampling=sampling,
            logprobs=logprobs or LogprobOptions(),
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
        """Frees device memory of deleted (or pruned) versions once no request uses them: every
        version, those below `below_version`, or only `version`.

        A pin on a freed version ends. A pin that follows the name is on its latest version,
        which pruning never frees; the service moves it to the new latest (`pin_new_version`)
        before it frees a deleted latest version.
        """
        self.device_pool.forget(tenant, name, below_version, version=version)
        self.host_cache.forget(tenant, name, below_version, version=version)
        freed = forgotten_versions(tenant, name, below_version, version)
        with self._pins_lock:
            pin = self._pins.get((tenant, name))
            if pin is not None and freed(pin.key):
                del self._pins[(tenant, name)]
        self.scheduler.request_collect()

    def adapter_deleted(self, tenant: str, name: str, version: int) -> None:
        """The name was deleted (latest version `version`): its usage totals are dropped."""
        self.usage.forget(tenant, name, version)

    # ---- pins (operator: PinAdapter, --preload) -----------------------------------------------

    def pin(self, key: AdapterKey, *, follow_latest: bool, timeout: float | None = None) -> None:
        """Loads `key` onto the device and keeps it there until `unpin` (blocking; not on the
        engine thread). Raises EngineError RESOURCE_EXHAUSTED when it does not fit beside the
        other pins; a previous pin of the same name is released once this one holds.
        """
        with self._pins_lock:
            previous = self._pins.get((key.tenant, key.name))
        replacing = previous.key if previous is not None else None
        self.device_pool.check_hold(key, replacing=replacing)  # before reading any bytes
        self.host_cache.get(key)  # read and validate here, not on the engine thread
        released = previous if replacing is not None and replacing != key else None
        if released is not None:
            self.device_pool.unhold(released.key)
        try:
            future = self.scheduler.run_on_engine(lambda: self.device_pool.hold(key))
            future.result(PIN_TIMEOUT_SECONDS if timeout is None else timeout)
        except TimeoutError:
            # Should the hold still land, nothing would own it: release it then.
            if replacing != key:
                future.add_done_callback(lambda _: self.device_pool.unhold(key))
            self._drop_pin(released)
            raise EngineError(
                ErrorKind.UNAVAILABLE, f"pinning adapter {key.name!r} timed out; retry"
            ) from None
        except EngineError:
            self._drop_pin(released)  # its hold was released above
            raise
        if key not in self.device_pool.held():
            # Deleted or replaced while it loaded: the pool kept nothing to pin.
            self._drop_pin(released)
            raise EngineError(
                ErrorKind.NOT_FOUND, f"adapter {key.name!r} was deleted or replaced; retry"
            )
        with self._pins_lock:
            self._pins[(key.tenant, key.name)] = _Pin(key, follow_latest)

    def _drop_pin(self, pin: _Pin | None) -> None:
        if pin is None:
            return
        with self._pins_lock:
            if self._pins.get((pin.key.tenant, pin.key.name)) == pin:
                del self._pins[(pin.key.tenant, pin.key.name)]

    def unpin(self, tenant: str, name: str) -> bool:
        """Ends the name's pin; the adapter stays warm but evictable. Whether one was pinned."""
        with self._pins_lock:
            pin = self._pins.pop((tenant, name), None)
        if pin is None:
            return False
        self.device_pool.unhold(pin.key)
        return True

    def pin_new_version(self, key: AdapterKey) -> None:
        """A new version of a name was uploaded: a pin that follows the name moves to it.

        If it does not fit, the pin ends (logged by the caller); the upload itself stands.
        """
        with self._pins_lock:
            pin = self._pins.get((key.tenant, key.name))
        if pin is None or not pin.follow_latest or pin.key == key:
            return
        try:
            self.pin(key, follow_latest=True)
        except EngineError:
            self._drop_pin(pin)
            raise

    def pinned(self, key: AdapterKey) -> bool:
        """Whether this version is pinned now."""
        with self._pins_lock:
            pin = self._pins.get((key.tenant, key.name))
        return pin is not None and pin.key == key

    def pinned_bytes(self) -> dict[str, int]:
        """Device budget bytes held by pins, per tenant (for metrics)."""
        totals: dict[str, int] = {}
        for key, nbytes in self.device_pool.held().items():
            totals[key.tenant] = totals.get(key.tenant, 0) + nbytes
        return totals

    def residency(self, key: AdapterKey) -> Residency:
        """Where this version is now; reads the tiers' own locks briefly, never the engine's."""
        if self.device_pool.is_resident(key):
            return Residency.DEVICE
        if self.host_cache.contains(key):
            return Residency.HOST
        return Residency.DISK

    def adapter_status(self, key: AdapterKey) -> AdapterStatus:
        return AdapterStatus(
            usage=self.usage.get(key.tenant, key.name),
            resident=self.residency(key),
            pinned=self.pinned(key),
        )
