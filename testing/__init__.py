"""Fixtures and tools: the embedded tiny test model (`loraserve.testing.tiny_model`).

Nothing in `loraserve.server`, `loraserve.adapters` or `loraserve.client` imports this package;
entry points (the CLI), the benchmark, the fine-tuning toolkit and the tests may.
"""
