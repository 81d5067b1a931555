"""The machine: CLI start-up time, hardware description, CPU load of other jobs, thread choice."""

import math
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from qatkit.bench.common import (
    median,
)

# --- CLI startup --------------------------------------------------------------------------------


def cli_startup(repeats: int = 10) -> dict:
    """Wall time of `python -m qatkit --help` vs `python -c pass` (interleaved, one warm-up each)."""
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -m qatkit --help": [sys.executable, "-m", "qatkit", "--help"],
    }
    times: dict[str, list[float]] = {k: [] for k in commands}
    for r in range(repeats + 1):
        for name, cmd in commands.items() if r % 2 == 0 else reversed(commands.items()):
            t0 = time.perf_counter()
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            if r > 0:
                times[name].append(time.perf_counter() - t0)
    base, cli = (times[k] for k in commands)
    return {
        "repeats": repeats,
        "python_s": median(base),
        "qatkit_help_s": median(cli),
        "times_s": times,
        "ratio": median([c / b for b, c in zip(base, cli, strict=True)]),
        "overhead_s": median(cli) - median(base),
    }


# --- machine and load -----------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    import torch

    from qatkit.core.env import package_versions

    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    info = {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": mem_gb,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {k: v for k, v in package_versions().items() if v is not None},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return info


@dataclass
class Snapshot:
    wall: float
    busy_s: float | None  # CPU time all processes used (from /proc/stat)
    steal_s: float | None
    own_s: float  # CPU time of this process and its finished children
    loadavg: tuple[float, float, float]


def snapshot() -> Snapshot:
    busy = steal = None
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        hz = os.sysconf("SC_CLK_TCK")
        user, nice, system, _idle, _iowait, irq, softirq, steal_t = (fields + [0] * 8)[:8]
        busy = (user + nice + system + irq + softirq + steal_t) / hz
        steal = steal_t / hz
    except (OSError, ValueError, IndexError):
        pass
    own = sum(
        r.ru_utime + r.ru_stime
        for r in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )
    return Snapshot(time.time(), busy, steal, own, os.getloadavg())


def load_between(a: Snapshot, b: Snapshot) -> dict:
    cores = os.cpu_count() or 1
    wall = b.wall - a.wall
    out: dict = {"seconds": round(wall, 1), "loadavg_end": [round(x, 2) for x in b.loadavg]}
    if a.busy_s is not None and b.busy_s is not None and wall > 0:
        others = max(0.0, (b.busy_s - a.busy_s) - (b.own_s - a.own_s))
        out["cpu_share_others"] = round(others / (wall * cores), 3)  # of all cores' time
        out["cpu_share_bench"] = round((b.own_s - a.own_s) / (wall * cores), 3)
        out["cpu_share_steal"] = round((b.steal_s - a.steal_s) / (wall * cores), 3)
    return out


def auto_threads(sample_s: float = 1.5) -> tuple[int, dict]:
    """torch threads for the timed sections: the cores other processes leave idle (at least 1).

    Measured over `sample_s` from /proc/stat. On a machine shared with other jobs, more intra-op threads
    than idle cores make OpenMP wait at every barrier for a descheduled thread: a step that takes 10 ms
    on one thread took 0.5-1.8 s on two (measured on a 2-core machine with another job using one core).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    a = snapshot()
    time.sleep(sample_s)
    b = snapshot()
    if a.busy_s is None or b.busy_s is None:
        return cores, {"policy": "auto", "cores": cores, "others_busy_cores": None}
    others = max(0.0, (b.busy_s - a.busy_s) - (b.own_s - a.own_s)) / (b.wall - a.wall)
    threads = max(1, min(cores, math.floor(cores - others + 0.1)))
    return threads, {"policy": "auto", "cores": cores, "others_busy_cores": round(others, 2)}
