"""Windows over token files: coverage, exactly-once validation scoring, resumable shuffling."""

import numpy as np
import pytest
import torch

from llm_lightning.data.datamodule import accumulation_steps
from llm_lightning.data.windows import (
    ResumableDataLoader,
    ScoredWindows,
    ShuffledShardSampler,
    TokenWindows,
    window_starts,
)
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


def test_sampler_shards_are_disjoint_equal_and_cover_the_epoch():
    shards = [list(ShuffledShardSampler(101, seed=3, rank=r, world_size=4)) for r in range(4)]
    assert len({len(s) for s in shards}) == 1
    seen = [i for shard in shards for i in shard]
    assert len(seen) == len(set(seen)) == 100


def test_sampler_epochs_hold_whole_global_batches():
    # 101 windows, global batch 8 over 2 ranks: 96 windows, 48 per rank, 12 optimizer steps
    shards = [ShuffledShardSampler(101, seed=0, rank=r, world_size=2, global_batch=8) for r in range(2)]
    assert [len(s) for s in shards] == [48, 48]
    assert len(list(shards[0])) == 48


def test_sampler_order_depends_on_seed_and_epoch_only():
    a, b = ShuffledShardSampler(50, seed=1), ShuffledShardSampler(50, seed=1)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    assert list(ShuffledShardSampler(50, seed=2)) != list(a)


def test_dataloader_resumes_where_it_stopped(tmp_path):
    windows = TokenWindows(token_file(tmp_path, 400), "uint16", max_length=8, stride=8)

    def loader():
        return ResumableDataLoader(
            windows, sampler=ShuffledShardSampler(len(windows), seed=0), batch_size=4, drop_last=True
        )

    full = [batch[0] for batch in loader()]
    first = loader()
    iterator = iter(first)
    consumed = [next(iterator)[0] for _ in range(3)]
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    rest = [batch[0] for batch in resumed]
    for expected, actual in zip(full, consumed + rest, strict=True):
        torch.testing.assert_close(expected, actual)
    assert resumed.state_dict()["batches_yielded"] == len(full)


def test_accumulation_steps():
    assert accumulation_steps(32, 8, 2) == 2
    assert accumulation_steps(8, 8, 1) == 1
    with pytest.raises(UserError, match="--data.batch_size 10"):
        accumulation_steps(10, 4, 1)
