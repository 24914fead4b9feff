"""TextDataModule: the prepared token files as Lightning dataloaders.

`vocab_size`, `max_length` and `eos_id` are read from metadata.json in `__init__`, so
LightningCLI can link them into the model before anything is set up. `batch_size` is the
global batch per optimizer step (the seed's meaning); `micro_batch_size` is what one device
holds per forward. The trainer's accumulation is derived from both (`accumulation_steps`).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from llm_lightning.data.windows import ResumableDataLoader, ScoredWindows, ShuffledShardSampler, TokenWindows
from llm_lightning.errors import UserError

METADATA = "metadata.json"


def read_metadata(data_dir: str | Path) -> dict:
    """metadata.json of a prepared folder; its presence is what marks the folder complete."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"--data.data_dir {data_dir}: no such folder; run `llm-lightning prepare` first")
    path = data_dir / METADATA
    if not path.is_file():
        raise UserError(
            f"--data.data_dir {data_dir}: no {METADATA}, so this is not a complete `llm-lightning prepare` "
            "output (or preparing was interrupted); run prepare again"
        )
    try:
        metadata = json.loads(path.read_text())
        for key in ("vocab_size", "max_length", "stride", "dtype", "eos_id"):
            metadata[key]  # noqa: B018 - presence check
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise UserError(f"{path}: unreadable or incomplete metadata ({error}); run prepare again") from None
    for split in ("train", "val"):
        if not (data_dir / "dataset" / f"{split}.bin").is_file():
            raise UserError(f"{data_dir}/dataset/{split}.bin is missing; run prepare again")
    return metadata


def accumulation_steps(batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Micro-batches per optimizer step on each device, so that the global batch is batch_size."""
    per_pass = micro_batch_size * world_size
    if batch_size < 1 or micro_batch_size < 1 or batch_size % per_pass:
        raise UserError(
            f"--data.batch_size {batch_size} must be a positive multiple of --data.micro_batch_size "
            f"{micro_batch_size} x {world_size} device(s) = {per_pass}; change one of them"
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
            seed: seed of the per-epoch shuffle of training windows.
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
        self.stride = stride or self.metadata["stride"]
        if not 1 <= self.stride <= self.max_length:
            raise UserError(f"--data.stride {self.stride} must be between 1 and max_length {self.max_length}")
        self.num_workers, self.pin_memory, self.seed = num_workers, pin_memory, seed

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _windows(self, split: str) -> TokenWindows:
        path = self.data_dir / "dataset" / f"{split}.bin"
        rank, world = self._rank_and_world()
        if split == "train":
            windows = TokenWindows(path, self.metadata["dtype"], self.max_length, self.stride)
        else:
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

    def train_dataloader(self) -> DataLoader:
        windows = self._windows("train")
        rank, world = self._rank_and_world()
        sampler = ShuffledShardSampler(len(windows), self.seed, rank, world, global_batch=self.batch_size)
        if len(sampler) == 0:
            raise UserError(
                f"{self.data_dir}: {len(windows)} training windows, fewer than one batch of "
                f"{self.batch_size}; lower --data.batch_size or prepare more text"
            )
        # drop_last: every batch has the same shape (no recompiles) and every rank the same count
        return ResumableDataLoader(windows, sampler=sampler, drop_last=True, **self._loader_options())

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._windows("val"), shuffle=False, **self._loader_options())

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def state_dict(self) -> dict:
        """Saved in every checkpoint: the tokenizer travels with the model it was trained with."""
        from llm_lightning.data.tokenizer import tokenizer_files

        return {"metadata": self.metadata, "tokenizer_files": tokenizer_files(self.data_dir)}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore: the data folder given now is the source of truth."""
