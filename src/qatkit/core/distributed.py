"""Multi-process training through accelerate (DDP, FSDP2): who trains, who writes.

`accelerate launch -m qatkit run RECIPE` (or `qatkit run RECIPE --num-processes N`) starts N copies of
qatkit. Every process trains the finetune stage (and the no-QAT control run); only the main process
writes run-dir files. After training the other processes leave and the main one goes on alone
(convert and eval run once, in a plain single-process state).
"""

from __future__ import annotations

import os
import socket
import sys

from qatkit.core.errors import EnvError, RecipeError

_LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_PORT")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init() -> None:
    """Join the process group the launcher prepared (gloo on CPU, nccl on CUDA); no-op in one process."""
    if world_size() > 1:
        import torch
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())


def barrier() -> None:
    if world_size() > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def leave() -> bool:
    """End the multi-process part: True for a process that must stop now, False for the one that goes on.

    The main process then looks like an ordinary single process to torch, accelerate and lm-eval.
    """
    if world_size() == 1:
        return False
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, GradientState

    barrier()
    main = is_main()
    dist.destroy_process_group()
    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate's own test helpers reset state this way
    GradientState._reset_state()
    for var in _LAUNCH_VARS:
        os.environ.pop(var, None)
    return not main


def launch(argv: list[str], num_processes: int) -> int:
    """Run `qatkit <argv>` under `accelerate launch` with N processes (the --num-processes shortcut).

    Returns the exit code of the lowest failing rank (so 2/3/4 keep their meaning), else 0.
    """
    if world_size() > 1:
        raise RecipeError("--num-processes: already running under a multi-process launcher; drop the option")
    import torch
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    gpus = torch.cuda.device_count()
    if gpus and num_processes > gpus:
        raise EnvError(f"--num-processes {num_processes}: only {gpus} CUDA device(s) visible")
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // num_processes))
    if not gpus and sys.platform == "linux":  # one machine: gloo over loopback, whatever the hostname resolves to
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    args = launch_command_parser().parse_args(
        [
            "--multi_gpu",  # accelerate's torchrun launcher; on a CPU-only machine it runs DDP over gloo
            *("--num_processes", str(num_processes), "--num_machines", "1", "--main_process_port", str(_free_port())),
            *("--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", threads),
            *("-m", "qatkit", *argv),
        ]
    )
    try:
        launch_command(args)
    except ChildFailedError as e:
        _, failure = min(e.failures.items())
        return failure.exitcode or 1
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def strip_num_processes(argv: list[str]) -> list[str]:
    """The command line minus `--num-processes N` / `--num-processes=N`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--num-processes":
            skip = True
        elif not arg.startswith("--num-processes="):
            out.append(arg)
    return out
