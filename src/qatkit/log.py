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
    from qatkit.progress import quiet_known_warnings

    quiet_known_warnings(debug)  # torch's register_constant warnings at torchao's import; kept under --debug
