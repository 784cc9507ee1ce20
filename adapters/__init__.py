"""Adapters: validating PEFT LoRA files against the base model, and the durable per-tenant store.

Knows nothing of torch devices or gRPC.
"""
