"""Console output (rich) and quieting of noisy third-party loggers."""

from __future__ import annotations

import logging
import os
import warnings

from rich.console import Console

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

NOISY = ("torchao", "transformers", "datasets", "lm_eval", "accelerate", "peft", "trl", "httpx", "urllib3", "torch")


def setup(verbose: bool = False, debug: bool = False) -> None:
    from rich.logging import RichHandler

    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    if int(os.environ.get("RANK", "0")) > 0:  # secondary processes of a multi-process run: errors only
        console.quiet = True
        level = logging.ERROR

    logging.basicConfig(
        level=level, format="%(message)s", handlers=[RichHandler(console=err_console, show_path=debug)], force=True
    )
    logging.getLogger("qatkit").setLevel(logging.DEBUG if debug else max(level, logging.INFO))

    if not debug:
        for name in NOISY:
            logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TORCHDYNAMO_VERBOSE", "0")
    quiet_known_warnings(debug)  # torch's register_constant warnings at torchao's import; kept under --debug


class _KnownHarmless(logging.Filter):
    """torch 2.13 logs a deprecation warning (logger torch.utils._pytree, through torch's own handler: a line
    "W<date> ... torch/utils/_pytree.py:630] <enum ...> is an Enum subclass ...") for each Enum class registered
    with register_constant(). torchao 0.18 registers two as it is imported (torchao.utils.register_as_pytree_constant
    on KernelPreference and, in prototype/mx_formats, ScaleCalculationMode): torchao's to change, nothing a qatkit
    user can act on. Every other record of that logger passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "register_constant() on Enum subclasses is deprecated" not in str(record.msg)


_KNOWN_HARMLESS = {"torch.utils._pytree": _KnownHarmless()}


def quiet_known_warnings(debug: bool = False) -> None:
    """Drop the known-harmless library warnings above (torch need not be imported yet); --debug keeps them."""
    for name, known in _KNOWN_HARMLESS.items():
        if debug:
            logging.getLogger(name).removeFilter(known)
        else:
            logging.getLogger(name).addFilter(known)
