"""Mixtures of data folders: the MixtureOrder's shares, repeats and resume; windows over many files;
the data module over a list of folders (names, checks, worker counts, per-source epochs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from llm_lightning.data.datamodule import TextDataModule
from llm_lightning.data.mixture import source_names
from llm_lightning.data.prepare import prepare
from llm_lightning.data.sampler import MIXTURE_BLOCK, MixtureOrder, StreamSampler, WindowOrder
from llm_lightning.data.windows import FileWindows, ScoredFileWindows, TokenWindows, window_starts
from llm_lightning.errors import UserError
from tests.conftest import synthetic_documents, write_corpus


def take(sampler, count: int) -> list[int]:
    iterator = iter(sampler)
    return [next(iterator) for _ in range(count)]


def sources_of(order: MixtureOrder, indices: list[int]) -> np.ndarray:
    return np.searchsorted(order.offsets, indices, side="right") - 1


# ------------------------------------------------------------------------------ the order
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_75_25_mixture_draws_each_source_by_its_weight(seed):
    """The stated tolerance: exact to 1 window (two sources) at every multiple of 64 positions,
    and within (S + 32) / L of the weight over any L positions."""
    order = MixtureOrder([3000, 500], [0.75, 0.25], seed)
    epoch = 3500  # one pass's worth of positions
    drawn = sources_of(order, [order(p) for p in range(epoch)])
    share = np.mean(drawn == 0)
    assert abs(share - 0.75) <= (2 + MIXTURE_BLOCK / 2) / epoch
    for end in range(MIXTURE_BLOCK, epoch, MIXTURE_BLOCK):
        assert abs(np.count_nonzero(drawn[:end] == 0) - 0.75 * end) <= 1
    assert order.drawn(epoch) == [np.count_nonzero(drawn == 0), np.count_nonzero(drawn == 1)]
    # source 1 (500 windows) ran out after its first 500 draws and repeats: each pass is a permutation
    ones = [order(p) - 3000 for p in range(epoch) if drawn[p] == 1]
    assert sorted(ones[:500]) == list(range(500)) and sorted(ones[500:]) == sorted(set(ones[500:]))
    assert ones[500:] != ones[: len(ones) - 500]


def test_any_weights_are_exact_to_a_few_windows_at_block_ends():
    weights = [0.5, 0.2, 0.299, 0.001]
    order = MixtureOrder([10**6] * 4, weights, 7)
    for n in (64, 6400, 64 * 10**7):
        drawn = order.drawn(n)
        assert sum(drawn) == n
        assert all(abs(d - w * n) < len(weights) for d, w in zip(drawn, weights, strict=True))


def test_one_source_is_the_plain_stream_and_far_positions_are_cheap():
    mixture, plain = MixtureOrder([50], None, 3), WindowOrder(50, 3)
    assert [mixture(p) for p in range(200)] == [plain(p) for p in range(200)]
    far = MixtureOrder([1000, 300], None, 0)  # default weights: proportional to the sizes
    assert far.drawn(1300 * 10**9) == [1000 * 10**9, 300 * 10**9]
    assert 0 <= far(10**15 + 5) < 1300  # no replay of the draws before it


@pytest.mark.parametrize("micro, world", [(2, 1), (4, 2), (1, 4)])
def test_a_mixture_resumes_exactly_with_any_batch_split(micro, world):
    order = MixtureOrder([37, 20], [0.75, 0.25], 5)
    straight = take(StreamSampler(order, start=0, micro_batch_size=8), 8 * 12)
    before = take(StreamSampler(MixtureOrder([37, 20], [0.75, 0.25], 5), 0, micro_batch_size=8), 8 * 5)
    resumed = MixtureOrder([37, 20], [0.75, 0.25], 5)  # a new process: nothing cached
    per_rank = 8 // world
    after = [take(StreamSampler(resumed, 40, micro, r, world), per_rank * 7) for r in range(world)]
    for step in range(7):  # each optimizer step of 8 reads the same windows as the straight run
        got = sorted(i for rank in after for i in rank[step * per_rank : (step + 1) * per_rank])
        assert got == sorted(straight[40 + 8 * step : 48 + 8 * step])
    assert before == straight[:40]


# ------------------------------------------------------------------------------ windows over many files
def token_files(tmp_path, lengths: list[int]) -> list:
    paths, start = [], 0
    for i, n in enumerate(lengths):
        paths.append(tmp_path / f"part{i}.bin")
        np.arange(start, start + n, dtype=np.uint16).tofile(paths[-1])
        start += n
    return paths


def test_file_windows_are_each_files_windows_and_never_straddle(tmp_path):
    lengths, max_length, stride = [50, 9, 8, 103], 8, 3
    paths = token_files(tmp_path, lengths)
    windows = FileWindows(paths, "uint16", max_length, stride)
    expected = [TokenWindows(p, "uint16", max_length, stride) for p in paths]
    assert len(windows) == sum(len(w) for w in expected) and windows.counts[2] == 0
    flat = [w[i] for w in expected for i in range(len(w))]
    for index, (inputs, targets) in enumerate(flat):
        got = windows[index]
        assert torch.equal(got[0], inputs) and torch.equal(got[1], targets)
    assert all(
        len(window_starts(n, max_length, stride)) == c for n, c in zip(lengths, windows.counts, strict=True)
    )
    windows.MAX_OPEN = 1  # reopening files as they are needed gives the same windows
    assert all(torch.equal(windows[i][0], flat[i][0]) for i in range(0, len(flat), 7))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_scored_file_windows_score_every_token_of_every_file_once(tmp_path, world_size):
    lengths, max_length, stride = [50, 9, 103], 8, 3
    paths = token_files(tmp_path, lengths)
    scored, seen = np.zeros(sum(lengths), dtype=int), set()
    counts = set()
    for rank in range(world_size):
        windows = ScoredFileWindows(paths, [0, 1, 1], "uint16", max_length, stride, rank, world_size)
        counts.add(len(windows))
        for i in range(len(windows)):
            _, targets, mask, source = windows[i]
            np.add.at(scored, targets[mask].numpy(), 1)
            if mask.any():
                seen.add((int(targets[mask][0]) >= 50, int(source)))
    starts = np.cumsum([0, *lengths[:-1]])
    assert len(counts) == 1 and np.all(scored[starts] == 0)  # a file's first token is never a target
    assert np.all(np.delete(scored, starts) == 1)
    assert seen == {(False, 0), (True, 1)}


# ------------------------------------------------------------------------------ the data module
@pytest.fixture(scope="module")
def other_dir(prepared_dir, tmp_path_factory):
    """Other text, prepared with prepared_dir's tokenizer: a second source."""
    raw = write_corpus(tmp_path_factory.mktemp("other_raw"), synthetic_documents(60, seed=3))
    out = tmp_path_factory.mktemp("other") / "code"
    return prepare(
        raw, out, tokenizer=prepared_dir, max_length=32, stride=32, val_fraction=0.2, num_workers=0, seed=0
    )


