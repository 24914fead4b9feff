"""Every ending of a fit leaves the state after its last completed step in last.ckpt.

Each ending runs through the real CLI and is then resumed; where the run can be compared, the
resumed weights equal those of one uninterrupted run (fp32 on CPU, bit for bit), which shows
that the saved state (weights, optimizer, schedule and the data position) was complete.
The learning-rate horizon is pinned (--model.max_steps) so that interrupted and uninterrupted
runs share one schedule.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest

from llm_lightning.io.checkpoint import load_checkpoint
from tests.conftest import REPO, TINY_FIT, assert_same_weights, fit, fit_flags, records, run_cli

STEPS = 30
PLAN = (
    "--model.max_steps",
    str(STEPS),
    "--checkpoint.every_n_train_steps",
    "10",
    "--trainer.log_every_n_steps",
    "5",
)


def step_of(path: Path) -> int:
    return load_checkpoint(path)["global_step"]


@pytest.fixture(scope="module")
def straight(prepared_dir, tmp_path_factory) -> Path:
    """30 steps without interruption: what every ending plus a resume must reproduce."""
    ckpts = tmp_path_factory.mktemp("straight") / "ckpts"
    result = fit(prepared_dir, ckpts, *PLAN, steps=STEPS)
    assert result.returncode == 0, result.stderr[-3000:]
    return ckpts


def resume_to_the_end(prepared_dir: Path, ckpts: Path, *extra: str) -> None:
    result = fit(prepared_dir, ckpts, *PLAN, "--ckpt_path", "last", *extra, steps=STEPS)
    assert result.returncode == 0, result.stderr[-3000:]


def test_max_steps_off_the_intervals_saves_the_final_state_and_validates(prepared_dir, tmp_path, straight):
    ckpts = tmp_path / "ckpts"
    result = fit(prepared_dir, ckpts, *PLAN, steps=15)
    assert result.returncode == 0, result.stderr[-3000:]
    assert step_of(ckpts / "last.ckpt") == 15
    assert [r["step"] for r in records(ckpts, "val")] == [10, 15]  # a final validation off the interval
    assert (ckpts / "best.ckpt").is_file()
    assert records(ckpts, "train")[-1]["step"] == 15 and records(ckpts, "end")[-1]["reason"] == "finished"
    tags = tensorboard_tags(tmp_path / "logs")
    assert {"train/loss", "val/loss", "lr"} <= tags, tags
    resume_to_the_end(prepared_dir, ckpts)
    assert_same_weights(straight / "last.ckpt", ckpts / "last.ckpt")


def tensorboard_tags(folder: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in folder.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    return tags


def test_max_time_saves_and_validates_the_step_it_stopped_at(prepared_dir, tmp_path):
    ckpts = tmp_path / "ckpts"
    result = fit(
        prepared_dir, ckpts, "--trainer.max_time", "00:00:00:04", "--model.max_steps", "1000", steps=1000
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (end,) = records(ckpts, "end")
    assert end["reason"] == "max_time" and 0 < end["step"] < 1000
    assert step_of(ckpts / "last.ckpt") == end["step"]
    assert records(ckpts, "val")[-1]["step"] == end["step"]
    shown = run_cli("monitor", "--checkpoint_dir", ckpts)
    assert "max_time" in shown.stdout and "running" not in shown.stdout, shown.stdout


def start_fit(prepared_dir: Path, ckpts: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    flags = [str(f) for f in fit_flags(prepared_dir, ckpts, *PLAN, *extra, steps=STEPS)]
    ckpts.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "llm_lightning", "fit", *flags],
        cwd=ckpts.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        start_new_session=True,  # its own process group, as a shell job is
    )


def wait_for_step(process: subprocess.Popen, ckpts: Path, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the run ended first: {process.stderr.read()[-3000:]}"
        log = ckpts / "metrics.jsonl"
        if log.exists() and any(
            r.get("step", 0) >= step for r in map(json.loads, log.read_text().splitlines())
        ):
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


def held_before_the_end(ckpts: Path) -> tuple[list[str], Path]:
    """Flags that hold the run two steps before its end until the test creates the returned file,
    after its signal: the run cannot end first, however far the test lags behind (probes.py)."""
    go = ckpts.parent / "signalled"
    flags = ["--trainer.callbacks+=tests.probes.HoldBeforeTheEnd", "--trainer.callbacks.path", str(go)]
    return [*flags, "--trainer.callbacks.step", str(STEPS - 2)], go


def check_interrupted(process: subprocess.Popen, signum: int, ckpts: Path) -> int:
    """Exit 128 + signal, one line naming where the state is; that state is at a step boundary."""
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr[-3000:]
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"llm-lightning: stopped by {signal.Signals(signum).name}"), stderr[-2000:]
    assert str(ckpts / "last.ckpt") in last_line and "--ckpt_path last" in last_line
    assert "Traceback" not in stderr
    assert stderr.count("llm-lightning: stopped by") == 1, stderr[-2000:]  # DDP: rank 0 says it, once
    step = step_of(ckpts / "last.ckpt")
    assert f"after step {step} " in last_line
    assert records(ckpts, "end")[-1]["reason"] == "interrupted"
    return step


@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_a_signal_finishes_the_step_saves_and_resumes_exactly(signum, prepared_dir, tmp_path, straight):
    ckpts = tmp_path / "ckpts"
    hold, signalled = held_before_the_end(ckpts)
    process = start_fit(prepared_dir, ckpts, *hold)
    wait_for_step(process, ckpts, 5)
    os.killpg(process.pid, signum)  # to the whole job, as Ctrl-C or a scheduler's stop does
    signalled.touch()
    step = check_interrupted(process, signum, ckpts)
    assert 5 <= step < STEPS
    resume_to_the_end(prepared_dir, ckpts)
    assert_same_weights(straight / "last.ckpt", ckpts / "last.ckpt")


@pytest.mark.slow  # an extra beside the default suite's check of the same contract
def test_a_second_signal_stops_at_once(prepared_dir, tmp_path):
    ckpts = tmp_path / "ckpts"
    process = start_fit(prepared_dir, ckpts, "--model.max_steps", "100000", "--trainer.max_steps", "100000")
    wait_for_step(process, ckpts, 1)
    os.killpg(process.pid, signal.SIGINT)
    time.sleep(0.2)  # two signals sent at once may arrive as one
    os.killpg(process.pid, signal.SIGINT)
    process.communicate(timeout=30)
    assert process.returncode == -signal.SIGINT


def test_sigterm_to_the_first_of_two_ddp_processes_stops_both_at_one_step(prepared_dir, tmp_path):
    """Only rank 0 gets the signal (`kill PID`); the ranks agree and both stop after the same step."""
    ckpts = tmp_path / "ckpts"
    env = {"OMP_NUM_THREADS": "1"}
    hold, signalled = held_before_the_end(ckpts)
    process = start_fit(
        prepared_dir, ckpts, "--trainer.strategy", "ddp", "--trainer.devices", "2", *hold, env=env
    )
    wait_for_step(process, ckpts, 5)
    os.kill(process.pid, signal.SIGTERM)
    signalled.touch()
    step = check_interrupted(process, signal.SIGTERM, ckpts)
    assert 5 <= step < STEPS
    assert load_checkpoint(ckpts / "last.ckpt")["TextDataModule"]["position"] == step * 8


def test_an_exception_saves_the_last_completed_step(prepared_dir, tmp_path):
    ckpts = tmp_path / "ckpts"
    crash = ("--trainer.callbacks+=tests.training.test_endings.CrashAt", "--trainer.callbacks.step", "7")
    result = fit(prepared_dir, ckpts, *PLAN, *crash, steps=STEPS)
    assert result.returncode == 1 and "crashed on purpose" in result.stderr
    assert step_of(ckpts / "last.ckpt") == 6  # step 7 never completed
    assert records(ckpts, "end")[-1]["reason"] == "error"


class CrashAt(L.Callback):
    """A callback that fails during optimizer step `step` (after its forward pass)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step + 1 == self.step:
            raise RuntimeError("crashed on purpose")


