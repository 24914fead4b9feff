"""Training on a merged folder and on a 0.75 / 0.25 mixture through the real CLI: per-source logs,
true per-source val losses, exact resume, and 2 DDP processes equal to 1 process accumulating.

The sources: `processed_data` (the session's prepared folder) and `books`, other text prepared
with the same tokenizer as 3 shards and merged. The DDP tolerances are test_ddp.py's (same
reasons: one rounding per sum of a different grouping, fp32).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from llm_lightning.data.format import read_metadata, split_files
from llm_lightning.data.prepare import prepare
from llm_lightning.data.sampler import MixtureOrder
from llm_lightning.data.windows import FileWindows, ScoredWindows
from llm_lightning.io.checkpoint import load_checkpoint, load_model
from tests.conftest import (
    TINY_FIT,
    assert_same_weights,
    fit_flags,
    records,
    run_cli,
    synthetic_documents,
    weights,
)
from tests.conftest import write_corpus as write_raw
from tests.distributed.conftest import DIST_ENV, TIMEOUT, check, val_losses
from tests.probes import recorded

WEIGHTS = "[0.75,0.25]"
NAMES = ("processed_data", "books")


@pytest.fixture(scope="module")
def books(prepared_dir, tmp_path_factory) -> Path:
    """Other text as a merged folder of 3 shards, with prepared_dir's tokenizer."""
    from llm_lightning.tools.merge_shards import merge

    raw = write_raw(tmp_path_factory.mktemp("books_raw"), synthetic_documents(90, seed=7, sentences=8))
    out = tmp_path_factory.mktemp("books") / "books"
    for index in range(3):
        prepare(raw, out, tokenizer=prepared_dir, max_length=32, stride=32, val_fraction=0.15, seed=0,
                num_workers=0, num_shards=3, shard_index=index, progress=False)  # fmt: skip
    merge(out)
    return out


def mixture_fit(prepared_dir: Path, books: Path, run_dir: Path, *extra, env: dict | None = None) -> Path:
    ckpt_dir = run_dir / "ckpts"
    flags = fit_flags(f"[{prepared_dir},{books}]", ckpt_dir, "--data.weights", WEIGHTS, "--trainer.accelerator", "cpu",
                      "--model.max_steps", 20, *extra)  # fmt: skip
    check(run_cli("fit", *flags, cwd=run_dir, timeout=TIMEOUT, env=env))
    return ckpt_dir


@pytest.fixture(scope="module")
def single_run(prepared_dir, books, tmp_path_factory) -> Path:
    """20 steps of global batch 8 on one process: micro-batches of 4, accumulated in pairs."""
    return mixture_fit(prepared_dir, books, tmp_path_factory.mktemp("mixture_single"))


def scored_tokens(folder: Path) -> int:
    return sum(
        n - 1 for n in FileWindows(split_files(folder, read_metadata(folder), "val"), "uint16", 32, 32).sizes
    )


def bytes_per_token(folder: Path) -> float:
    metadata = read_metadata(folder)
    return metadata["num_bytes"]["val"] / metadata["num_tokens"]["val"]


def true_val_loss(checkpoint: Path, folder: Path) -> float:
    """Per-token loss of a folder's val split, computed here with plain torch (not the module's code)."""
    model, metadata = load_model(load_checkpoint(checkpoint)), read_metadata(folder)
    total = count = 0.0
    with torch.no_grad():
        for path in split_files(folder, metadata, "val"):
            windows = ScoredWindows(path, metadata["dtype"], metadata["max_length"], metadata["stride"])
            for inputs, targets, mask in DataLoader(windows, batch_size=16):
                logits = model(inputs).float()
                losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
                total += float((losses * mask).sum())
                count += float(mask.sum())
    return total / count


def test_fit_on_a_merged_folder(books, tmp_path):
    ckpt_dir = tmp_path / "ckpts"
    check(run_cli("fit", *fit_flags(books, ckpt_dir, steps=4), cwd=tmp_path))
    (val,) = records(ckpt_dir, "val")
    assert val["step"] == 4 and val["val/loss"] > 0 and "val/loss/books" not in val  # one source
    assert load_checkpoint(ckpt_dir / "last.ckpt")["global_step"] == 4


