"""Models: resolving and loading checkpoints (dirs, hub ids, GGUF, pkg: files) and assembling them for QAT (fake
quantizers, LoRA adapters, trained weights loaded back)."""
