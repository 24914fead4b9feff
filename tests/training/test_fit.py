"""Training end to end through the real CLI: prepare -> fit -> checkpoints -> validate -> resume."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from llm_lightning.io.checkpoint import load_checkpoint
from tests.conftest import TINY_FIT, assert_same_weights, fit, fit_flags, records, run_cli, run_in_terminal


def test_prepare_fit_validate_resume(prepared_dir, tmp_path):
    """The user's path: checkpoints with the seed's names, validate, then resume continues counting."""
    ckpts = tmp_path / "checkpoints"
    result = fit(prepared_dir, ckpts, steps=20)
    assert result.returncode == 0, result.stderr[-3000:]
    names = {p.name for p in ckpts.glob("*.ckpt")}
    assert {"checkpoint_step_10.ckpt", "checkpoint_step_20.ckpt", "last.ckpt", "best.ckpt"} <= names
    checkpoint = load_checkpoint(ckpts / "last.ckpt")
    assert checkpoint["global_step"] == 20
    assert checkpoint["TextDataModule"]["tokenizer_files"]  # generate/export need nothing else

    validated = run_cli(
        "validate",
        *TINY_FIT,
        "--data.data_dir",
        prepared_dir,
        "--data.batch_size",
        8,
        "--ckpt_path",
        ckpts / "checkpoint_step_20.ckpt",
        cwd=tmp_path,
    )
    assert validated.returncode == 0, validated.stderr[-3000:]
    val_at_20 = records(ckpts, "val")[-1]["val/loss"]
    assert f"{val_at_20:.4f}"[:5] in validated.stdout  # the same number the fit reported

    # On a terminal: one bar in optimizer steps, from the resumed step
    code, terminal = run_in_terminal(
        "fit", *fit_flags(prepared_dir, ckpts, steps=30), "--ckpt_path", "last", "--trainer.enable_progress_bar", "true",
        cwd=tmp_path,
    )  # fmt: skip
    assert code == 0, terminal[-3000:]
    bar = terminal.replace("\r", "\n")
    assert "train:  67%" in bar and "20/30" in bar and "30/30" in bar and "step/s" in bar
    starts = records(ckpts, "start")
    assert [s["step"] for s in starts] == [0, 20]
    assert load_checkpoint(ckpts / "last.ckpt")["global_step"] == 30
    assert (ckpts / "checkpoint_step_30.ckpt").is_file()


@pytest.mark.slow  # by default: test_endings (a signal, then resume, equals a straight run) and test_muon
def test_resume_is_exact(prepared_dir, tmp_path):
    """20 steps straight equal 10 steps + resume to 20, bit for bit (fp32, CPU), data order included."""
    straight, split = tmp_path / "straight" / "ckpt", tmp_path / "split" / "ckpt"
    for folder in (straight, split):
        folder.parent.mkdir()
    # The schedule's horizon is fixed at 20 steps, as in a run that is interrupted at step 10.
    same_run = ("--data.num_workers", "2", "--model.max_steps", "20")
    assert fit(prepared_dir, straight, *same_run, steps=20).returncode == 0
    first = fit(prepared_dir, split, *same_run, steps=10)
    assert first.returncode == 0, first.stderr[-3000:]
    second = fit(prepared_dir, split, *same_run, "--ckpt_path", "last", steps=20)
    assert second.returncode == 0, second.stderr[-3000:]
    assert_same_weights(straight / "last.ckpt", split / "last.ckpt")
    # the resumed run must not rewrite step 10 mid-accumulation
    assert_same_weights(straight / "checkpoint_step_10.ckpt", split / "checkpoint_step_10.ckpt")
    position = lambda path: load_checkpoint(path)["loops"]["fit_loop"]["state_dict"]  # noqa: E731
    assert position(split / "checkpoint_step_10.ckpt") == position(straight / "checkpoint_step_10.ckpt")
    val = lambda folder: [r["val/loss"] for r in records(folder, "val")]  # noqa: E731
    assert val(straight) == val(split)


@pytest.mark.slow  # the default suite checks it across processes (tests/distributed/test_ddp.py)
def test_gradient_accumulation_matches_one_big_batch(prepared_dir, tmp_path):
    """batch 8 as micro 4 x 2 gives the same update as micro 8 (up to fp32 summation order)."""
    big, accumulated = tmp_path / "big" / "ckpt", tmp_path / "acc" / "ckpt"
    for folder in (big, accumulated):
        folder.parent.mkdir()
    assert fit(prepared_dir, big, steps=10, micro=8).returncode == 0
    assert fit(prepared_dir, accumulated, steps=10, micro=4).returncode == 0
    assert_same_weights(big / "last.ckpt", accumulated / "last.ckpt", atol=2e-5)


def unigram_entropy(data_dir: Path) -> float:
    metadata = json.loads((data_dir / "metadata.json").read_text())
    tokens = np.fromfile(data_dir / "dataset" / "train.bin", dtype=metadata["dtype"])
    counts = np.array(list(Counter(tokens.tolist()).values()), dtype=float)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


@pytest.mark.slow  # an extra beside the default suite's check of the same contract
def test_model_learns_far_below_unigram_entropy(prepared_dir, tmp_path):
    ckpts = tmp_path / "checkpoints"
    result = fit(prepared_dir, ckpts, steps=60)
    assert result.returncode == 0, result.stderr[-3000:]
    val = records(ckpts, "val")[-1]["val/loss"]
    assert val < 0.6 * unigram_entropy(prepared_dir), (val, unigram_entropy(prepared_dir))
    assert math.isfinite(val)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data.batch_size", "10", "--data.micro_batch_size", "4"], "--data.batch_size 10"),
        # the rest as extras: tests/e2e/bad_inputs.yaml covers each kind in the default suite
        pytest.param(["--data.data_dir", "/nonexistent/data"], "/nonexistent/data", marks=pytest.mark.slow),
        pytest.param(["--model.num_heads", "3"], "num_heads", marks=pytest.mark.slow),
        pytest.param(["--eval_interval", "0"], "--eval_interval", marks=pytest.mark.slow),
    ],
)
def test_bad_training_input_is_one_line_and_exit_2(prepared_dir, tmp_path, args, message):
    result = run_cli(
        "fit",
        *TINY_FIT,
        "--data.data_dir",
        prepared_dir,
        "--trainer.max_steps",
        "2",
        "--checkpoint.dirpath",
        tmp_path / "ckpt",
        *args,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "ckpt").glob("*.ckpt")) if (tmp_path / "ckpt").exists() else True


def test_val_bpb_is_the_val_losses_in_bits_per_utf8_byte(run_dir, prepared_dir):
    """val/bpb = sum of val token losses / (ln 2 x UTF-8 bytes of the val text), and prepare
    counts those bytes right (checked by decoding val.bin, document by document)."""
    from llm_lightning.data.format import read_metadata, split_files
    from llm_lightning.data.tokenizers import load_tokenizer

    metadata, tokenizer = read_metadata(prepared_dir), load_tokenizer(prepared_dir)
    (val_file,) = split_files(prepared_dir, metadata, "val")
    tokens = np.fromfile(val_file, dtype=metadata["dtype"]).tolist()
    documents, start = [], 0
    for i, token in enumerate(tokens):
        if token == metadata["eos_id"]:
            documents.append(tokens[start:i])
            start = i + 1
    text_bytes = sum(len(tokenizer.decode(doc).encode("utf-8")) for doc in documents)
    assert text_bytes == metadata["num_bytes"]["val"]

    val = records(run_dir, "val")[-1]
    scored = len(tokens) - 1  # every val token but the first is predicted once
    by_hand = val["val/loss"] * scored / (math.log(2) * text_bytes)
    # The logged value counts the scored tokens' share of the bytes (1 token in `scored` fewer).
    assert val["val/bpb"] == pytest.approx(by_hand * len(tokens) / scored, rel=1e-6)
    assert val["val/bpb"] == pytest.approx(by_hand, rel=2 / scored)
    shown = run_cli("monitor", "--checkpoint_dir", run_dir)
    assert f"{val['val/bpb']:.4f}" in shown.stdout
