"""Callbacks: the run log and progress bar a person watches, step-aligned checkpoints,
SLURM requeue, and the guard against non-finite losses."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_only

from llm_lightning.errors import UserError
from llm_lightning.model import flops_per_token
from llm_lightning.training.throughput import device_peak_flops

METRICS_FILE = "metrics.jsonl"


class RunLog(L.Callback):
    """Tokens/s, MFU and a JSON-lines record of the run beside its checkpoints.

    Throughput is measured over each logging interval (`trainer.log_every_n_steps` optimizer
    steps) rather than per step, so the hot loop never waits on the device. Every record is
    appended to `<checkpoint dir>/metrics.jsonl`, which `llm-lightning monitor` reads.
    """

    def __init__(self) -> None:
        self._mark: tuple[float, int] | None = None  # (time, global step) at the last record
        self._peak: float | None = None
        self._start = time.time()

    def _path(self, trainer: L.Trainer) -> Path | None:
        checkpoint = trainer.checkpoint_callback
        dirpath = getattr(checkpoint, "dirpath", None)
        return Path(dirpath) / METRICS_FILE if dirpath else None

    @rank_zero_only
    def _write(self, trainer: L.Trainer, record: dict) -> None:
        path = self._path(trainer)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"time": time.time(), "elapsed": time.time() - self._start, **record}
        with path.open("a") as stream:
            stream.write(json.dumps(record) + "\n")

    def _tokens_per_step(self, trainer: L.Trainer, pl_module) -> int:
        datamodule = trainer.datamodule
        return datamodule.batch_size * pl_module.hparams.max_length

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self._start = time.time()
        self._mark = (time.perf_counter(), trainer.global_step)
        # MFU only against a published peak (GPUs): a CPU's peak must be measured on a quiet
        # machine, which `llm-lightning bench` does and a training run cannot.
        gpu = pl_module.device.type == "cuda"
        self._peak = device_peak_flops(pl_module.device, trainer.precision) if gpu else None
        self._write(
            trainer,
            {
                "event": "start",
                "step": trainer.global_step,
                "max_steps": trainer.max_steps,
                "tokens_per_step": self._tokens_per_step(trainer, pl_module),
                "world_size": trainer.world_size,
            },
        )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self._mark is None or step == self._mark[1] or step % trainer.log_every_n_steps:
            return
        now = time.perf_counter()
        steps = step - self._mark[1]
        tokens_per_s = steps * self._tokens_per_step(trainer, pl_module) / (now - self._mark[0])
        self._mark = (now, step)
        metrics = {
            "train/tokens_per_s": tokens_per_s,
            "train/tokens": step * self._tokens_per_step(trainer, pl_module),
        }
        if self._peak:
            achieved = tokens_per_s * flops_per_token(pl_module.config, pl_module.hparams.max_length)
            metrics["train/mfu"] = achieved / (self._peak * trainer.world_size)
        pl_module.log("train/tokens_per_s", tokens_per_s, prog_bar=True, logger=False, rank_zero_only=True)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        loss = getattr(pl_module, "last_loss", None)
        self._write(
            trainer,
            {
                "event": "train",
                "step": step,
                "train/loss": float(loss) if loss is not None else None,
                "lr": trainer.optimizers[0].param_groups[0]["lr"],
                **metrics,
            },
        )

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking or "val/loss" not in trainer.callback_metrics:
            return
        loss = float(trainer.callback_metrics["val/loss"])
        self._write(
            trainer,
            {
                "event": "val",
                "step": trainer.global_step,
                "val/loss": loss,
                "val/ppl": math.exp(min(loss, 50.0)),
            },
        )

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["run_elapsed"] = time.time() - self._start


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that saves only right after an optimizer step.

    Lightning calls on_train_batch_end for every micro-batch; with gradient accumulation, the
    micro-batches after a step still see `global_step % n == 0`, and on resume the first one
    would overwrite `checkpoint_step_N.ckpt` with a state whose data position is one
    micro-batch past its weights. Saving only when the step count has just changed keeps every
    checkpoint at an optimizer-step boundary, which exact resume needs.
    """

    _seen_step: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self._seen_step = trainer.global_step
        super().on_train_start(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self._seen_step:
            return
        self._seen_step = trainer.global_step
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class SlurmRequeue(L.Callback):
    """When SLURM warns the job (SIGUSR1, `#SBATCH --signal=SIGUSR1@90`): save, requeue, stop.

    Lightning's own handler saves from inside the signal handler, wherever the process is: in DDP
    one rank can enter the save's barrier while another waits in a collective, and both hang
    (Lightning #21406); DataLoader workers, which SLURM signals too, inherit the handler and try
    to save as well. Here the handler only sets a flag in the training process. After each
    optimizer step the ranks agree on it, all save `last.ckpt` (a step boundary, like the periodic
    checkpoints), rank 0 runs `scontrol requeue`, and training stops. A handler installed in
    `setup` also keeps Lightning from installing its own.
    """

    def __init__(self) -> None:
        self._pid: int | None = None
        self._requested = False
        self._seen_step: int | None = None

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if stage == "fit" and SLURMEnvironment.detect():
            self._pid = os.getpid()
            signal.signal(signal.SIGUSR1, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if os.getpid() == self._pid:  # forked DataLoader workers inherit this handler: they ignore it
            self._requested = True

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self._seen_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._pid is None or trainer.global_step == self._seen_step:
            return  # not under SLURM, or between the micro-batches of one optimizer step
        self._seen_step = trainer.global_step
        if not trainer.strategy.reduce_boolean_decision(self._requested, all=False):
            return
        checkpoint = trainer.checkpoint_callback
        trainer.save_checkpoint(Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}.ckpt")
        if trainer.is_global_zero:
            subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=False)
        trainer.should_stop = True


class NonFiniteGuard(L.Callback):
    """Stops (or skips the step) when the loss or the gradients stop being finite.

    Checked once per optimizer step, on the global gradient norm: a NaN or inf loss in any
    micro-batch of the step shows up there. `skip` drops the gradients so the optimizer leaves
    every parameter untouched. Under 16-mixed, inf gradients are the loss scaler's business
    (it skips the step and lowers the scale), so only the loss is checked.
    """

    def __init__(self, action: str = "stop") -> None:
        if action not in ("stop", "skip"):
            raise UserError(f"--nonfinite.action {action!r}: choose stop or skip")
        self.action = action
        self.skipped = 0

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module, optimizer) -> None:
        loss = getattr(pl_module, "last_loss", None)
        finite = loss is None or bool(torch.isfinite(loss))
        if finite and str(trainer.precision) != "16-mixed":
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            finite = not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
        # Ranks see their own loss (and, under FSDP, their own gradient shard): agree first,
        # or one rank raises while the others wait for it in the next collective.
        if not trainer.strategy.reduce_boolean_decision(finite, all=True):
            finite = False
        if finite:
            return
        if self.action == "skip":
            self.skipped += 1
            optimizer.zero_grad(set_to_none=True)  # params without .grad are left alone by AdamW
            pl_module.log("train/skipped_steps", float(self.skipped))
            return
        raise UserError(
            f"loss or gradients became NaN/inf at step {trainer.global_step}; training stopped. "
            f"Last good checkpoint: {last_checkpoint(trainer) or 'none yet'}. Lower --model.learning_rate, "
            "use bf16-mixed instead of 16-mixed, or pass --nonfinite.action skip"
        )


def last_checkpoint(trainer: L.Trainer) -> str | None:
    checkpoint = trainer.checkpoint_callback
    path = getattr(checkpoint, "last_model_path", "") or getattr(checkpoint, "best_model_path", "")
    return path or None


class StepProgressBar(TQDMProgressBar):
    """One bar for the whole run, counting optimizer steps towards `max_steps`.

    Lightning's bar counts micro-batches and restarts every epoch, which says little when a
    run is defined by optimizer steps: this one shows step N/max_steps, the loss, tokens/s
    and tqdm's ETA, and starts at the resumed step after `--ckpt_path last`.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        bar = self.train_progress_bar = self.init_train_tqdm()
        bar.desc, bar.unit = "train", "step"
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        bar.initial = bar.n = trainer.global_step  # a resumed run's rate and ETA count from here
        bar.refresh()

    def on_train_epoch_start(self, trainer: L.Trainer, *_) -> None:
        pass  # one bar across epochs

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is None or bar.disable or step == bar.n:
            return  # mid-accumulation: no optimizer step yet
        if step % self.refresh_rate == 0 or step == trainer.max_steps:
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer: L.Trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        metrics["epoch"] = trainer.current_epoch
        return metrics
