"""Windows over a flat token file: training pairs, and validation windows that score each token once.

Contract: window i covers tokens [start_i, start_i + max_length + 1) with start_i = i * stride,
and the last window is aligned to the end of the file so no token is left out. Inputs are
the first max_length tokens of a window, targets the last max_length.

Memmaps are opened lazily in the process that reads them: a dataset pickled into a
DataLoader worker carries only the path, never the mapped file.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset


def window_starts(num_tokens: int, max_length: int, stride: int) -> np.ndarray:
    """First token of each window; the last one ends exactly at the end of the file."""
    span = max_length + 1
    if num_tokens < span:
        return np.zeros(0, dtype=np.int64)
    starts = np.arange(0, num_tokens - span + 1, stride, dtype=np.int64)
    if starts[-1] != num_tokens - span:
        starts = np.append(starts, num_tokens - span)
    return starts


class TokenWindows(Dataset):
    """(inputs, targets) pairs of int64 tensors, max_length long, from a token file."""

    def __init__(self, path: Path, dtype: str, max_length: int, stride: int) -> None:
        self.path, self.dtype, self.max_length = Path(path), np.dtype(dtype), max_length
        num_tokens = self.path.stat().st_size // self.dtype.itemsize
        self.starts = window_starts(num_tokens, max_length, stride)
        self._tokens: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        return self._tokens

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}

    def window(self, index: int) -> torch.Tensor:
        start = int(self.starts[index])
        chunk = self.tokens[start : start + self.max_length + 1].astype(np.int64)
        return torch.from_numpy(chunk)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.window(index)
        return chunk[:-1], chunk[1:]


class ScoredWindows(TokenWindows):
    """Validation windows with a mask that scores every token of the split exactly once.

    Overlapping windows (stride < max_length) each see more context, but only targets
    beyond the previous window's end count. The windows are dealt round-robin to ranks; a
    rank that runs out gets padding windows with an all-zero mask, so every rank runs the same
    number of batches (uneven counts can hang DDP) and padding adds nothing to the loss.
    """

    def __init__(self, path, dtype, max_length, stride, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(path, dtype, max_length, stride)
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return math.ceil(len(self.starts) / self.world_size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        global_index = self.rank + index * self.world_size
        if global_index >= len(self.starts):
            inputs, targets = super().__getitem__(0)
            return inputs, targets, torch.zeros(self.max_length, dtype=torch.bool)
        inputs, targets = super().__getitem__(global_index)
        return inputs, targets, self.scored_mask(global_index)

    def scored_mask(self, index: int) -> torch.Tensor:
        start = int(self.starts[index])
        if index == 0:
            return torch.ones(self.max_length, dtype=torch.bool)
        already_scored_until = int(self.starts[index - 1]) + self.max_length + 1
        target_positions = torch.arange(start + 1, start + self.max_length + 1)
        return target_positions >= already_scored_until
