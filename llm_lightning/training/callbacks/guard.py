"""The guard against non-finite losses and gradients, decided on the device."""

from __future__ import annotations

import lightning as L
import torch

from llm_lightning.errors import UserError
from llm_lightning.io.checkpoint import latest_checkpoint
from llm_lightning.training.parallel import grad_norm


class NonFiniteStop(UserError):
    """Training stopped on a NaN/inf loss or gradient (the checkpoints keep the last good state)."""


def skips_on_device(optimizer) -> bool:
    """Whether `optimizer.step()` honours a `found_inf` flag tensor (as under a GradScaler).

    torch's fused Adam/AdamW kernels do, and MuonAdamW does for all its groups. Other
    optimizers would fail on the attribute (torch's foreach Adam asserts it is None).
    """
    if hasattr(optimizer, "matrices_orthogonalised"):  # MuonAdamW (training/optim/muon.py)
        return True
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and all(
        group.get("fused") for group in optimizer.param_groups
    )


class NonFiniteGuard(L.Callback):
    """Skips every optimizer step whose gradients are not finite, and reports them at the logging interval.

    Nothing is read on the host inside a step: the flag `not isfinite(global gradient norm)` (the
    norm the gradient clipping computes anyway, norms.py keeps it) is handed to the optimizer as
    `found_inf`, and the optimizer skips the update on the device, as under a GradScaler: weights,
    moments, Muon's momentum and step counts stay untouched. The gradients are all-reduced (DDP)
    or their norm is (FSDP2), so every rank takes the same decision without a collective. A
    non-finite loss whose gradients are finite is counted too (each rank its own loss).

    Every `trainer.log_every_n_steps` optimizer steps and at the last step, the counts are read
    (the ranks agree on the losses' there, once): `stop` then raises NonFiniteStop, naming the
    first bad step and the last good checkpoint (the skipped steps changed nothing, so it holds
    the good state); `skip` logs `train/skipped_steps` and trains on. Under 16-mixed the
    GradScaler skips inf-gradient steps itself (and lowers the scale), so only the loss is counted.
    """

    def __init__(self, action: str = "stop") -> None:
        if action not in ("stop", "skip"):
            raise UserError(f"--nonfinite.action {action!r}: choose stop or skip")
        self.action = action
        self.skipped = 0  # gradient-skipped steps read so far
        self._bad: torch.Tensor | None = (
            None  # since the last read: [skipped steps, bad losses, first bad step]
        )

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self._bad = None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module, optimizer) -> None:
        loss = getattr(pl_module, "last_loss", None)
        device = pl_module.device
        bad_loss = torch.zeros((), device=device) if loss is None else (~torch.isfinite(loss)).float()
        bad_grads = torch.zeros((), device=device)
        if str(trainer.precision) != "16-mixed":
            bad_grads = (~torch.isfinite(grad_norm(pl_module.parameters()))).float().to(device)
            self._skip_on_device(getattr(optimizer, "optimizer", optimizer), bad_grads)
        step = trainer.global_step + 1  # the step this update makes
        if self._bad is None:
            self._bad = torch.tensor([0.0, 0.0, -1.0], device=device)
        first = self._bad[2]
        first = torch.where((first < 0) & ((bad_grads + bad_loss) > 0), step, first)
        self._bad = torch.stack([self._bad[0] + bad_grads, self._bad[1] + bad_loss, first])

    @staticmethod
    def _skip_on_device(optimizer, bad: torch.Tensor) -> None:
        if skips_on_device(optimizer):
            optimizer.found_inf = bad
        elif bool(bad):  # an optimizer without the flag: read it here (a sync, but still correct)
            optimizer.zero_grad(set_to_none=True)  # params without .grad are left alone

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        last = trainer.max_steps > 0 and step >= trainer.max_steps
        if self._bad is not None and (step % trainer.log_every_n_steps == 0 or last):
            self.check(trainer, pl_module)

    def check(self, trainer: L.Trainer, pl_module) -> None:
        """Read the counts since the last check (the one host read), then stop or report."""
        skipped, bad_losses, first = (int(v) for v in self._bad.tolist())
        self._bad = None
        bad_here = skipped + bad_losses > 0
        # Gradient skips are the same on every rank; a loss is each rank's own: agree on it here.
        if not trainer.strategy.reduce_boolean_decision(bad_here, all=False):
            return
        self.skipped += skipped
        if self.action == "skip":
            pl_module.log("train/skipped_steps", float(self.skipped), rank_zero_only=True)
            return
        good = latest_checkpoint(getattr(trainer.checkpoint_callback, "dirpath", None))
        where = f"at step {first}" if first > 0 else f"by step {trainer.global_step}"
        raise NonFiniteStop(
            f"loss or gradients became NaN/inf {where}; training stopped at step {trainer.global_step} "
            f"(the {self.skipped} non-finite step(s) were not applied). Last good checkpoint: "
            f"{good or 'none yet'}. Lower --model.learning_rate, use bf16-mixed instead of 16-mixed, "
            "or pass --nonfinite.action skip"
        )
