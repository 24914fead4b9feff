"""RunLog: the JSON-lines record of a fit beside its checkpoints, which `monitor` reads.

`<checkpoint dir>/metrics.jsonl` gets, from rank 0 of a fit only (never from validate/test):
- `start`: step, max_steps, tokens per step, world and data-parallel sizes;
- `train` every logging interval (`trainer.log_every_n_steps` optimizer steps) and at the
  last step: loss, learning rate, tokens/s measured over the interval (the hot loop never
  waits on the device), tokens seen, passes over the data (and over each source of a
  mixture, `train/epochs/<name>`), MFU on GPUs;
- `val` after each validation: val/loss, val/ppl (and what else the module logged under val/,
  such as each source's `val/loss/<name>`);
- `end`: why the fit ended (finished, max_time, stopped, interrupted, nonfinite, error).
The same train metrics go to the trainer's loggers (TensorBoard).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.utilities import rank_zero_only

from llm_lightning.io.metrics import METRICS_FILE, append_record
from llm_lightning.model import flops_per_token
from llm_lightning.training.callbacks.guard import NonFiniteStop
from llm_lightning.training.callbacks.signals import Interrupted
from llm_lightning.training.optim.muon import learning_rates
from llm_lightning.training.throughput import device_peak_flops


class RunLog(L.Callback):
    def __init__(self) -> None:
        self._mark: tuple[float, int] | None = None  # (time, global step) at the last train record
        self._peak: float | None = None
        self._start = time.time()
        self.last_train: dict | None = None  # the latest train record (the progress lines show it)

    # ----------------------------------------------------------------- writing
    @staticmethod
    def path(trainer: L.Trainer) -> Path | None:
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        return Path(dirpath) / METRICS_FILE if dirpath else None

    @rank_zero_only
    def _write(self, trainer: L.Trainer, record: dict) -> None:
        path = self.path(trainer)
        if path is None or trainer.state.fn != "fit":
            return
        append_record(path, {"time": time.time(), "elapsed": time.time() - self._start, **record})

    @staticmethod
    def tokens_per_step(trainer: L.Trainer, pl_module) -> int:
        return trainer.datamodule.batch_size * pl_module.hparams.max_length

    # ----------------------------------------------------------------- hooks
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
                "tokens_per_step": self.tokens_per_step(trainer, pl_module),
                "world_size": trainer.world_size,
                "data_parallel_size": trainer.datamodule.data_parallel()[1],
                "data_position": trainer.datamodule.position,
            },
        )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self._mark is None or step == self._mark[1] or step % trainer.log_every_n_steps:
            return
        self._record_train(trainer, pl_module)  # StepProgressBar shows its tokens/s from last_train

    def _record_train(self, trainer: L.Trainer, pl_module) -> float:
        now, step = time.perf_counter(), trainer.global_step
        tokens_per_step = self.tokens_per_step(trainer, pl_module)
        tokens_per_s = (step - self._mark[1]) * tokens_per_step / max(now - self._mark[0], 1e-9)
        self._mark = (now, step)
        metrics = {
            "train/tokens_per_s": tokens_per_s,
            "train/tokens": step * tokens_per_step,
            "train/epochs": trainer.datamodule.epochs_seen(),
            # a mixture: passes over each source (each repeats on its own when it runs out)
            **getattr(trainer.datamodule, "epochs_by_source", dict)(),
        }
        if self._peak:
            achieved = tokens_per_s * flops_per_token(pl_module.config, pl_module.hparams.max_length)
            metrics["train/mfu"] = achieved / (self._peak * trainer.world_size)
        loss = getattr(pl_module, "last_loss", None)
        loss = float(loss) if loss is not None else None
        rates = learning_rates(trainer.optimizers[0])  # AdamW's, and Muon's when it runs
        for logger in trainer.loggers:
            logger.log_metrics({**metrics, "train/loss": loss, **rates}, step=step)
        self.last_train = {"event": "train", "step": step, "train/loss": loss, **rates, **metrics}
        self._write(trainer, self.last_train)
        return tokens_per_s

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking or "val/loss" not in trainer.callback_metrics:
            return
        values = {
            name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith("val/")
        }
        values.setdefault("val/ppl", math.exp(min(values["val/loss"], 50.0)))
        self._write(trainer, {"event": "val", "step": trainer.global_step, **values})

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if self._mark is not None and trainer.global_step > self._mark[1]:
            self._record_train(trainer, pl_module)  # the last step's loss, off the logging interval
        self._write(trainer, {"event": "end", "step": trainer.global_step, "reason": end_reason(trainer)})

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, Interrupted):
            reason = "interrupted"
        elif isinstance(exception, NonFiniteStop):
            reason = "nonfinite"
        else:
            reason = "error"
        message = str(exception).splitlines()[0][:300] if str(exception) else type(exception).__name__
        self._write(
            trainer, {"event": "end", "step": trainer.global_step, "reason": reason, "message": message}
        )

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["run_elapsed"] = time.time() - self._start


def end_reason(trainer: L.Trainer) -> str:
    """Why a fit that ended without an exception ended."""
    if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return "finished"
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    if timer is not None and (timer.time_remaining() or 0) <= 0:
        return "max_time"
    return "stopped"