def md5s(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.ckpt"))}


@pytest.fixture(scope="module")
def resharded(corpus_dir, prepared_dir, tmp_path_factory) -> Path:
    """The shared run's text, prepared again in 2 shards with its tokenizer and merged: the same
    token total, other windows (none crosses a shard's end)."""
    from llm_lightning.data.format import read_metadata
    from llm_lightning.data.prepare import prepare
    from llm_lightning.tools.merge_shards import merge

    out = tmp_path_factory.mktemp("resharded") / "data"
    options = dict(max_length=32, stride=32, val_fraction=0.1, seed=0, num_workers=0, tokenizer=prepared_dir)
    for index in range(2):
        prepare(corpus_dir, out, num_shards=2, shard_index=index, **options)
    merge(out)
    assert read_metadata(out)["num_tokens"] == read_metadata(prepared_dir)["num_tokens"]
    return out


FAILED_RESUMES = {  # flags -> (exit code, what the last line says)
    "re-sharded data": (("--data.data_dir", "RESHARDED"), 2, "laid out otherwise than the checkpoint's"),
    "first step fails": (
        ("--trainer.callbacks+=tests.training.test_endings.CrashAt", "--trainer.callbacks.step", "21"),
        1,
        "crashed on purpose",
    ),
    "optimizer": (("--model.optimizer", "muon"), 2, "was trained with adamw"),
    "shape": (("--model.hidden_size", "32"), 2, "contradicts"),
    "added source": (("--data.data_dir", "[DATA, RESHARDED]"), 2, "2 folder(s) now"),
}


@pytest.mark.parametrize(
    "failure",
    [
        "re-sharded data",
        "first step fails",
        # extras: refused by the CLI before Lightning starts (tests/e2e/bad_inputs.yaml has one line each)
        pytest.param("optimizer", marks=pytest.mark.slow),
        pytest.param("shape", marks=pytest.mark.slow),
        pytest.param("added source", marks=pytest.mark.slow),
    ],
)
def test_a_failed_resume_leaves_every_checkpoint_as_it_was(
    run_dir, prepared_dir, resharded, tmp_path, failure
):
    """Refused in one line, or failing before this process completed a step: no checkpoint changes,
    so the original command still resumes (the final-state save saves only a state that a step of
    this process produced). 25 steps after a 20-step schedule: the rising learning rate is said."""
    ckpts = tmp_path / "ckpts"
    shutil.copytree(run_dir, ckpts)
    before = md5s(ckpts)
    flags, code, says = FAILED_RESUMES[failure]
    flags = [flag.replace("RESHARDED", str(resharded)).replace("DATA", str(prepared_dir)) for flag in flags]
    result = fit(prepared_dir, ckpts, "--ckpt_path", "last", *flags, steps=25)
    assert result.returncode == code, result.stderr[-3000:]
    assert says in result.stderr.strip().splitlines()[-1]
    if code == 2:
        assert "Traceback" not in result.stderr
    else:  # it got as far as the restore
        assert "note: the learning rate rises on resume: at step 20" in result.stdout + result.stderr
    assert md5s(ckpts) == before and len(before) == 4


def test_validate_leaves_the_run_and_its_log_alone(run_dir, prepared_dir, tmp_path):
    before = (run_dir / "metrics.jsonl").read_text()
    result = run_cli(
        "validate", *TINY_FIT, "--data.data_dir", prepared_dir, "--data.batch_size", 8,
        "--ckpt_path", run_dir / "last.ckpt", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "metrics.jsonl").read_text() == before
    assert not (tmp_path / "checkpoints").exists()
