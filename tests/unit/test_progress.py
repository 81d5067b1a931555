"""What a run shows while it works (qatkit.core.progress): the training bar, the eval variant lines, quiet library bars
and the known-harmless start-up warnings."""

import io
import logging
import re
import types

import pytest
from rich.console import Console

from qatkit.core import log, progress
from qatkit.evaluation import variants as variant_info

from ..conftest import TINY_RECIPE, run_cli


def _console(terminal: bool) -> Console:
    return Console(
        file=io.StringIO(), force_terminal=terminal, force_interactive=terminal, width=120, color_system=None
    )


@pytest.fixture
def quiet_qatkit_logger():
    """As without --verbose (log.setup leaves qatkit's logger at WARNING), whatever an earlier test set."""
    logger = logging.getLogger("qatkit")
    before = logger.level
    logger.setLevel(logging.WARNING)
    yield
    logger.setLevel(before)


def _drive(callback, losses, max_steps=None, raise_at=None):
    """Feed the callback the events a Trainer sends: begin, then per step a log (loss) and a step end, then end."""
    from transformers import TrainerControl, TrainerState

    state = TrainerState(max_steps=max_steps or len(losses), global_step=0)
    control = TrainerControl()
    callback.on_train_begin(None, state, control)
    for step, loss in enumerate(losses, 1):
        if step == raise_at:
            return state
        state.global_step = step
        callback.on_log(None, state, control, logs={"loss": loss, "grad_norm": 1.0, "learning_rate": 1e-3})
        callback.on_step_end(None, state, control)
    callback.on_log(None, state, control, logs={"train_runtime": 1.0, "train_loss": sum(losses) / len(losses)})
    callback.on_train_end(None, state, control)
    return state


def test_training_callback_without_a_terminal_prints_a_start_and_a_summary_line(quiet_qatkit_logger):
    console = _console(terminal=False)
    callback = progress.train_callback(progress.train_label(qat=True), console)
    _drive(callback, [5.9306, 5.5, 5.1, 4.9419])
    lines = console.file.getvalue().splitlines()
    assert lines[0] == "QAT training: 4 steps"
    assert re.fullmatch(r"✓ QAT training: 4/4 steps, loss 5\.9306 → 4\.9419, \d+\.\d s", lines[-1]), lines
    assert len(lines) == 2, lines  # a short run: no progress lines in between
    assert "{'loss'" not in console.file.getvalue()


def test_training_callback_without_a_terminal_reports_about_every_tenth_of_a_long_run(quiet_qatkit_logger, monkeypatch):
    monkeypatch.setattr(progress, "REPORT_MIN_SECONDS", 0.0)
    console = _console(terminal=False)
    _drive(progress.train_callback(progress.train_label(qat=False), console), [3.0] * 100)
    lines = console.file.getvalue().splitlines()
    middle = [line for line in lines if ": step " in line]
    assert len(middle) == 9, lines  # steps 10, 20, ... 90: the last step gets the summary line instead
    assert middle[0].startswith("control training (no QAT): step 10/100, loss 3.0000,")
    assert middle[-1].startswith("control training (no QAT): step 90/100,")
    assert lines[-1].startswith("✓ control training (no QAT): 100/100 steps")


def test_training_callback_in_a_terminal_shows_a_live_bar_with_step_loss_and_time(quiet_qatkit_logger):
    console = _console(terminal=True)
    _drive(progress.train_callback("QAT training", console), [5.9306, 5.5, 5.1, 4.9419])
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", console.file.getvalue())
    bar = re.findall(r"QAT training ━+ 4/4 steps · loss 4\.9419 · \d:\d\d:\d\d elapsed · \d:\d\d:\d\d left", shown)
    assert bar, shown  # the last frame before the bar made way for the summary
    assert re.search(r"✓ QAT training: 4/4 steps, loss 5\.9306 → 4\.9419", shown), shown
    assert "{'loss'" not in shown


def test_verbose_logs_each_logging_step(caplog):
    logging.getLogger("qatkit").setLevel(logging.INFO)  # --verbose
    try:
        with caplog.at_level(logging.INFO, logger="qatkit.core.progress"):
            _drive(progress.train_callback("QAT training", _console(terminal=False)), [5.0, 4.0])
    finally:
        logging.getLogger("qatkit").setLevel(logging.WARNING)
    steps = [r.getMessage() for r in caplog.records if "step" in r.getMessage()]
    assert steps[0] == "QAT training step 1/2: loss=5 grad_norm=1 learning_rate=0.001", steps


def _tiny_trainer(tmp_path):
    import torch
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, disable_tqdm=True)
    return Trainer(model=torch.nn.Linear(2, 2), args=args)


