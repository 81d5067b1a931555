"""Quantization: the scheme registry, QuantSpec (a recipe's `qat` section resolved once), module plans, and
applying them with torchao. The only package that imports torchao.

Modules: registry (Scheme, lookup) · schemes (the built-in entries) · spec (QuantSpec) · hardware · plan (which
modules, untying) · apply (prepare / convert / PTQ / save hook) · scales (learned scales) · patches (fake-quant
wrappers and inspection).
"""

from qatkit.quant import schemes as _builtin  # noqa: F401  registers the built-in schemes
