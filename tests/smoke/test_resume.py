"""Kill a real `qatkit` process mid-stage, then resume: nothing half-written looks finished, and
training continues from its last checkpoint with the same optimizer/scheduler/RNG state."""

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest

from ..conftest import ROOT, TINY_RECIPE, run_cli

STEPS = ["--set", "train.max_steps=16", "--set", "train.save_steps=4", "--set", "train.lr=0.01"]


def _start(out, model_dir, *args, sigint=signal.SIG_DFL):
    return _popen(
        ["run", str(TINY_RECIPE), "--out", str(out), "--set", f"model.name_or_path={model_dir}", *STEPS, *args], sigint
    )


def _popen(args, sigint=signal.SIG_DFL):
    return subprocess.Popen(
        [sys.executable, "-m", "qatkit", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, sigint),  # by default Ctrl-C works even in a background job
    )


def _resume(out, model_dir, *args):
    return run_cli(
        "run",
        str(TINY_RECIPE),
        "--out",
        str(out),
        "--resume",
        "--set",
        f"model.name_or_path={model_dir}",
        *STEPS,
        *args,
    )


def _wait_for(predicate, proc, timeout=600):  # a hang guard, as run_cli's: a loaded machine runs these far slower
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended first ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out")


def _collect(stream, lines: list) -> None:
    for line in stream:
        lines.append(line)


def _stop_once_training(proc, steps: int, stop=signal.SIGINT) -> str:
    """Send `stop` once the QAT run's training has begun; wait for the process to end and return its stderr."""
    stdout, stderr = [], []
    readers = [
        threading.Thread(target=_collect, args=pair, daemon=True)
        for pair in [(proc.stdout, stdout), (proc.stderr, stderr)]
    ]
    for reader in readers:
        reader.start()
    _wait_for(lambda: any(f"QAT training: {steps} steps" in line for line in stdout), proc)
    proc.send_signal(stop)
    proc.wait(timeout=120)
    for reader in readers:
        reader.join(timeout=30)
    return "".join(stderr)


def _losses(out):
    return {p["step"]: p["loss"] for p in json.loads((out / "finetune" / "loss.json").read_text())}


def test_killed_training_resumes_to_the_same_result(tiny_model_dir, tmp_path):
    reference = tmp_path / "reference"
    ref = _start(reference, tiny_model_dir, "--set", "stages=[finetune]")
    assert ref.wait(timeout=600) == 0, ref.stderr.read()[-2000:]

    out = tmp_path / "killed"
    proc = _start(out, tiny_model_dir, "--set", "stages=[finetune]")
    ckpts = out / ".finetune.partial" / "checkpoints"
    _wait_for(lambda: (ckpts / "checkpoint-8" / "trainer_state.json").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "finetune").exists(), "a killed stage must not look finished"

    resumed = _resume(out, tiny_model_dir, "--set", "stages=[finetune]")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (out / "finetune" / "DONE").exists()
    state = json.loads((out / "finetune" / "trainer_state.json").read_text())
    assert state["global_step"] == 16
    summary = json.loads((out / "finetune" / "train_summary.json").read_text())
    # the last checkpoint complete at the kill: 4 when it landed inside the write of 8's trainer state
    assert summary["resumed_from_step"] in (4, 8, 12), summary

    ref_losses, losses = _losses(reference), _losses(out)
    assert sorted(losses) == list(range(1, 17))
    for step, loss in losses.items():  # same data order, optimizer and scheduler state after resume
        assert abs(loss - ref_losses[step]) < 1e-4, (step, loss, ref_losses[step])


