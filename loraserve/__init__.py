"""loraserve: the public API stubs (loraserve.v1) and the `loraserve` command line."""

__version__ = "0.1.0"
