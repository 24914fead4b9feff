"""Checkpoints: at optimizer-step boundaries, the final state on every ending, written atomically.

- `StepCheckpoint` (`--checkpoint.*`): `checkpoint_step_N.ckpt` every N optimizer steps and
  `last.ckpt` (by default a relative link to it, made atomically: one write), plus a full
  `last.ckpt` whenever a fit ends after a step it has not saved yet: the
  end of max_steps, max_time or early stopping (`on_train_end`), or an exception
  (`on_exception`; not a non-finite stop, whose weights are suspect), and only a state that a
  step completed in this process produced (never a half-restored one).
- `BestCheckpoint`: `best.ckpt`, the lowest val/loss so far.
- `AtomicCheckpointIO`: files are written beside their target and renamed over it.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from llm_lightning.io.atomic import atomic_link, atomic_write
from llm_lightning.io.checkpoint import LAST
from llm_lightning.training.callbacks.guard import NonFiniteStop


class _StableState:
    """A checkpoint callback's state found again on resume, whatever its intervals are now.

    Lightning keys a callback's saved state by its constructor arguments; a resume with another
    `--checkpoint.every_n_train_steps` would then not find it and advise adding "the following
    callbacks". Outside a fit (validate, test) the run's checkpoint bookkeeping is not needed.
    """

    _fitting = False

    @property
    def state_key(self) -> str:
        return type(self).__name__

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        self._fitting = stage == "fit"
        super().setup(trainer, pl_module, stage)

    def load_state_dict(self, state_dict: dict) -> None:
        if self._fitting:
            super().load_state_dict(state_dict)


class StepCheckpoint(_StableState, ModelCheckpoint):
    """ModelCheckpoint that saves only right after an optimizer step, and at every ending.

    Lightning calls on_train_batch_end for every micro-batch; with gradient accumulation, the
    micro-batches after a step still see `global_step % n == 0`, and on resume the first one
    would overwrite `checkpoint_step_N.ckpt` with a state whose data position is one
    micro-batch past its weights. Saving only when the step count has just changed keeps every
    checkpoint at an optimizer-step boundary, which exact resume needs.
    """

    _seen_step: int | None = None
    _start_step: int | None = None  # None until training starts: a restore that fails saves nothing

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self._seen_step = self._start_step = trainer.global_step
        super().on_train_start(trainer, pl_module)

    def stepped_here(self, trainer: L.Trainer) -> bool:
        """A completed optimizer step of this process is not saved yet.

        Before training starts (a restore that failed half-way, or a resume already at max_steps)
        the state in memory is not one a step of this process produced: saving it could replace
        the very checkpoint the run started from with a half-restored one.
        """
        return (
            self._start_step is not None
            and trainer.global_step > self._start_step
            and self._last_global_step_saved != trainer.global_step
        )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self._seen_step:
            return
        self._seen_step = trainer.global_step
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        """`save_last: link`: link last.ckpt to the checkpoint of this very step, else write it.

        Lightning links to the last checkpoint it saved, whatever its step: at an ending off the
        interval (or an epoch end) that would be an older state under the name `last`.
        """
        if self.save_last == "link" and self._last_global_step_saved != trainer.global_step:
            self._last_checkpoint_saved = ""
        super()._save_last_checkpoint(trainer, monitor_candidates)

    @staticmethod
    def _link_checkpoint(trainer: L.Trainer, filepath: str, linkpath: str) -> None:
        """Lightning removes last.ckpt, then links: a kill between the two leaves no `last`."""
        if "://" in str(linkpath) and not str(linkpath).startswith("file://"):
            return ModelCheckpoint._link_checkpoint(trainer, filepath, linkpath)
        if trainer.is_global_zero and Path(filepath).absolute() != Path(linkpath).absolute():
            atomic_link(str(filepath).removeprefix("file://"), str(linkpath).removeprefix("file://"))
        trainer.strategy.barrier()

    def save_final(self, trainer: L.Trainer) -> Path | None:
        """Save last.ckpt now, unless this step is already saved or this process took no step."""
        if not self.stepped_here(trainer):
            return None
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._last_global_step_saved = trainer.global_step
        return Path(self.last_model_path)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        path = self.save_final(trainer)
        if path is not None:
            rank_zero_info(f"saved the final state (step {trainer.global_step}) to {path}")

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        """The state after the last completed step, when it can be saved safely."""
        if isinstance(exception, NonFiniteStop) or trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        if trainer.world_size > 1 and not _rank_zero_saves_alone(trainer):
            return  # a sharded save needs every rank, and the others may be elsewhere
        if not self.stepped_here(trainer):
            return
        if trainer.is_global_zero:  # no barrier: the other ranks may not reach one
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            self.last_model_path = str(Path(self.dirpath) / LAST)
            trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, self.last_model_path)
            rank_zero_info(f"saved the state after step {trainer.global_step} to {self.last_model_path}")
        self._last_global_step_saved = trainer.global_step


def _rank_zero_saves_alone(trainer: L.Trainer) -> bool:
    """DDP keeps the whole state on rank 0; sharded strategies spread it over the ranks."""
    from lightning.pytorch.strategies import DDPStrategy

    return isinstance(trainer.strategy, DDPStrategy)


class BestCheckpoint(_StableState, ModelCheckpoint):
    """best.ckpt: the lowest val/loss so far, kept beside the periodic checkpoints."""

    def __init__(self, dirpath: str) -> None:
        super().__init__(
            dirpath=dirpath,
            filename="best",
            monitor="val/loss",
            mode="min",
            save_top_k=1,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint files written atomically on local disks.

    Lightning's default writer goes through an fsspec transaction whose temporary file lives in
    the system temp folder; when that is another filesystem the final move is a copy, and a job
    killed during the copy leaves a truncated checkpoint under the real name. Remote paths
    (s3://, gs://) keep Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        import torch

        atomic_write(str(path).removeprefix("file://"), lambda stream: torch.save(checkpoint, stream))

    def remove_checkpoint(self, path) -> None:
        if os.path.islink(path):  # a `save_last: link` last.ckpt: the link, never what it points to
            os.unlink(path)
            return
        fs = get_filesystem(path)
        if fs.exists(path):
            fs.rm(path, recursive=True)
