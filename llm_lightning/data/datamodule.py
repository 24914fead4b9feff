"""TextDataModule: the prepared token files as Lightning dataloaders.

`vocab_size`, `max_length` and `eos_id` are read from metadata.json in `__init__`, so
LightningCLI can link them into the model before anything is set up. `batch_size` is the
global batch per optimizer step (the seed's meaning); `micro_batch_size` is what one device
holds per forward; `accumulation_steps` turns both into the trainer's accumulation.

Training reads one endless stream of windows (sampler.py); the module's state in a
checkpoint is its position in that stream, counted in windows, plus the tokenizer, so a
resume continues the stream exactly (with any batch split or device count) and never meets
data made with another tokenizer. Data parallelism comes from the strategy
(`distributed_sampler_kwargs`): under tensor parallelism the ranks of one group read the
same micro-batch.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from llm_lightning.data.format import read_metadata, split_path
from llm_lightning.data.sampler import StreamSampler, WindowOrder
from llm_lightning.data.tokenizers import fingerprint, tokenizer_files
from llm_lightning.data.windows import ScoredWindows, TokenWindows
from llm_lightning.errors import UserError


def accumulation_steps(batch_size: int, micro_batch_size: int, data_parallel_size: int) -> int:
    """Micro-batches per optimizer step on each rank, so that the global batch is batch_size."""
    per_pass = micro_batch_size * data_parallel_size
    if batch_size < 1 or micro_batch_size < 1 or batch_size % per_pass:
        raise UserError(
            f"--data.batch_size {batch_size} must be a positive multiple of --data.micro_batch_size "
            f"{micro_batch_size} x {data_parallel_size} data-parallel rank(s) = {per_pass}; change one of them"
        )
    return batch_size // per_pass


class TextDataModule(L.LightningDataModule):
    def __init__(
        self,
        data_dir: str = "./processed_data",
        batch_size: int = 32,
        micro_batch_size: int | None = None,
        stride: int | None = None,
        num_workers: int = 2,
        pin_memory: bool = True,
        seed: int = 1337,
    ) -> None:
        """
        Args:
            data_dir: output folder of `llm-lightning prepare`.
            batch_size: global batch, in sequences per optimizer step (across all devices).
            micro_batch_size: sequences per device per forward pass; defaults to batch_size
                (no accumulation on one device).
            stride: tokens between the starts of consecutive training windows; defaults to the
                stride the data was prepared with.
            num_workers: DataLoader worker processes per device.
            pin_memory: page-locked host memory for faster copies to a GPU.
            seed: seed of the order of training windows.
        """
        super().__init__()
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.metadata = read_metadata(data_dir)
        self.vocab_size: int = self.metadata["vocab_size"]
        self.max_length: int = self.metadata["max_length"]
        self.eos_id: int = self.metadata["eos_id"]
        self.batch_size = batch_size
        self.micro_batch_size = micro_batch_size or batch_size
        self.stride = self.metadata["stride"] if stride is None else stride
        if not 1 <= self.stride <= self.max_length:
            raise UserError(f"--data.stride {self.stride} must be between 1 and max_length {self.max_length}")
        self.num_workers, self.pin_memory, self.seed = num_workers, pin_memory, seed
        self.tokenizer_files = tokenizer_files(data_dir)
        self.tokenizer_fingerprint = fingerprint(self.tokenizer_files)
        self.resume_position = 0  # windows of the stream consumed before this run (from a checkpoint)
        self._stream_start: tuple[int, int] | None = None  # (position, global step) when training started
        self.num_train_windows: int | None = None

    # ----------------------------------------------------------------- geometry
    def data_parallel(self) -> tuple[int, int]:
        """(rank, size) of this process among the data-parallel ranks."""
        strategy = getattr(self.trainer, "strategy", None)
        kwargs = getattr(strategy, "distributed_sampler_kwargs", None) or {}
        return kwargs.get("rank", 0), kwargs.get("num_replicas", 1)

    def accumulation(self) -> int:
        return accumulation_steps(self.batch_size, self.micro_batch_size, self.data_parallel()[1])

    @property
    def position(self) -> int:
        """Windows of the training stream consumed after the last completed optimizer step."""
        if self._stream_start is None:
            return self.resume_position
        start, step = self._stream_start
        return start + (self.trainer.global_step - step) * self.batch_size

    def _windows(self, split: str) -> TokenWindows:
        path = split_path(self.data_dir, split)
        if split == "train":
            windows = TokenWindows(path, self.metadata["dtype"], self.max_length, self.stride)
        else:
            rank, world = self.data_parallel()
            windows = ScoredWindows(path, self.metadata["dtype"], self.max_length, self.stride, rank, world)
        if len(windows) == 0:
            raise UserError(
                f"{path}: fewer than max_length + 1 = {self.max_length + 1} tokens, not one window; "
                "prepare more text or a smaller --max_length"
            )
        return windows

    def _loader_options(self) -> dict:
        return dict(
            batch_size=self.micro_batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    # ----------------------------------------------------------------- loaders
    def train_dataloader(self) -> DataLoader:
        windows = self._windows("train")
        if len(windows) < self.batch_size:
            raise UserError(
                f"{self.data_dir}: {len(windows)} training windows, fewer than one batch of "
                f"{self.batch_size}; lower --data.batch_size or prepare more text"
            )
        rank, world = self.data_parallel()
        self.num_train_windows = len(windows)
        self._stream_start = (self.resume_position, self.trainer.global_step if self.trainer else 0)
        order = WindowOrder(len(windows), self.seed)
        sampler = StreamSampler(order, self.resume_position, self.micro_batch_size, rank, world)
        return DataLoader(windows, sampler=sampler, **self._loader_options())

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._windows("val"), shuffle=False, **self._loader_options())

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def epochs_seen(self) -> float:
        """Passes over the training windows so far (fractional)."""
        return self.position / max(self.num_train_windows or len(self._windows("train")), 1)

    # ----------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict:
        """Saved in every checkpoint: the tokenizer travels with the model, and the stream position."""
        return {
            "metadata": self.metadata,
            "tokenizer_files": self.tokenizer_files,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "position": self.position,
            "stride": self.stride,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Check that the checkpoint meets data made by its own tokenizer; resume the stream."""
        theirs = fingerprint(state["tokenizer_files"]) if state.get("tokenizer_files") else None
        if theirs is not None and theirs != self.tokenizer_fingerprint:
            kind = state.get("metadata", {}).get("tokenizer_type", "another")
            raise UserError(
                f"--data.data_dir {self.data_dir}: prepared with another tokenizer than the checkpoint's "
                f"({self.metadata.get('tokenizer_type')} {self.tokenizer_fingerprint} here, {kind} {theirs} "
                "in the checkpoint); use the data folder the checkpoint was trained on, or prepare this text "
                "with `prepare --tokenizer` pointing at that folder"
            )
        for name in ("stride", "seed"):
            if name in state and state[name] != getattr(self, name) and self._resuming_fit():
                raise UserError(
                    f"--data.{name} {getattr(self, name)}: the checkpoint's run used {state[name]}, and its data "
                    f"position counts windows of that order; resume with --data.{name} {state[name]}"
                )
        then = state.get("metadata", {}).get("num_tokens")
        if then and then != self.metadata.get("num_tokens") and self._resuming_fit():
            raise UserError(
                f"--data.data_dir {self.data_dir}: not the data the checkpoint was trained on ({then} tokens then, "
                f"{self.metadata.get('num_tokens')} now), so its position in the data means other windows; resume "
                "on the same folder, or start a new run from its weights (export, then --model.init_from)"
            )
        self.resume_position = int(state.get("position", 0))

    def _resuming_fit(self) -> bool:
        trainer = self.trainer
        return trainer is not None and trainer.state.fn == "fit"
