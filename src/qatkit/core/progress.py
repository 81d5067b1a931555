"""What a run shows while it works: a training progress bar, one line per eval variant, and no known-harmless
library noise.

- `training(trainer, qat)`: the Trainer's own output (PrinterCallback / ProgressCallback: a raw dict per logging
  step) is replaced by one rich bar (step/max_steps, latest loss, elapsed, time left) labelled QAT or control, and
  a one-line summary when training ends. Where stdout is not a terminal (CI, pipes, log files) there is no live
  bar: a short line about every 10% of the run (at most every 30 s) and the summary line.
- `each_variant(variants, timings)`: which eval variant is scored (i/N, elapsed), then one line with its time.
- `quiet_library_bars()` / `quiet_requests(lm)`: the tqdm bars of transformers, datasets and lm-eval off while
  qatkit shows its own progress (download bars stay; all of them stay with --verbose / --debug).

Only the main process of a multi-process run shows progress. Heavy libraries are imported inside functions.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator

from rich.console import Console

from qatkit.core import distributed
from qatkit.core.log import console as _console

log = logging.getLogger(__name__)

REPORT_EVERY = 0.10  # without a terminal: a progress line per 10% of the steps ...
REPORT_MIN_SECONDS = 30.0  # ... at most one every 30 s
_state = {"scoring_variant": False}  # inside each_variant (its own progress line): lm-eval's request bars are off


def verbose() -> bool:
    """--verbose or --debug: qatkit's logger shows INFO (log.setup)."""
    return logging.getLogger("qatkit").isEnabledFor(logging.INFO)


def duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _loss(value) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "–"


# -- training --------------------------------------------------------------------------------------------------


def train_label(qat: bool) -> str:
    return "QAT training" if qat else "control training (no QAT)"


