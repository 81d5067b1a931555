"""Ctrl-C during a fine-tune: finish the current step, save a checkpoint there, stop.

A KeyboardInterrupt raised wherever the main thread happens to be is unreliable in a training loop: raised inside
a finalizer that the garbage collector runs, Python prints it as "Exception ignored" and training runs to the end;
raised before the optimizer exists, there is nothing to checkpoint. Inside `deferred()` the first Ctrl-C only
records the request, and training acts on it at the next step boundary (`StopAtStepEnd`); a second Ctrl-C raises
KeyboardInterrupt at once.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

from qatkit.core import distributed

log = logging.getLogger(__name__)

_requested = threading.Event()


def requested() -> bool:
    return _requested.is_set()


@contextlib.contextmanager
def deferred():
    """Record Ctrl-C instead of raising it; raise it on the way out if training did not act on it."""
    # only the main thread can set a handler; an ignored SIGINT (a background job of a script) stays ignored
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield
        return

    def on_sigint(signum, frame):
        if _requested.is_set():
            raise KeyboardInterrupt
        _requested.set()
        log.warning("Ctrl-C: stopping after this training step with a checkpoint (Ctrl-C again to stop at once)")

    _requested.clear()
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        pending = _requested.is_set()
        _requested.clear()
    if pending:  # requested after the last step: the stage finished; stop before the next one
        raise KeyboardInterrupt


def stop_at_step_end_callback():
    """A TrainerCallback that ends training with a checkpoint at the step where Ctrl-C was requested (every process
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
