"""The guard against non-finite losses and gradients."""

from __future__ import annotations

import lightning as L
import torch

from llm_lightning.errors import UserError
from llm_lightning.io.checkpoint import latest_checkpoint
from llm_lightning.training.parallel import grad_norm


class NonFiniteStop(UserError):
    """Training stopped on a NaN/inf loss or gradient (the checkpoints keep the last good state)."""


class NonFiniteGuard(L.Callback):
    """Stops (or skips the step) when the loss or the gradients stop being finite.

    Checked once per optimizer step, on the global gradient norm: a NaN or inf loss in any
    micro-batch of the step shows up there. `skip` drops the gradients so the optimizer leaves
    every parameter untouched. Under 16-mixed, inf gradients are the loss scaler's business
    (it skips the step and lowers the scale), so only the loss is checked. A stop saves
    nothing: `last.ckpt` keeps the state of the last checkpointed step.
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
            finite = bool(torch.isfinite(grad_norm(pl_module.parameters())))
        # Ranks see their own loss (and, when sharded, their own gradient shard): agree first,
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
        good = latest_checkpoint(getattr(trainer.checkpoint_callback, "dirpath", None))
        raise NonFiniteStop(
            f"loss or gradients became NaN/inf at step {trainer.global_step + 1}; training stopped. "
            f"Last good checkpoint: {good or 'none yet'}. Lower --model.learning_rate, "
            "use bf16-mixed instead of 16-mixed, or pass --nonfinite.action skip"
        )
