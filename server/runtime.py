"""The composition root: `build_runtime(config)` wires model, store, adapter service and engine.

Every process that serves (the gRPC server in server/app.py, the benchmark's engine runner, the
tests' engine harness, the demo through the server) builds its serving objects here and nowhere
else, so they all run the same wiring. `Runtime` holds them for the gRPC handlers, which are
registered before the model has loaded and answer UNAVAILABLE until it has.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraserve.adapters.shared_store import SharedAdapterStore
from loraserve.adapters.store import AdapterStore
from loraserve.server.adapter_service import AdapterService
from loraserve.server.config import ConfigError, ServerConfig
from loraserve.server.engine.accounting import EngineObserver
from loraserve.server.engine.compute_threads import in_passing_thread
from loraserve.server.engine.device_pool import AdapterLoader
from loraserve.server.engine.engine import Engine
from loraserve.server.engine.model import LoadedModel, load_base_model
from loraserve.server.engine.types import EngineError, ErrorKind
from loraserve.server.limits import TenantLimitTable


@dataclass(frozen=True)
class ServingParts:
    """The serving objects of one base model, wired together; the engine thread is not started."""

    config: ServerConfig
    loaded: LoadedModel
    store: AdapterStore
    adapter_service: AdapterService
    engine: Engine


def build_runtime(
    config: ServerConfig,
    observer: EngineObserver | None = None,
    adapter_loader: AdapterLoader | None = None,
    limits: TenantLimitTable | None = None,
) -> ServingParts:
    """Loads the base model, opens the store, builds the adapter service and the engine.

    Blocking (reads the checkpoint, runs the warm-up forward), on a passing thread so the
    OpenMP pool those open does not outlive them (server.engine.compute_threads); call
    `parts.engine.start()` to start serving. `observer`
    receives the engine's accounting events (the server passes its Metrics). `adapter_loader`
    replaces the engine's read of a stored adapter (default: `AdapterService.load`; tests pass
    a gated or failing reader). `limits`: the per-tenant limits the scheduler and the adapter
    service enforce (the server passes the table its tenants file fills; default: the config's
    `--tenant-max-*` for every tenant).
    """
    if config.model_path is None:
        raise ConfigError(
            "model_path: no base model given (pass --model PATH, or --model embedded for the "
            "random-weight test model)"
        )
    return in_passing_thread(
        lambda: _build(config, observer, adapter_loader, limits), name="loraserve-load"
    )


def _build(
    config: ServerConfig,
    observer: EngineObserver | None,
    adapter_loader: AdapterLoader | None,
    limits: TenantLimitTable | None,
) -> ServingParts:
    assert config.model_path is not None
    loaded = load_base_model(Path(config.model_path), device=config.device, dtype=config.dtype)
    # One store shared by several replicas (serve-ray) keeps no per-process "latest" cache.
    store_class = SharedAdapterStore if config.shared_store else AdapterStore
    store = store_class(Path(config.data_dir) / "adapters", config.adapter_versions_kept)
    limits = limits or TenantLimitTable(config.limit_defaults())
    adapter_service = AdapterService(config, store, loaded.spec, limits)
    engine = Engine(
        config.engine_config(),
        loaded,
        adapter_service.resolve,
        adapter_loader or adapter_service.load,
        observer,
        limits,
    )
    # Deleting or replacing an adapter frees its memory in the engine's tiers.
    adapter_service.attach_engine(engine.forget_adapter)
    # Deleting a name drops its usage totals; a pin of a plain name follows its new versions.
    adapter_service.attach_usage_and_pins(engine.adapter_deleted, engine.pin_new_version)
    return ServingParts(config, loaded, store, adapter_service, engine)


class Runtime:
    """Holds the engine and adapter service; handlers registered before loading ask it for them."""

    def __init__(self, config: ServerConfig | None = None) -> None:
        self.config = config if config is not None else ServerConfig()
        self.engine: Engine | None = None
        self.adapter_service: AdapterService | None = None

    def ready(self, engine: Engine, adapter_service: AdapterService) -> None:
        self.engine = engine
        self.adapter_service = adapter_service

    def require(self) -> tuple[Engine, AdapterService]:
        """The engine and adapter service, or EngineError UNAVAILABLE while the model loads."""
        if self.engine is None or self.adapter_service is None:
            raise EngineError(
                ErrorKind.UNAVAILABLE, "the base model is still loading; retry shortly"
            )
        return self.engine, self.adapter_service