def test_a_packed_run_resumes_on_a_fresh_machine(tiny_model_dir, tmp_path, monkeypatch):
    """A run killed mid-QAT, packed (`qatkit pack`), unpacked in another place with an empty qatkit cache (a fresh
    machine) and resumed: the same losses as a run never interrupted, and the control it distils from and started
    from (merged) is the one it kept, not trained again."""
    start = ["--set", "stages=[finetune]", "--set", "distill.teacher=control", "--set", "qat.init_from=control-merged"]
    reference = tmp_path / "reference"
    ref = _start(reference, tiny_model_dir, *start)
    assert ref.wait(timeout=600) == 0, ref.stderr.read()[-2000:]

    out = tmp_path / "killed"
    proc = _start(out, tiny_model_dir, *start)
    ckpts = out / ".finetune.partial" / "checkpoints"
    _wait_for(lambda: (ckpts / "checkpoint-8" / "trainer_state.json").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    packed = run_cli("pack", str(out), str(tmp_path / "state"))
    assert packed.returncode == 0, packed.stderr[-2000:]
    assert "trainer checkpoint: .finetune.partial/checkpoints/checkpoint-" in packed.stdout

    moved = tmp_path / "fresh-machine" / "run"
    unpacked = run_cli("unpack", str(tmp_path / "state"), str(moved))
    assert unpacked.returncode == 0, unpacked.stderr[-2000:]
    monkeypatch.setenv("QATKIT_CACHE", str(tmp_path / "fresh-machine" / "cache"))
    resumed = _resume(moved, tiny_model_dir, *start)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (tmp_path / "fresh-machine" / "cache" / "control").exists()  # not trained again
    assert json.loads((moved / "finetune" / "train_summary.json").read_text())["resumed_from_step"] in (4, 8, 12)
    ref_losses, losses = _losses(reference), _losses(moved)
    assert sorted(losses) == list(range(1, 17))
    for step, loss in losses.items():
        assert abs(loss - ref_losses[step]) < 1e-4, (step, loss, ref_losses[step])


def test_killed_convert_is_redone(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    base = [
        "run",
        str(TINY_RECIPE),
        "--out",
        str(out),
        "--set",
        f"model.name_or_path={tiny_model_dir}",
        "--set",
        "train.max_steps=2",
    ]
    first = run_cli(*base, "--set", "stages=[finetune]")
    assert first.returncode == 0, first.stderr[-2000:]
    both = [*base, "--resume", "--set", "stages=[finetune,convert]"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "qatkit", *both], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _wait_for(lambda: (out / ".convert.partial").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "convert" / "DONE").exists()
    again = run_cli(*both)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / "convert" / "DONE").exists() and not (out / ".convert.partial").exists()
    assert "finetune skipped (done)" in " ".join(again.stdout.split())


@pytest.mark.parametrize(
    "stop, sigint",
    [(signal.SIGINT, signal.SIG_DFL), (signal.SIGTERM, signal.SIG_IGN)],  # `kill` of a job started with `nohup ... &`
    ids=["ctrl-c", "sigterm-in-background"],
)
def test_a_stop_signal_saves_a_checkpoint_and_prints_the_resume_command(tiny_model_dir, tmp_path, stop, sigint):
    out = tmp_path / "run"
    proc = _start(
        out,
        tiny_model_dir,
        "--set",
        "stages=[finetune]",
        "--set",
        "train.max_steps=400",
        "--set",
        "train.save_steps=1000",
        sigint=sigint,
    )
    err = _stop_once_training(proc, 400, stop)
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in err and "qatkit run" in err
    assert any((out / ".finetune.partial" / "checkpoints").glob("checkpoint-*")), "no checkpoint saved on the stop"


def test_a_stopped_recovery_benchmark_resumes_with_the_command_it_prints(tiny_model_dir, tmp_path):
    """`qatkit bench recovery` stopped in its QAT run: the command it prints continues that run to the summary."""
    out = tmp_path / "recovery with space"
    args = ["--recipe", str(TINY_RECIPE), "--schemes", "int8-int4", "--lora-modes", "merged", "--out", str(out)]
    sets = [f"model.name_or_path={tiny_model_dir}", "train.max_steps=100", "train.save_steps=1000", "data.eval_size=20"]
    sets.append("convert.parity_min_sqnr=0")
    proc = _popen(["bench", "recovery", *args, *(a for s in sets for a in ("--set", s))])
    err = _stop_once_training(proc, 100)
    assert proc.returncode == 130, err[-2000:]
    command = shlex.split(err.split("Resume with: ", 1)[1].splitlines()[0])
    assert command[:3] == ["qatkit", "bench", "recovery"] and "--resume" in command

    resumed = run_cli(*command[1:])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((out / "recovery.json").read_text())
    assert set(summary["runs"]) == {"int8-int4-merged"}
    assert set(summary["runs"]["int8-int4-merged"]["variants"]) == {"bf16", "ptq", "ft-bf16", "ft-ptq", "qat"}
    resumed_from = json.loads((out / "int8-int4-merged" / "finetune" / "train_summary.json").read_text())
    assert 0 < resumed_from["resumed_from_step"] < 100


def test_killed_control_run_does_not_train_qat_again(tiny_model_dir, tmp_path):
    """Killed while training the no-QAT control: --resume keeps the finished QAT run and trains only the control."""
    from pathlib import Path

    out = tmp_path / "run"
    args = ["--set", "stages=[finetune]", "--set", "eval.baselines=[ft-bf16]", "--set", "train.seed=7"]
    proc = _start(out, tiny_model_dir, *args)
    finished = out / ".finetune.partial" / "qat_result.json"
    control_ckpts = Path(os.environ["QATKIT_CACHE"]) / "control"
    _wait_for(lambda: finished.exists() and any(control_ckpts.glob("*.partial/checkpoints/checkpoint-4")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    qat = json.loads(finished.read_text())

    resumed = _resume(out, tiny_model_dir, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((out / "finetune" / "train_summary.json").read_text())
    assert summary["seconds"] == qat["seconds"] and summary["final_loss"] == qat["final_loss"]  # not trained again
    assert summary["control"]["steps"] == 16


def test_killed_eval_keeps_the_variants_it_scored(tiny_model_dir, tmp_path):
    """Killed between two variants of the eval stage: --resume scores only those not scored yet."""
    out = tmp_path / "run"
    args = ["--set", "eval.baselines=[ft-ptq,ft-bf16,ptq,bf16]", "--set", "train.seed=11"]
    proc = _start(out, tiny_model_dir, *args)
    scored = out / ".eval.partial" / "variants" / "qat.json"  # the converted model is scored first
    _wait_for(scored.exists, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    qat = json.loads(scored.read_text())["result"]

    resumed = _resume(out, tiny_model_dir, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    results = json.loads((out / "eval" / "results.json").read_text())
    assert results["seconds"]["qat"] == "resumed" and results["variants"]["qat"] == qat
    assert set(results["variants"]) == {"qat", "ft-ptq", "ft-bf16", "ptq", "bf16"}
    assert "resumed" not in [results["seconds"][v] for v in ("ft-ptq", "ft-bf16", "ptq", "bf16")]
