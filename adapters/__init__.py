"""Adapters: validation of PEFT LoRA files against the base model, and the durable per-tenant store."""
