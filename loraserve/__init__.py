"""loraserve: one frozen base LLM, many tenants' LoRA adapters, one gRPC server.

The repository's top-level folders are this package's subpackages (`server/` is
`loraserve.server`, `client/` is `loraserve.client`, ...); `loraserve.v1` holds the generated
protobuf stubs and `loraserve.cli` the `loraserve` command line.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    # The version lives in pyproject.toml only; an installed copy reads it from its metadata.
    __version__ = version("loraserve")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