def batches(data: TextDataModule, count: int) -> list[torch.Tensor]:
    loader = data.train_dataloader()
    iterator = iter(loader)
    return [next(iterator)[0] for _ in range(count)]


def test_a_mixture_is_the_same_for_any_worker_count(prepared_dir, other_dir):
    runs = []
    for workers in (0, 2):
        data = TextDataModule([str(prepared_dir), str(other_dir)], weights=[0.75, 0.25], batch_size=8,
                              num_workers=workers, seed=11)  # fmt: skip
        runs.append(batches(data, 12))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_a_mixture_module_names_counts_and_checks(prepared_dir, other_dir):
    data = TextDataModule([str(prepared_dir), str(other_dir)], weights=[3, 1], batch_size=8, num_workers=0)
    assert data.source_names == ["processed_data", "code"] and data.weights == [0.75, 0.25]
    windows, sizes = data.train_windows()
    data.resume_position = 640
    epochs = data.epochs_by_source()
    assert epochs == {"train/epochs/processed_data": 480 / sizes[0], "train/epochs/code": 160 / sizes[1]}
    val = data.val_windows()
    tags = [int(val[i][3]) for i in range(len(val))]
    assert tags == sorted(tags) and set(tags) == {0, 1}  # each window knows its folder
    state = data.state_dict()
    assert (
        state["weights"] == [0.75, 0.25]
        and [s["name"] for s in state["metadata"]["sources"]] == data.source_names
    )
    with pytest.raises(UserError, match="lists .* twice"):
        TextDataModule([str(prepared_dir), str(prepared_dir)])
    single = TextDataModule(str(prepared_dir), batch_size=8, num_workers=0)
    assert single.epochs_by_source() == {} and single.source_names == ["processed_data"]


def test_folders_that_share_a_name_get_their_index():
    assert source_names([Path("a/data"), Path("b/web"), Path("c/data")]) == ["data-0", "web", "data-2"]
