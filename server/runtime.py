"""The serving objects that exist only once the model has loaded, behind one ready check."""

from __future__ import annotations

from loraserve.server.adapter_service import AdapterService
from loraserve.server.engine.engine import Engine
from loraserve.server.engine.types import EngineError, ErrorKind


class Runtime:
    """Holds the engine and adapter service; handlers registered before loading ask it for them."""

    def __init__(self) -> None:
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
