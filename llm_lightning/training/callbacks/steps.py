"""Optimizer steps, where Lightning counts micro-batches.

`StepPlan` derives the trainer's gradient accumulation from the data module's global batch,
micro-batch and data-parallel size, converts `--eval_interval` (optimizer steps) into
Lightning's `val_check_interval` (micro-batches, #12205), and validates once more at the end
of a fit that stops off the interval, so every run has a final val loss and a best.ckpt.

On resume it rewrites the checkpoint's loop counters in micro-batches of *this* run's
accumulation: a resume with another micro-batch size or device count then steps the
optimizer and validates at the same optimizer steps as before.
"""

from __future__ import annotations

import lightning as L

from llm_lightning.errors import UserError


class StepPlan(L.Callback):
    def __init__(self, eval_interval: int) -> None:
        if eval_interval < 1:
            raise UserError(f"--eval_interval {eval_interval}: must be at least 1 optimizer step")
        self.eval_interval = eval_interval
        self.accumulation = 1

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        accumulation = trainer.datamodule.accumulation()
        if trainer.accumulate_grad_batches not in (1, accumulation):
            raise UserError(
                "--trainer.accumulate_grad_batches is derived from --data.batch_size and "
                "--data.micro_batch_size; set those instead"
            )
        self.accumulation = trainer.accumulate_grad_batches = accumulation
        trainer.val_check_interval = self.eval_interval * accumulation
        trainer.check_val_every_n_epoch = None

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        if trainer.state.fn == "fit" and "loops" in checkpoint:
            realign_loops(checkpoint, self.accumulation)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        last_step = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
        if last_step and trainer.limit_val_batches != 0 and trainer.global_step % self.eval_interval:
            # Lightning validates before it stops when asked to stop: the final val loss.
            trainer.should_stop = True


def realign_loops(checkpoint: dict, accumulation: int) -> None:
    """Set the fit loop's batch counters to `global_step` whole optimizer steps of micro-batches."""
    step = checkpoint["global_step"]
    fit_loop = checkpoint["loops"]["fit_loop"]
    batches = step * accumulation
    counts = {"ready": batches, "started": batches, "processed": batches, "completed": batches}
    progress = fit_loop["epoch_loop.batch_progress"]
    progress["total"], progress["current"] = dict(counts), dict(counts)
    progress["is_last_batch"] = False
    fit_loop["epoch_loop.state_dict"]["_batches_that_stepped"] = step
