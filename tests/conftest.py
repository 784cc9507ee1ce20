"""Session fixtures shared by the engine and integration tests."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without CUDA, Triton kernels run under Triton's CPU interpreter (tests/engine/test_lora_kernels).
# It is chosen when a kernel is decorated, so it must be set before anything imports Triton. The
# engine itself never uses the kernels on CPU (lora_kernels.available() is CUDA-only).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--sync-decode",
        action="store_true",
        help="run every engine built from a ServerConfig or an EngineConfig with async_decode "
        "off (CI runs the engine suite this way too)",
    )
    parser.addoption(
        "--emulate-prefill-graphs",
        action="store_true",
        help="give every CPU PagedExecutor the prefill graphs a CUDA one captures, replayed "
        "eagerly (serving_support.emulate_prefill_graphs; CI runs the engine suite this way too)",
    )


@pytest.fixture(scope="session", autouse=True)
def _prefill_graphs_everywhere(request: pytest.FixtureRequest):
    """With --emulate-prefill-graphs, every PagedExecutor built on CPU gets the prefill graphs
    a CUDA one captures at start (their bucketing, padding and static buffers), with an eager
    stand-in for the capture, so the whole engine suite prefills through them."""
    if not request.config.getoption("--emulate-prefill-graphs"):
        yield
        return
    from serving_support import emulate_prefill_graphs

    from loraserve.server.engine.executor import PagedExecutor

    original = PagedExecutor.__init__

    def init(self, loaded, settings) -> None:
        original(self, loaded, settings)
        if loaded.device.type == "cpu":
            emulate_prefill_graphs(self)

    PagedExecutor.__init__ = init  # type: ignore[method-assign]
    yield
    PagedExecutor.__init__ = original  # type: ignore[method-assign]


@pytest.fixture(scope="session", autouse=True)
def _sync_decode_everywhere(request: pytest.FixtureRequest):
    """With --sync-decode, ServerConfig's and EngineConfig's async_decode default to False (a
    test that passes async_decode=True explicitly keeps it)."""
    if not request.config.getoption("--sync-decode"):
        yield
        return
    import inspect

    from loraserve.server.config import ServerConfig
    from loraserve.server.engine.config import EngineConfig

    originals = []
    for cls in (ServerConfig, EngineConfig):
        init = cls.__init__
        parameters = list(inspect.signature(init).parameters.values())[1:]  # without self
        defaults = list(init.__defaults__ or ())
        names = [p.name for p in parameters[len(parameters) - len(defaults) :]]
        originals.append((init, tuple(defaults)))
        defaults[names.index("async_decode")] = False
        init.__defaults__ = tuple(defaults)
    yield
    for init, original in originals:
        init.__defaults__ = original


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Collects the tests' cyclic garbage before pytest's summary, which may import (and so
    ast.parse) a plugin's modules: CPython 3.11.7 fails such a parse with "SystemError: AST
    constructor recursion depth mismatch" when a collection pass finalizes garbage in the middle
    of it (here: a finished gRPC handler's exception cycle, after a -k run of an upload test)."""
    gc.collect()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache of built test models for the whole session (also used as LORASERVE_CACHE)."""
    path = tmp_path_factory.mktemp("model-cache")
    os.environ["LORASERVE_CACHE"] = str(path)
    return path
