"""Which machine can train or convert a scheme, and the clear refusal when this one cannot."""

from __future__ import annotations

import importlib.util
from typing import Literal

from qatkit.core.errors import EnvError
from qatkit.quant.registry import Hardware, Scheme

HARDWARE_TEXT = {
    "cpu": "CPU or GPU",
    "cuda": "a CUDA GPU",
    "cuda-sm89": "a CUDA GPU with compute capability >= 8.9 (Ada/Hopper)",
    "cuda-sm100": "a Blackwell GPU (compute capability >= 10.0)",
}


def hardware_ok(req: Hardware) -> bool:
    if req == "cpu":
        return True
    import torch

    if not torch.cuda.is_available():
        return False
    cc = torch.cuda.get_device_capability()
    return {"cuda": (0, 0), "cuda-sm89": (8, 9), "cuda-sm100": (10, 0)}[req] <= cc


INSTALL_HINT = {"mslk": "pip install mslk-cuda, the release made for your torch (1.1.0 for torch 2.11)"}


def missing_packages(scheme: Scheme) -> list[str]:
    """The packages the scheme's convert needs besides torchao that are not installed here."""
    return [p for p in scheme.convert_packages if importlib.util.find_spec(p) is None]


def can_convert_here(scheme: Scheme) -> bool:
    return hardware_ok(scheme.convert_on) and not missing_packages(scheme)


def require_hardware(scheme: Scheme, step: Literal["train", "convert"]) -> None:
    """Refuse a step this machine cannot run: missing hardware, or (convert) a missing kernel package."""
    req = scheme.train_on if step == "train" else scheme.convert_on
    if hardware_ok(req):
        if step == "convert" and (missing := missing_packages(scheme)):
            hints = "; ".join(INSTALL_HINT.get(p, f"pip install {p}") for p in missing)
            raise EnvError(f"{scheme.name} convert needs {', '.join(missing)}, which is not installed: {hints}")
        return
    alt = f"; on CPU use {scheme.cpu_alternatives}" if scheme.cpu_alternatives else ""
    why = f" ({scheme.notes})" if scheme.notes else ""
    raise EnvError(f"{scheme.name} {step} needs {HARDWARE_TEXT[req]}{why}{alt}")
