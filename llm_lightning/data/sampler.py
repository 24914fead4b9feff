"""The order of training windows: one endless, seeded stream, and a position in it.

The stream is the same for every run with the same data and seed, whatever the batch sizes
or the number of devices: epoch e is a seeded permutation of all windows, and epochs follow
one another. A run's progress is its *position*: how many windows of the stream it has
consumed. Each optimizer step takes the next `batch_size` windows, cut into micro-batches
that are dealt to the data-parallel ranks:

    step s, micro-batch round j, rank r  ->  positions  P + s*B + j*m*W + r*m + [0, m)

(P the position the run started at, B the global batch, m the micro-batch, W the
data-parallel size; accumulation k = B / (m*W) rounds per step). So a resume with another
micro-batch, batch size or device count continues exactly where the stream stopped: no
window is read twice or skipped, and an epoch boundary may fall inside a step.

`WindowOrder` maps positions to window indices; a mixture of sources (`MixtureOrder`) is
another such order.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


class WindowOrder:
    """Position in the stream -> window index: epoch e is permutation(seed + e) of the windows."""

    def __init__(self, num_windows: int, seed: int) -> None:
        self.num_windows, self.seed = num_windows, seed
        self._epoch, self._permutation = -1, None

    def epoch(self, position: int) -> int:
        return position // self.num_windows

    def __call__(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_windows)
        if epoch != self._epoch:  # one permutation in memory at a time
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._permutation = torch.randperm(self.num_windows, generator=generator).numpy()
            self._epoch = epoch
        return int(self._permutation[offset])


class StreamSampler(Sampler[int]):
    """This rank's window indices, from `start` on, forever (see the module docstring)."""

    def __init__(self, order, start: int, micro_batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        self.order, self.start = order, start
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size

    def __iter__(self) -> Iterator[int]:
        m, round_size = self.micro_batch_size, self.micro_batch_size * self.world_size
        position = self.start + self.rank * m
        while True:
            for offset in range(m):
                yield self.order(position + offset)
            position += round_size


def positions_read(start: int, steps: int, batch_size: int) -> np.ndarray:
    """The stream positions a run that started at `start` consumed in `steps` optimizer steps."""
    return np.arange(start, start + steps * batch_size)
