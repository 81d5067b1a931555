"""Training backends: `hf` (transformers + peft + trl + torchao) and `unsloth` (CUDA)."""