class _TrainProgress:
    """The TrainerCallback's behaviour (see `train_callback`), kept free of transformers so it imports lightly."""

    def __init__(self, label: str, console: Console | None = None):
        self.label = label
        self.console = console or _console
        self.live = self.console.is_interactive  # a terminal (not TERM=dumb): live bar; else plain lines
        self.progress = None
        self.task = None
        self.t0 = None
        self.start_step = 0
        self.step = 0
        self.max_steps = 0
        self.first_loss = None
        self.last_loss = None
        self.last_report = (0, 0.0)  # (step, time) of the last plain progress line
        self.done = False

    # TrainerCallback events
    def on_train_begin(self, args, state, control, **kwargs):
        self.t0 = time.time()
        self.start_step = self.step = state.global_step
        self.max_steps = state.max_steps
        self.last_report = (self.step, self.t0)
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("[bold]{task.description}[/]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("steps · loss {task.fields[loss]} ·"),
                TimeElapsedColumn(),
                TextColumn("elapsed ·"),
                TimeRemainingColumn(),
                TextColumn("left"),
                console=self.console,
                transient=True,  # replaced by the summary line
                refresh_per_second=2,
                speed_estimate_period=600,  # time left from the last 10 minutes of steps, not the last few
            )
            self.progress.start()
            self.task = self.progress.add_task(self.label, total=self.max_steps, completed=self.step, loss="–")
        else:
            resumed = f" from step {self.step}" if self.step else ""
            self.console.print(
                f"{self.label}: {self.max_steps} steps{resumed}", markup=False, highlight=False, soft_wrap=True
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            if self.first_loss is None:
                self.first_loss = logs["loss"]
            self.last_loss = logs["loss"]
            if self.progress is not None:
                self.progress.update(self.task, loss=_loss(self.last_loss))
        if verbose():  # the Trainer's dict, as a log line instead of a print
            shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items())
            log.info("%s step %d/%d: %s", self.label, state.global_step, state.max_steps, shown)

    def on_step_end(self, args, state, control, **kwargs):
        self.step = state.global_step
        if self.progress is not None:
            self.progress.update(self.task, completed=self.step)
            return
        now = time.time()
        last_step, last_time = self.last_report
        due = (self.step - last_step) >= REPORT_EVERY * self.max_steps and now - last_time >= REPORT_MIN_SECONDS
        if due and self.step < self.max_steps:  # the last step gets the summary line instead
            self.last_report = (self.step, now)
            self.console.print(
                f"{self.label}: step {self.step}/{self.max_steps}, loss {_loss(self.last_loss)}, "
                f"{duration(now - self.t0)} elapsed, ~{duration(self._time_left(now))} left",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )

    def on_train_end(self, args, state, control, **kwargs):
        self.step = state.global_step
        self.close()

    def _time_left(self, now: float) -> float:
        done = self.step - self.start_step
        return (now - self.t0) / done * (self.max_steps - self.step) if done > 0 else 0.0

    def close(self) -> None:
        """Stop the bar and print the summary line (once; also when training raised: where it stopped)."""
        if self.done or self.t0 is None:
            return
        self.done = True
        if self.progress is not None:
            self.progress.stop()
        if self.step >= self.max_steps:
            head = f"✓ {self.label}: {self.step}/{self.max_steps} steps"
        else:
            head = f"■ {self.label} stopped at step {self.step}/{self.max_steps}"
        loss = f"loss {_loss(self.first_loss)} → {_loss(self.last_loss)}" if self.first_loss is not None else "no loss"
        self.console.print(
            f"{head}, {loss}, {duration(time.time() - self.t0)}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


@functools.cache
def _callback_class():
    from transformers import TrainerCallback

    return type("TrainProgress", (_TrainProgress, TrainerCallback), {})


def train_callback(label: str, console: Console | None = None):
    """A transformers TrainerCallback that shows training as one progress bar (or plain lines) on `console`."""
    return _callback_class()(label, console)


def remove_default_printing(trainer) -> None:
    """Take out the Trainer's PrinterCallback / ProgressCallback (a raw dict printed per logging step)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cb in list(trainer.callback_handler.callbacks):
        if isinstance(cb, PrinterCallback | ProgressCallback) or type(cb).__name__ == "NotebookProgressCallback":
            trainer.remove_callback(cb)


@contextlib.contextmanager
def training(trainer, qat: bool) -> Iterator[None]:
    """Around `trainer.train()`: qatkit's bar instead of the Trainer's printing, on the main process only; the bar
    stops (with a line saying where) also when training raises."""
    remove_default_printing(trainer)
    if not distributed.is_main():
        yield
        return
    bar = train_callback(train_label(qat))
    trainer.add_callback(bar)
    try:
        yield
    finally:
        bar.close()
        trainer.remove_callback(bar)


# -- evaluation ------------------------------------------------------------------------------------------------


def each_variant(
    variants: Iterable, timings: dict, label: Callable[[str], str] = str, console: Console | None = None
) -> Iterator:
    """Yield each eval variant while showing that it is scored (i/N, `label(name)`, elapsed; a live line in a
    terminal); once the loop body is done, print one line with what `timings[variant.name]` says (seconds, cached,
    resumed)."""
    console = console or _console
    items = list(variants)
    show = distributed.is_main()
    for i, variant in enumerate(items, 1):
        described = label(variant.name)
        head = f"eval {i}/{len(items)} {variant.name}" + (f" — {described}" if described != variant.name else "")
        t0 = time.time()
        with (
            _spinner(head, console) if show else contextlib.nullcontext(),
            quiet_library_bars(lm_eval=True),
        ):
            yield variant
        if show:
            took = timings.get(variant.name)
            if took == "resumed":
                took = "scored before the interruption"
            elif not isinstance(took, str):  # seconds of scoring (a wait for another run's lock not counted)
                took = duration(took if isinstance(took, int | float) else time.time() - t0)
            console.print(f"✓ {head}: {took}", markup=False, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def _spinner(text: str, console: Console) -> Iterator[None]:
    if not console.is_interactive:
        yield
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(), TextColumn(text), TimeElapsedColumn(), console=console, transient=True, refresh_per_second=4
    ) as bar:
        bar.add_task(text, total=None)
        yield


def quiet_requests(lm) -> None:
    """lm-eval's per-request bars ("Tokenizing inputs", "Running loglikelihood requests"): off while each_variant
    shows its line (not with --verbose), through the `disable_tqdm` argument of lm-eval's model API. Elsewhere
    (`qatkit eval MODEL`) they are the only progress shown, and stay."""
    import inspect

    if not _state["scoring_variant"]:
        return
    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        method = getattr(lm, name, None)
        if method is not None and "disable_tqdm" in inspect.signature(method).parameters:
            setattr(lm, name, functools.partial(method, disable_tqdm=True))


def _no_bar(*args, **kwargs):
    from tqdm import tqdm

    return tqdm(*args, **{**kwargs, "disable": True})


@contextlib.contextmanager
def quiet_library_bars(lm_eval: bool = False) -> Iterator[None]:
    """Library progress bars off for the duration, then back as they were: transformers' ("Loading weights"),
    datasets' ("Tokenizing train dataset", "Generating test split") and, with `lm_eval`, lm-eval's: its
    per-request bars (see quiet_requests) and the per-document bar of Task.build_all_requests (one bar per task: 57
    for MMLU). lm-eval has no setting for that one, so its module's `tqdm` is swapped for a disabled one and put
    back after. Download bars (huggingface_hub) stay; errors and log records are untouched. With --verbose /
    --debug it changes nothing."""
    if verbose():
        yield
        return
    restore = []
    with contextlib.suppress(ImportError):
        from huggingface_hub import utils as hub
        from transformers.utils import logging as hf_logging

        if hf_logging.is_progress_bar_enabled():
            hub_on = not hub.are_progress_bars_disabled()
            hf_logging.disable_progress_bar()  # which switches huggingface_hub's off too: back on for downloads
            if hub_on:
                hub.enable_progress_bars()

            def undo() -> None:
                hf_logging.enable_progress_bar()
                if not hub_on:
                    hub.disable_progress_bars()

            restore.append(undo)
    with contextlib.suppress(ImportError):
        from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        if not are_progress_bars_disabled():
            disable_progress_bars()
            restore.append(enable_progress_bars)
    if lm_eval:
        restore.append(functools.partial(_state.update, scoring_variant=_state["scoring_variant"]))
        _state["scoring_variant"] = True
        with contextlib.suppress(ImportError):
            import lm_eval.api.task as task_module

            original = task_module.tqdm
            task_module.tqdm = _no_bar
            restore.append(lambda: setattr(task_module, "tqdm", original))
    try:
        yield
    finally:
        for undo in reversed(restore):
            undo()
