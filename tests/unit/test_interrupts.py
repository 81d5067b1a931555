import os
import shlex
import signal

import pytest

from qatkit.core import interrupts


def test_ctrl_c_is_recorded_then_raised_on_the_way_out(ctrl_c_enabled):
    with pytest.raises(KeyboardInterrupt), interrupts.deferred():
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupts.requested()  # recorded, not raised: training acts on it at a step boundary
    assert not interrupts.requested()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_ctrl_c_raises_at_once(ctrl_c_enabled):
    with pytest.raises(KeyboardInterrupt), interrupts.deferred():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        pytest.fail("the second Ctrl-C did not stop")


def test_an_ignored_ctrl_c_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts.deferred():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            assert not interrupts.requested()
    finally:
        signal.signal(signal.SIGINT, previous)


def test_sigterm_is_recorded_then_raised_on_the_way_out():
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), interrupts.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        assert interrupts.requested()  # the process is still alive: training stops at its next step boundary
    assert signal.getsignal(signal.SIGTERM) is previous


def test_sigterm_stops_gracefully_where_ctrl_c_is_ignored():
    """A background job of a script starts with SIGINT ignored: `kill` still stops it at a step boundary."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(KeyboardInterrupt), interrupts.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            assert interrupts.requested()
            os.kill(os.getpid(), signal.SIGTERM)
            pytest.fail("the second SIGTERM did not stop")
    finally:
        signal.signal(signal.SIGINT, previous)


def test_the_resume_command_is_one_the_shell_reads_back():
    from qatkit.core.errors import Interrupted

    stop = Interrupted("interrupted at step 3; checkpoint saved in runs/a b/ckpt")
    command = ["qatkit", "run", "recipe.yaml", "--out", "runs/a b"]
    message = str(stop.with_resume(command, ["train.lr=1e-3", "eval.tasks=[heldout, mmlu]"]))
    assert message.startswith("interrupted at step 3; checkpoint saved in runs/a b/ckpt. Resume with: ")
    resume = shlex.split(message.split("Resume with: ")[1])
    assert resume == [*command, "--resume", "--set", "train.lr=1e-3", "--set", "eval.tasks=[heldout, mmlu]"]


def test_a_phase_before_training_stops_between_its_pieces_only_once_asked():
    from qatkit.core.errors import Interrupted

    with pytest.raises(Interrupted, match="interrupted in the search"), interrupts.deferred():
        interrupts.stop_if_requested("in the search")  # nothing asked yet: goes on
        os.kill(os.getpid(), signal.SIGTERM)
        interrupts.stop_if_requested("in the search")
    assert not interrupts.requested()
