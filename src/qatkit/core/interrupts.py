"""Ctrl-C (or SIGTERM) during a fine-tune: finish the current step, save a checkpoint there, stop.

A KeyboardInterrupt raised wherever the main thread happens to be is unreliable in a training loop: raised inside
a finalizer that the garbage collector runs, Python prints it as "Exception ignored" and training runs to the end;
raised before the optimizer exists, there is nothing to checkpoint. Inside `deferred()` the first Ctrl-C only
records the request, and training acts on it at the next step boundary (`StopAtStepEnd`); a second Ctrl-C raises
KeyboardInterrupt at once. The long phases before training (sampling the teacher's text, AWQ's and GPTQ's
searches) stop between their pieces (`stop_if_requested`). SIGTERM (`kill`, a scheduler preempting the job, torchrun
passing it on to its workers) is handled the same way, so a run in the background, where SIGINT starts ignored, can
still be stopped gracefully.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

from qatkit.core import distributed
from qatkit.core.errors import Interrupted

log = logging.getLogger(__name__)

_requested = threading.Event()


def requested() -> bool:
    return _requested.is_set()


_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


@contextlib.contextmanager
def deferred():
    """Record Ctrl-C / SIGTERM instead of acting on it; raise KeyboardInterrupt on the way out if training did not
    act on it."""
    # only the main thread can set a handler; an ignored signal (SIGINT in a background job of a script) stays ignored
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handled = [s for s in _NAMES if signal.getsignal(s) is not signal.SIG_IGN]

    def on_signal(signum, frame):
        if _requested.is_set():
            raise KeyboardInterrupt
        _requested.set()
        name = _NAMES[signum]
        log.warning("%s: stopping after this training step with a checkpoint (%s again to stop at once)", name, name)

    _requested.clear()
    previous = {s: signal.signal(s, on_signal) for s in handled}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        pending = _requested.is_set()
        _requested.clear()
    if pending:  # requested after the last step: the stage finished; stop before the next one
        raise KeyboardInterrupt


def stop_if_requested(where: str) -> None:
    """Between the pieces of a long phase before training (the teacher's samples, AWQ's or GPTQ's search): end it
    there (Interrupted, exit 130) once a stop was requested, instead of running the whole phase first."""
    if requested():
        raise Interrupted(f"interrupted {where}")


def stop_at_step_end_callback():
    """A TrainerCallback that ends training with a checkpoint at the step where a stop was requested (every process
    of a multi-process run at the same step: the request is all-reduced)."""
    from transformers import TrainerCallback

    class StopAtStepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stop = requested()
            if distributed.world_size() > 1:
                import torch
                import torch.distributed as dist

                flag = torch.tensor([float(stop)], device=args.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop = bool(flag.item())
            if stop:
                control.should_training_stop = True
                control.should_save = True
            return control

    return StopAtStepEnd()
