"""Faults never lose work: killed runs resume exactly, writes are atomic, NaNs stop the run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from llm_lightning.io.atomic import atomic_write
from llm_lightning.io.checkpoint import load_checkpoint
from tests.conftest import TINY_FIT, assert_same_weights, fit, records, run_cli


def test_interrupted_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    save = lambda obj: atomic_write(target, lambda stream: torch.save(obj, stream))  # noqa: E731
    save({"step": 1})

    def dies_half_way(obj, stream, *args, **kwargs):
        stream.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # what a SIGINT or a full disk does mid-write

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save({"step": 2})
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


@pytest.mark.slow  # the default suite kills a sharded save (tests/distributed/test_sharded.py)
def test_kill_9_then_resume_from_last_matches_an_uninterrupted_run(prepared_dir, tmp_path):
    """A real SIGKILL mid-run; `fit --ckpt_path last` finishes with the weights of a clean run."""
    straight, killed = tmp_path / "straight" / "ckpt", tmp_path / "killed" / "ckpt"
    for folder in (straight, killed):
        folder.parent.mkdir()
    plan = ("--model.max_steps", "30", "--checkpoint.every_n_train_steps", "5")
    assert fit(prepared_dir, straight, *plan, steps=30).returncode == 0

    command = [
        sys.executable,
        "-m",
        "llm_lightning",
        "fit",
        *TINY_FIT,
        "--data.data_dir",
        str(prepared_dir),
        "--data.batch_size",
        "8",
        "--data.micro_batch_size",
        "4",
        "--trainer.max_steps",
        "30",
        "--checkpoint.dirpath",
        str(killed),
        "--eval_interval",
        "10",
        *plan,
    ]
    process = subprocess.Popen(
        command, cwd=killed.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    while not (killed / "checkpoint_step_15.ckpt").exists() and time.time() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    # last.ckpt is written right after checkpoint_step_N: a kill between the two leaves the
    # previous complete one, so at most one interval (5 steps) is redone
    interrupted_at = load_checkpoint(killed / "last.ckpt")["global_step"]
    assert 10 <= interrupted_at < 30

    resumed = fit(prepared_dir, killed, *plan, "--ckpt_path", "last", steps=30)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in records(killed, "start")] == [0, interrupted_at]
    assert_same_weights(straight / "last.ckpt", killed / "last.ckpt")


def test_nonfinite_loss_stops_with_a_pointer_to_the_last_good_checkpoint(prepared_dir, tmp_path):
    # A learning rate of 1e30 blows the weights up within a couple of steps.
    result = fit(
        prepared_dir,
        tmp_path / "ckpt",
        "--model.learning_rate",
        "1e30",
        "--model.warmup_steps",
        "0",
        "--trainer.gradient_clip_val",
        "0",
        steps=20,
    )
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert "NaN/inf" in last_line and "Last good checkpoint" in last_line
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # an extra beside the default suite's check of the same contract
def test_nonfinite_skip_mode_trains_on(prepared_dir, tmp_path):
    result = fit(
        prepared_dir,
        tmp_path / "ckpt",
        "--model.learning_rate",
        "1e30",
        "--model.warmup_steps",
        "0",
        "--trainer.gradient_clip_val",
        "0",
        "--nonfinite.action",
        "skip",
        steps=6,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = load_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert checkpoint["global_step"] == 6
    # every step whose gradients were NaN/inf was dropped, so no NaN ever reached the weights
    assert all(torch.isfinite(w).all() for w in checkpoint["state_dict"].values())


@pytest.mark.slow  # an extra beside the default suite's check of the same contract
def test_checkpoint_from_other_data_is_a_clear_error(prepared_dir, tmp_path):
    """A checkpoint whose vocabulary differs from the data's: one line, exit 2."""
    ckpt = tmp_path / "ckpt"
    assert fit(prepared_dir, ckpt, steps=2).returncode == 0
    checkpoint = load_checkpoint(ckpt / "last.ckpt")
    checkpoint["hyper_parameters"]["vocab_size"] += 1
    checkpoint["model_config"]["vocab_size"] += 1
    torch.save(checkpoint, ckpt / "other.ckpt")
    result = run_cli(
        "validate",
        *TINY_FIT,
        "--data.data_dir",
        prepared_dir,
        "--ckpt_path",
        ckpt / "other.ckpt",
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "vocab_size" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", marks=pytest.mark.slow),
        pytest.param(b"not a checkpoint at all", marks=pytest.mark.slow),
        None,
    ],
)
def test_corrupt_or_truncated_checkpoint_is_a_clear_error(prepared_dir, tmp_path, content):
    bad = tmp_path / "bad.ckpt"
    if content is None:  # truncated: the first half of a real checkpoint
        assert fit(prepared_dir, tmp_path / "ckpt", steps=2).returncode == 0
        real = (tmp_path / "ckpt" / "last.ckpt").read_bytes()
        content = real[: len(real) // 2]
    bad.write_bytes(content)
    result = run_cli("validate", *TINY_FIT, "--data.data_dir", prepared_dir, "--ckpt_path", bad, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert str(bad) in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
