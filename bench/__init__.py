"""loraserve's benchmark harness.

`loraserve bench --quick` (or `python -m loraserve.bench.run --quick`) runs every part side by
side in one process on the same base model and the same requests: loraserve with and without
adapters under Punica's popularity patterns, HF PEFT mixed-batch and naive adapter-swap
baselines, an S-LoRA-style trace, an n-registered-adapters sweep, adapter cold start and a
through-gRPC load generator. See bench/README.md.
"""
