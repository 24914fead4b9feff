"""Windows over a flat token file: training pairs, and validation windows that score each token once.

Contract: window i covers tokens [start_i, start_i + max_length + 1) with start_i = i * stride,
and the last window is aligned to the end of the file so no token is left out. Inputs are
the first max_length tokens of a window, targets the last max_length.

Memmaps are opened lazily in the process that reads them: a dataset pickled into a
DataLoader worker carries only the path, never the mapped file.

`TokenWindows` and `ScoredWindows` read one file; `FileWindows` and `ScoredFileWindows` read a
list of files (the shards of a merged folder, the sources of a mixture) as one split, with
windows that never cross from one file into the next. Training uses the latter.
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


class FileWindows(Dataset):
    """The windows of several token files read as one split, numbered one file after the other.

    For a merged folder (one file per shard) and a mixture (the files of every source): a
    window never crosses from one file into the next, and each file's windows follow the
    contract above. Starts are computed rather than stored (billions of tokens make millions
    of windows), and at most `MAX_OPEN` files are mapped at a time in a process (each map
    holds a file descriptor, and a merged folder may have thousands of shards).
    """

    MAX_OPEN = 64

    def __init__(self, paths: list[Path], dtype: str, max_length: int, stride: int) -> None:
        self.paths, self.dtype = [Path(p) for p in paths], np.dtype(dtype)
        self.max_length, self.stride = max_length, stride
        self.sizes = [p.stat().st_size // self.dtype.itemsize for p in self.paths]
        self.counts = [len_windows(n, max_length, stride) for n in self.sizes]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])
        self.num_windows = int(self.offsets[-1])
        self._maps: dict[int, np.ndarray] = {}  # file number -> memmap, least recently used first

    def __len__(self) -> int:
        return self.num_windows

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}}

    def locate(self, index: int) -> tuple[int, int]:
        """(file number, window number within that file) of window `index`."""
        if not 0 <= index < self.num_windows:
            raise IndexError(index)
        number = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return number, index - int(self.offsets[number])

    def start(self, number: int, local: int) -> int:
        last = self.sizes[number] - self.max_length - 1
        return min(local * self.stride, last)  # only the final window is pulled back to the end

    def tokens(self, number: int) -> np.ndarray:
        tokens = self._maps.pop(number, None)
        if tokens is None:
            tokens = np.memmap(self.paths[number], dtype=self.dtype, mode="r")
            if len(self._maps) >= self.MAX_OPEN:
                self._maps.pop(next(iter(self._maps)))
        self._maps[number] = tokens
        return tokens

    def window(self, number: int, local: int) -> torch.Tensor:
        start = self.start(number, local)
        chunk = self.tokens(number)[start : start + self.max_length + 1].astype(np.int64)
        return torch.from_numpy(chunk)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.window(*self.locate(index))
        return chunk[:-1], chunk[1:]


class ScoredFileWindows(FileWindows):
    """Validation over several files: each token of each file scored exactly once, with its source.

    Items are (inputs, targets, scored mask, source index): `sources[f]` is the source of file
    f, so a mixture can report each source's loss. Dealt to ranks as `ScoredWindows` does,
    round-robin over all files' windows together, with zero-mask padding (source 0) so that
    every rank runs the same number of batches.
    """

    def __init__(
        self, paths, sources: list[int], dtype, max_length, stride, rank: int = 0, world_size: int = 1
    ):
        super().__init__(paths, dtype, max_length, stride)
        self.sources, self.rank, self.world_size = list(sources), rank, world_size

    def __len__(self) -> int:
        return math.ceil(self.num_windows / self.world_size)

    def __getitem__(self, index: int):
        global_index = self.rank + index * self.world_size
        if global_index >= self.num_windows:
            chunk = self.window(0, 0)
            return chunk[:-1], chunk[1:], torch.zeros(self.max_length, dtype=torch.bool), torch.tensor(0)
        number, local = self.locate(global_index)
        chunk = self.window(number, local)
        return chunk[:-1], chunk[1:], self.scored_mask(number, local), torch.tensor(self.sources[number])

    def scored_mask(self, number: int, local: int) -> torch.Tensor:
        if local == 0:
            return torch.ones(self.max_length, dtype=torch.bool)
        start = self.start(number, local)
        already_scored_until = self.start(number, local - 1) + self.max_length + 1
        return torch.arange(start + 1, start + self.max_length + 1) >= already_scored_until


def len_windows(num_tokens: int, max_length: int, stride: int) -> int:
    """How many windows `window_starts` gives, without making them."""
    span = max_length + 1
    if num_tokens < span:
        return 0
    return (num_tokens - span) // stride + 1 + ((num_tokens - span) % stride != 0)