def test_training_replaces_the_trainer_printing_and_says_where_it_stopped(quiet_qatkit_logger, monkeypatch, tmp_path):
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    console = _console(terminal=False)
    monkeypatch.setattr(progress, "_console", console)
    trainer = _tiny_trainer(tmp_path)
    assert any(isinstance(cb, PrinterCallback) for cb in trainer.callback_handler.callbacks)
    with pytest.raises(RuntimeError, match="boom"), progress.training(trainer, qat=True):
        callbacks = trainer.callback_handler.callbacks
        assert not any(isinstance(cb, PrinterCallback | ProgressCallback) for cb in callbacks)
        (bar,) = [cb for cb in callbacks if type(cb).__name__ == "TrainProgress"]
        _drive(bar, [5.0, 4.5, 4.0, 3.9], max_steps=10, raise_at=4)
        raise RuntimeError("boom")
    assert (
        console.file.getvalue().splitlines()[-1].startswith("■ QAT training stopped at step 3/10, loss 5.0000 → 4.0000")
    )
    assert not any(type(cb).__name__ == "TrainProgress" for cb in trainer.callback_handler.callbacks)


def test_quiet_library_bars_switches_them_off_and_back(quiet_qatkit_logger):
    import lm_eval.api.task
    from datasets.utils import are_progress_bars_disabled
    from huggingface_hub.utils import are_progress_bars_disabled as hub_disabled
    from transformers.utils import logging as hf_logging

    before = (hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled(), hub_disabled())
    original = lm_eval.api.task.tqdm
    with progress.quiet_library_bars(lm_eval=True):
        assert not hf_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
        assert hub_disabled() == before[2]  # download bars are left as they were
        assert lm_eval.api.task.tqdm([1, 2]).disable
    assert (hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled(), hub_disabled()) == before
    assert lm_eval.api.task.tqdm is original


def test_quiet_requests_uses_lm_evals_disable_tqdm_argument(quiet_qatkit_logger):
    import inspect

    from lm_eval.models.huggingface import HFLM

    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        assert "disable_tqdm" in inspect.signature(getattr(HFLM, name)).parameters, name

    class FakeLM:
        def loglikelihood(self, requests, disable_tqdm=False):
            return disable_tqdm

    alone = FakeLM()  # `qatkit eval MODEL`: lm-eval's bars are the only progress shown
    progress.quiet_requests(alone)
    assert alone.loglikelihood([]) is False
    with progress.quiet_library_bars(lm_eval=True):  # each_variant: its own line instead
        lm = FakeLM()
        progress.quiet_requests(lm)
    assert lm.loglikelihood([]) is True


def test_each_variant_says_which_is_scored_and_how_long_it_took(quiet_qatkit_logger):
    from transformers.utils import logging as hf_logging

    console = _console(terminal=False)
    variants = [types.SimpleNamespace(name=n) for n in ("qat", "ptq", "bf16")]
    timings = {}
    seen = []
    for variant in progress.each_variant(variants, timings, variant_info.label, console):
        seen.append(hf_logging.is_progress_bar_enabled())
        timings[variant.name] = {"qat": 12.34, "ptq": "cached", "bf16": "resumed"}[variant.name]
    assert console.file.getvalue().splitlines() == [
        "✓ eval 1/3 qat — fine-tuned with QAT, converted: 12 s",
        "✓ eval 2/3 ptq — base, PTQ (same scheme, no training): cached",
        "✓ eval 3/3 bf16 — base, original precision: scored before the interruption",
    ]
    assert seen == [False, False, False] and hf_logging.is_progress_bar_enabled()


def test_known_harmless_warning_is_dropped_unless_debug():
    logger = logging.getLogger("torch.utils._pytree")  # torch's "torch" logger does not propagate: a handler here
    seen = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    template = (
        "%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type. Calling "
        "register_constant() on Enum subclasses is deprecated and will be an error in a future release."
    )
    level = logger.level
    logger.setLevel(logging.WARNING)  # log.setup in an earlier test of this process may have raised torch's loggers
    logger.addHandler(handler)
    try:
        log.quiet_known_warnings(debug=False)
        logger.warning(template, "<enum 'KernelPreference'>")
        logger.warning("some other pytree warning")
        assert seen == ["some other pytree warning"]
        log.quiet_known_warnings(debug=True)
        logger.warning(template, "<enum 'KernelPreference'>")
        assert len(seen) == 2 and "KernelPreference" in seen[1]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        log.quiet_known_warnings(debug=False)  # as log.setup leaves it


def test_commands_start_without_the_register_constant_warnings(tiny_model_dir):
    """`validate` imports torchao, whose import makes torch log two register_constant deprecation warnings: shown
    with --debug, not without. `schemes` shows none either."""
    args = ("validate", str(TINY_RECIPE), "--set", f"model.name_or_path={tiny_model_dir}")
    debug = run_cli("--debug", *args)
    assert debug.returncode == 0, debug.stderr[-2000:]
    if "register_constant" not in debug.stderr:
        pytest.skip("this torch / torchao logs no register_constant warning")
    for out in (run_cli(*args), run_cli("schemes")):
        assert out.returncode == 0, out.stderr[-2000:]
        assert "register_constant" not in out.stdout + out.stderr, out.stderr[-2000:]
