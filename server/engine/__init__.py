"""The inference engine: model loading, multi-LoRA layers, batching, generation.

Knows nothing of gRPC.
"""
