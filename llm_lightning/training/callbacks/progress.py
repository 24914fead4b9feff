"""What a fit shows while it runs: a bar on a terminal, a line per interval in a log file.

On a terminal, one bar for the whole run counts optimizer steps towards `max_steps` (loss,
tokens/s, ETA) and starts at the resumed step after `--ckpt_path last`; Lightning's own bar
counts micro-batches and restarts every epoch. When stdout is not a terminal (CI, SLURM,
`| tee`), bars are replaced by one line per logging interval and one per validation:
Lightning's bars would write a line for every batch there.

The bar's count, rate and ETA move every step; its loss and tokens/s are read at logging
intervals only (reading the loss waits for the device, which a step must not do).
"""

from __future__ import annotations

import sys
import time

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from llm_lightning.training.optim.muon import learning_rates


class StepProgressBar(TQDMProgressBar):
    def __init__(self, refresh_rate: int = 1, lines: bool | None = None) -> None:
        """lines: print lines instead of bars (default: when stdout is not a terminal)."""
        super().__init__(refresh_rate=refresh_rate)
        self.lines = (not sys.stdout.isatty()) if lines is None else lines
        self._start: tuple[float, int] | None = None

    # ----------------------------------------------------------------- bars
    def _disabled(self, *args, **kwargs) -> Tqdm:
        return Tqdm(disable=True)

    def init_sanity_tqdm(self) -> Tqdm:
        return self._disabled() if self.lines else super().init_sanity_tqdm()

    def init_validation_tqdm(self) -> Tqdm:
        return self._disabled() if self.lines else super().init_validation_tqdm()

    def init_train_tqdm(self) -> Tqdm:
        return self._disabled() if self.lines else super().init_train_tqdm()

    def init_test_tqdm(self) -> Tqdm:
        return self._disabled() if self.lines else super().init_test_tqdm()

    def init_predict_tqdm(self) -> Tqdm:
        return self._disabled() if self.lines else super().init_predict_tqdm()

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self._start = (time.perf_counter(), trainer.global_step)
        bar = self.train_progress_bar = self.init_train_tqdm()
        bar.desc, bar.unit = "train", "step"
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        bar.initial = bar.n = trainer.global_step  # a resumed run's rate and ETA count from here
        bar.refresh()

    def on_train_epoch_start(self, trainer: L.Trainer, *_) -> None:
        pass  # one bar across epochs

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is None or step == bar.n:
            return  # mid-accumulation: no optimizer step yet
        bar.n = step
        interval = step % trainer.log_every_n_steps == 0 or step == trainer.max_steps
        if self.lines:
            if interval:
                self._print(trainer, self._train_line(trainer))
        elif not bar.disable and interval:
            # Reading the metrics reads the loss off the device: at logging intervals only.
            bar.set_postfix(self.get_metrics(trainer, pl_module))
        elif not bar.disable and step % self.refresh_rate == 0:
            bar.refresh()  # the count, rate and ETA move every step; the loss shown is the interval's

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if self.lines and not trainer.sanity_checking and trainer.state.fn == "fit":
            values = [f"{name} {float(value):.4f}" for name, value in trainer.callback_metrics.items()
                      if name.startswith("val/") and not name.endswith("ppl")]  # fmt: skip
            self._print(trainer, f"step {self._steps(trainer)} | validation: {' | '.join(values)}")
        super().on_validation_end(trainer, pl_module)

    def get_metrics(self, trainer: L.Trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return {**interval_metrics(trainer, pl_module), **metrics}

    # ----------------------------------------------------------------- lines
    def _steps(self, trainer: L.Trainer) -> str:
        return (
            f"{trainer.global_step}/{trainer.max_steps}"
            if trainer.max_steps > 0
            else str(trainer.global_step)
        )

    def _train_line(self, trainer: L.Trainer) -> str:
        metrics = interval_metrics(trainer, trainer.lightning_module)
        parts = [f"step {self._steps(trainer)}"]
        if "train/loss" in metrics:
            parts.append(f"loss {metrics['train/loss']:.4f}")
        parts += [f"{name} {value:.2e}" for name, value in learning_rates(trainer.optimizers[0]).items()]
        if "train/tokens_per_s" in metrics:
            parts.append(f"{float(metrics['train/tokens_per_s']):,.0f} tok/s")
        eta = self._eta(trainer)
        if eta is not None:
            parts.append(f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}")
        return " | ".join(parts)

    def _eta(self, trainer: L.Trainer) -> float | None:
        started, first = self._start
        done = trainer.global_step - first
        if trainer.max_steps <= 0 or done <= 0:
            return None
        return (time.perf_counter() - started) / done * (trainer.max_steps - trainer.global_step)

    def _print(self, trainer: L.Trainer, line: str) -> None:
        if trainer.is_global_zero:
            print(line, flush=True)


def interval_metrics(trainer: L.Trainer, pl_module) -> dict[str, float]:
    """The last micro-batch's loss (a host read: at logging intervals only) and RunLog's tokens/s.

    Not Lightning's progress-bar metrics: it turns those into floats after every micro-batch.
    """
    metrics = {}
    loss = getattr(pl_module, "last_loss", None)
    if loss is not None:
        metrics["train/loss"] = float(loss)
    run_log = next((c for c in trainer.callbacks if hasattr(c, "last_train")), None)
    rate = (getattr(run_log, "last_train", None) or {}).get("train/tokens_per_s")
    if rate is not None:
        metrics["train/tokens_per_s"] = rate
    return metrics
