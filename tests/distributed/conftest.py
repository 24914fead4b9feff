"""Helpers of the multi-process tests: flags of a 20-step CPU fit, launch checks, ports."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from llm_lightning.data.format import read_metadata
from llm_lightning.data.windows import window_starts
from llm_lightning.io.checkpoint import load_checkpoint
from tests.conftest import REPO, TINY_FIT, records

CLUSTER = REPO / "configs" / "cluster"
BIN = Path(sys.executable).parent  # the environment's llm-lightning and torchrun
TIMEOUT = 240  # seconds for any one launched process
STEPS = 20
CHECKPOINT_FILES = [
    "best.ckpt",
    "checkpoint_step_10.ckpt",
    "checkpoint_step_20.ckpt",
    "last.ckpt",
    "metrics.jsonl",
]
# Two processes on this 2-core machine: one thread each, or they fight over the cores.
DIST_ENV = {"OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def odd_val_stride(data_dir: Path) -> int:
    """A stride that gives an odd number of val windows: two ranks then need a padding window."""
    metadata = read_metadata(data_dir)
    for stride in range(metadata["max_length"], 0, -1):
        if len(window_starts(metadata["num_tokens"]["val"], metadata["max_length"], stride)) % 2:
            return stride
    raise AssertionError("no stride gives an odd number of val windows")


def train_flags(data_dir: Path) -> list:
    """A 20-step fit on CPU: global batch 8 of micro-batches of 4, checkpoints and validation every 10 steps."""
    return [
        *TINY_FIT, "--data.stride", odd_val_stride(data_dir), "--data.batch_size", 8, "--data.micro_batch_size", 4,
        "--trainer.max_steps", STEPS, "--trainer.log_every_n_steps", 5, "--eval_interval", 10,
        "--checkpoint.every_n_train_steps", 10, "--trainer.accelerator", "cpu",
    ]  # fmt: skip


def fit_flags(data_dir: Path, run_dir: Path, *extra) -> list:
    return [
        *train_flags(data_dir), "--data.data_dir", data_dir, "--checkpoint.dirpath", run_dir / "ckpts",
        "--trainer.default_root_dir", run_dir / "logs", *extra,
    ]  # fmt: skip


def val_losses(ckpt_dir: Path) -> dict[int, float]:
    return {r["step"]: r["val/loss"] for r in records(ckpt_dir, "val")}


def check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (
        f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    )


def assert_single_writer(run_dir: Path) -> None:
    """Checkpoints once, no versioned duplicates, the run log and TensorBoard written by rank 0 only."""
    ckpt_dir = run_dir / "ckpts" if (run_dir / "ckpts").is_dir() else run_dir / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == CHECKPOINT_FILES
    assert [r["step"] for r in records(ckpt_dir, "train")] == [5, 10, 15, 20]
    assert sorted(val_losses(ckpt_dir)) == [10, 20]
    assert len(list(run_dir.rglob("events.out.tfevents.*"))) == 1
    assert load_checkpoint(ckpt_dir / "last.ckpt")["global_step"] == STEPS