def test_a_mixture_logs_each_sources_loss_and_epochs(single_run, prepared_dir, books):
    vals = records(single_run, "val")
    assert [r["step"] for r in vals] == [10, 20]
    counts = [scored_tokens(prepared_dir), scored_tokens(books)]
    for record in vals:  # val/loss: the per-token loss of all val tokens together
        parts = [record[f"val/loss/{name}"] for name in NAMES]
        assert record["val/loss"] == pytest.approx(
            sum(loss * n for loss, n in zip(parts, counts, strict=True)) / sum(counts), abs=1e-5
        )
        # bits per byte over both: each source's scored tokens stand for its own bytes per token
        text_bytes = sum(n * bytes_per_token(f) for n, f in zip(counts, (prepared_dir, books), strict=True))
        nats = sum(loss * n for loss, n in zip(parts, counts, strict=True))
        assert record["val/bpb"] == pytest.approx(nats / (math.log(2) * text_bytes), rel=1e-5)
    sizes = [
        len(FileWindows(split_files(f, read_metadata(f), "train"), "uint16", 32, 32))
        for f in (prepared_dir, books)
    ]
    order = MixtureOrder(sizes, [0.75, 0.25], 1337)
    for record in records(single_run, "train"):
        drawn = order.drawn(record["step"] * 8)
        for name, count, size in zip(NAMES, drawn, sizes, strict=True):
            assert record[f"train/epochs/{name}"] == pytest.approx(count / size)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (single_run.parent / "logs").rglob("events.out.tfevents.*")
    tags = EventAccumulator(str(events)).Reload().Tags()["scalars"]
    assert {"val/loss", "val/loss/books", "val/loss/processed_data", "train/epochs/books"} <= set(tags)
    shown = run_cli("monitor", "--checkpoint_dir", single_run)
    assert "val loss books" in shown.stdout and "epochs of processed_data" in shown.stdout


def test_per_source_val_losses_are_each_folders_true_loss(single_run, prepared_dir, books, tmp_path):
    last, logged = single_run / "last.ckpt", records(single_run, "val")[-1]
    assert logged["val/loss/processed_data"] == pytest.approx(true_val_loss(last, prepared_dir), abs=1e-5)
    assert logged["val/loss/books"] == pytest.approx(true_val_loss(last, books), abs=1e-5)
    # and `validate` on the merged folder alone says the same
    check(run_cli(
        "validate", *TINY_FIT, "--data.data_dir", books, "--ckpt_path", last, "--trainer.accelerator", "cpu",
        "--checkpoint.dirpath", tmp_path / "unused", "--trainer.default_root_dir", tmp_path / "logs",
        "--trainer.callbacks+=tests.probes.RecordMetrics", "--trainer.callbacks.path", tmp_path / "metrics.jsonl",
        cwd=tmp_path,
    ))  # fmt: skip
    assert [r["val/loss"] for r in recorded(tmp_path / "metrics.jsonl")] == [
        pytest.approx(logged["val/loss/books"], abs=1e-5)
    ]


def test_a_mixture_resumes_exactly(single_run, prepared_dir, books, tmp_path):
    """10 steps, then a resume from that checkpoint to 20: the same weights, bit for bit."""
    (tmp_path / "ckpts").mkdir()
    shutil.copy(single_run / "checkpoint_step_10.ckpt", tmp_path / "ckpts" / "last.ckpt")
    resumed = mixture_fit(prepared_dir, books, tmp_path, "--ckpt_path", "last")
    assert [r["step"] for r in records(resumed, "start")] == [10]
    assert_same_weights(single_run / "last.ckpt", resumed / "last.ckpt")
    final = [
        {k: v for k, v in records(run, "val")[-1].items() if k.startswith("val/")}
        for run in (single_run, resumed)
    ]
    assert final[0] == final[1]


def test_a_mixture_on_two_ddp_processes_equals_one_process_accumulating(
    single_run, prepared_dir, books, tmp_path
):
    ddp = mixture_fit(
        prepared_dir, books, tmp_path, "--trainer.strategy", "ddp", "--trainer.devices", 2, env=DIST_ENV
    )
    assert records(ddp, "start")[0]["world_size"] == 2
    one, two = records(single_run, "val"), records(ddp, "val")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [10, 20]
    for a, b in zip(one, two, strict=True):
        for key in ("val/loss", *(f"val/loss/{name}" for name in NAMES)):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
    assert val_losses(single_run)[20] < val_losses(single_run)[10]  # it trained
    wa, wb = weights(single_run / "last.ckpt"), weights(ddp / "last.ckpt")
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst < 1e-4, f"weights differ by {worst}"
