"""qatkit: quantization-aware training of LLMs, from recipe to deployable checkpoint."""

__version__ = "0.1.0"
