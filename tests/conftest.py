import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "arith_mc.jsonl"
TINY_RECIPE = ROOT / "recipes" / "tiny-8da4w.yaml"

# pytest-xdist workers share the cores: each worker (and the CLI processes it starts, which inherit the setting)
# gets its part instead of a torch thread per core, which would oversubscribe the machine.
if workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(workers))))


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Keep qatkit's cache (GGUF dequantization, eval baselines) out of the user's home during tests."""
    os.environ["QATKIT_CACHE"] = str(tmp_path_factory.mktemp("qatkit-cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def arith_texts() -> list[str]:
    from qatkit.data import MCItem

    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    return [MCItem(r["question"], tuple(r["choices"]), r["answer"]).prompt() for r in rows]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from qatkit.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), arith_texts(), arch="llama")


def run_cli(*args: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qatkit", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def ctrl_c_enabled():
    """SIGINT handled as in a terminal (KeyboardInterrupt), even when the suite runs as a background job of a
    script, which starts with SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def send_sigterm() -> None:
    """What `kill` does to a run: in interrupts.deferred() the stop is recorded and acted on at the next boundary."""
    os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def stopped_early(match: str):
    """Inside interrupts.deferred(), as the finetune stage runs: the body must end with Interrupted (`match`) where
    the stop was requested, not run to its end (then deferred() raises KeyboardInterrupt on the way out)."""
    from qatkit.core import interrupts
    from qatkit.core.errors import Interrupted

    try:
        with pytest.raises(Interrupted, match=match), interrupts.deferred():
            yield
    except KeyboardInterrupt:
        pytest.fail("the stop was acted on only after the whole phase")
