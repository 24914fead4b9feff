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
another such order. Both are pure functions of the position, cheap at any position (a resume
never replays draws), and run in the main process only: the stream is the same for any
number of DataLoader workers.

The mixture: sources s = 0..S-1 with n_s windows (numbered one source after the other) and
integer weights q_s. The stream is cut into blocks of `MIXTURE_BLOCK` = 64 positions. How many
of the first N positions belong to source s is fixed by stick-breaking with floors:

    T_0(N) = floor(N q_0 / Q_0),  T_1(N) = floor((N - T_0) q_1 / Q_1),  ...,  T_{S-1}(N) = the rest

(Q_s = q_s + ... + q_{S-1}). Each T_s is non-decreasing in N, they sum to N, and T_s(N) is
within S-1 of N q_s / Q_0 (within 1 for two sources). Block b holds T_s(64(b+1)) - T_s(64b)
positions of source s, in an order shuffled by (seed, b). So at every multiple of 64
positions each source's share is exact to S-1 windows, and over any L positions it is within
(S + 32) / L of its weight (a part block can be off by half a block). The k-th window drawn
from source s is position k of that source's own stream, a `WindowOrder` with seed
seed + s * 2**32 (source 0: `seed`, so one source alone is exactly the stream above); a source
that runs out starts its next epoch, so epochs are counted per source (`drawn`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from fractions import Fraction

import numpy as np
import torch
from torch.utils.data import Sampler

MIXTURE_BLOCK = 64


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


class MixtureOrder:
    """Position in the stream -> window index of one source, each source drawn by its weight.

    `sizes[s]`: windows of source s (numbered after those of sources 0..s-1); `weights[s] >= 0`,
    not all 0 (None: proportional to the sizes, i.e. one concatenated dataset). See the module
    docstring for the scheme and its tolerance.
    """

    def __init__(self, sizes: list[int], weights: list[float] | None, seed: int) -> None:
        self.sizes = [int(n) for n in sizes]
        self.quotas = integer_weights(self.sizes if weights is None else weights)
        if any(q and not n for q, n in zip(self.quotas, self.sizes, strict=True)):
            raise ValueError("a source with a positive weight has no windows")
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)]).tolist()
        self.orders = [WindowOrder(n, seed + s * 2**32) for s, n in enumerate(self.sizes)]
        self.seed = seed
        self._block: int | None = None
        self._labels = self._ranks = self._before = None

    def drawn(self, position: int) -> list[int]:
        """How many windows of each source positions 0..position-1 hold."""
        block, offset = divmod(position, MIXTURE_BLOCK)
        counts = self._cumulative(block * MIXTURE_BLOCK)
        if offset:
            labels = self._layout(block)[0][:offset]
            counts = [c + int(np.count_nonzero(labels == s)) for s, c in enumerate(counts)]
        return counts

    def source(self, position: int) -> int:
        return int(self._layout(position // MIXTURE_BLOCK)[0][position % MIXTURE_BLOCK])

    def __call__(self, position: int) -> int:
        labels, ranks, before = self._layout(position // MIXTURE_BLOCK)
        offset = position % MIXTURE_BLOCK
        s = int(labels[offset])
        return self.offsets[s] + self.orders[s](before[s] + int(ranks[offset]))

    def _cumulative(self, n: int) -> list[int]:
        """T_s(n): positions of each source among the first n (stick-breaking with floors)."""
        counts, rest, remaining = [], n, sum(self.quotas)
        for quota in self.quotas[:-1]:
            take = rest * quota // remaining if remaining else 0
            counts.append(take)
            rest, remaining = rest - take, remaining - quota
        return [*counts, rest]

    def _layout(self, block: int):
        """For one block: each offset's source, its rank among that source's offsets, and the
        source's draws before the block. One block is kept (the sampler reads positions in order)."""
        if block != self._block:
            before = self._cumulative(block * MIXTURE_BLOCK)
            after = self._cumulative((block + 1) * MIXTURE_BLOCK)
            labels = np.repeat(
                np.arange(len(self.sizes)), [a - b for a, b in zip(after, before, strict=True)]
            )
            generator = torch.Generator().manual_seed(derived_seed(self.seed, "mixture block", block))
            labels = labels[torch.randperm(MIXTURE_BLOCK, generator=generator).numpy()]
            ranks = np.zeros(MIXTURE_BLOCK, dtype=np.int64)
            for s in range(len(self.sizes)):
                where = np.flatnonzero(labels == s)
                ranks[where] = np.arange(len(where))
            self._block, self._labels, self._ranks, self._before = block, labels, ranks, before
        return self._labels, self._ranks, self._before


def integer_weights(weights: list[float]) -> list[int]:
    """Weights as integers in the same proportions (exact for sizes and for decimals such as 0.75)."""
    fractions = [Fraction(w).limit_denominator(10**6) for w in weights]
    scale = math.lcm(*(f.denominator for f in fractions))
    return [int(f * scale) for f in fractions]


def derived_seed(seed: int, *keys) -> int:
    text = "\0".join(map(str, (seed, *keys))).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") >> 2


def make_order(sizes: list[int], weights: list[float] | None, seed: int) -> WindowOrder | MixtureOrder:
    """The stream's order: one source's `WindowOrder` (today's stream), or a `MixtureOrder`."""
    return WindowOrder(sizes[0], seed) if len(sizes) == 1 else MixtureOrder(sizes, weights, seed)


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
