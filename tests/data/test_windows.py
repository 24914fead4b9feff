"""Windows over token files: coverage, exactly-once validation scoring; the stream of training windows."""

import numpy as np
import pytest
import torch

from llm_lightning.data.datamodule import accumulation_steps
from llm_lightning.data.sampler import StreamSampler, WindowOrder
from llm_lightning.data.windows import ScoredWindows, TokenWindows, window_starts
from llm_lightning.errors import UserError


def token_file(tmp_path, n: int):
    path = tmp_path / "tokens.bin"
    np.arange(n, dtype=np.uint16).tofile(path)
    return path


@pytest.mark.parametrize(
    "n, max_length, stride", [(100, 8, 8), (100, 8, 3), (101, 10, 10), (9, 8, 4), (57, 16, 1)]
)
def test_windows_cover_every_token_and_the_last_ends_at_the_end(n, max_length, stride):
    starts = window_starts(n, max_length, stride)
    assert starts[0] == 0 and starts[-1] == n - max_length - 1
    assert np.all(np.diff(starts) <= stride) and np.all(np.diff(starts) > 0)


def test_too_short_file_has_no_window():
    assert len(window_starts(8, 8, 4)) == 0


def test_inputs_and_targets_are_shifted_by_one(tmp_path):
    windows = TokenWindows(token_file(tmp_path, 50), "uint16", max_length=8, stride=4)
    inputs, targets = windows[2]
    assert inputs.tolist() == list(range(8, 16)) and targets.tolist() == list(range(9, 17))
    assert inputs.dtype == torch.int64


@pytest.mark.parametrize("stride", [1, 3, 8])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_validation_scores_every_target_token_exactly_once(tmp_path, stride, world_size):
    n, max_length = 103, 8
    path = token_file(tmp_path, n)
    scored = np.zeros(n, dtype=int)
    for rank in range(world_size):
        windows = ScoredWindows(path, "uint16", max_length, stride, rank, world_size)
        assert len(windows) == len(ScoredWindows(path, "uint16", max_length, stride, 0, world_size))
        for i in range(len(windows)):
            _, targets, mask = windows[i]
            np.add.at(scored, targets[mask].numpy(), 1)
    assert scored[0] == 0 and np.all(scored[1:] == 1)


def take(sampler, count: int) -> list[int]:
    iterator = iter(sampler)
    return [next(iterator) for _ in range(count)]


def test_stream_is_a_permutation_per_epoch_seeded_by_epoch():
    order = WindowOrder(50, seed=1)
    first, second = [order(p) for p in range(50)], [order(p) for p in range(50, 100)]
    assert sorted(first) == sorted(second) == list(range(50))
    assert first != second
    assert [WindowOrder(50, seed=1)(p) for p in range(100)] == first + second
    assert [WindowOrder(50, seed=2)(p) for p in range(50)] != first


def test_ranks_read_disjoint_micro_batches_of_one_global_step():
    """2 ranks x micro 4 x accumulation 2 read, per step, exactly the step's 16 windows of the stream."""
    order = WindowOrder(101, seed=3)
    ranks = [
        take(StreamSampler(order, start=0, micro_batch_size=4, rank=r, world_size=2), 4 * 2 * 5)
        for r in range(2)
    ]
    one = take(StreamSampler(order, start=0, micro_batch_size=16), 16 * 5)
    for step in range(5):
        both = ranks[0][step * 8 : (step + 1) * 8] + ranks[1][step * 8 : (step + 1) * 8]
        assert sorted(both) == sorted(one[step * 16 : (step + 1) * 16])


@pytest.mark.parametrize("micro, world", [(2, 1), (4, 2), (1, 4), (8, 1)])
def test_a_resume_with_another_batch_split_continues_the_same_stream(micro, world):
    """Read 12 windows with micro-batches of 4 on 1 rank, then resume at position 12 with any split:
    together they read the first windows of the stream once each, none skipped."""
    order = WindowOrder(37, seed=0)
    before = take(StreamSampler(order, start=0, micro_batch_size=4), 12)
    after = [take(StreamSampler(order, start=12, micro_batch_size=micro, rank=r, world_size=world), 2 * micro)
             for r in range(world)]  # fmt: skip
    read = before + [i for part in after for i in part]
    assert sorted(read) == sorted(order(p) for p in range(len(read)))
    assert len(read) == len(set(read))  # 12 + 2 x 8 windows < one epoch of 37: no repeats


def test_accumulation_steps():
    assert accumulation_steps(32, 8, 2) == 2
    assert accumulation_steps(8, 8, 1) == 1
    with pytest.raises(UserError, match="--data.batch_size 10"):
        accumulation_steps(10, 4, 1)
