"""What a resume or a validation accepts: the checkpoint's own data, this command's settings, and
every window of the stream once, whatever the batch split; and what a fit prints to a file."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from llm_lightning.data.format import read_metadata, split_path
from llm_lightning.data.prepare import prepare
from llm_lightning.data.sampler import WindowOrder
from llm_lightning.data.windows import TokenWindows
from llm_lightning.io.checkpoint import load_checkpoint
from llm_lightning.training.optim import warmup_cosine
from tests.conftest import TINY_FIT, fit, records, run_cli


@pytest.fixture(scope="module")
def other_tokenizer(corpus_dir, tmp_path_factory) -> Path:
    """The same text and vocabulary size, but a tokenizer trained on another sample: other ids."""
    out = tmp_path_factory.mktemp("other") / "data"
    options = dict(
        tokenizer_type="bpe", vocab_size=400, max_length=32, stride=32, val_fraction=0.1, num_workers=0
    )
    return prepare(corpus_dir, out, seed=5, **options)  # another split: another sample to learn from


def test_a_checkpoint_never_meets_data_of_another_tokenizer(run_dir, prepared_dir, other_tokenizer, tmp_path):
    assert read_metadata(other_tokenizer)["vocab_size"] == read_metadata(prepared_dir)["vocab_size"]
    assert (
        read_metadata(other_tokenizer)["tokenizer_fingerprint"]
        != read_metadata(prepared_dir)["tokenizer_fingerprint"]
    )
    for command in ("validate", "fit"):
        result = run_cli(
            command, *TINY_FIT, "--data.data_dir", other_tokenizer, "--data.batch_size", 8,
            "--ckpt_path", run_dir / "last.ckpt", "--checkpoint.dirpath", tmp_path / command, cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr[-2000:]
        (line,) = result.stderr.strip().splitlines()[-1:]
        assert line.startswith("llm-lightning: error:") and "another tokenizer" in line, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
    assert not list((tmp_path / "fit").glob("*.ckpt")) if (tmp_path / "fit").exists() else True


def test_a_resume_takes_the_commands_learning_rate_and_schedule(prepared_dir, tmp_path):
    ckpts = tmp_path / "ckpts"
    assert fit(prepared_dir, ckpts, "--model.max_steps", "20", steps=10).returncode == 0
    changed = ("--model.learning_rate", "1e-2", "--model.warmup_steps", "7", "--model.max_steps", "20")
    resumed = fit(prepared_dir, ckpts, *changed, "--ckpt_path", "last", steps=20)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    lr = {r["step"]: r["lr"] for r in records(ckpts, "train")}
    assert lr[15] == pytest.approx(1e-2 * warmup_cosine(15, warmup_steps=7, max_steps=20, min_ratio=0.1))
    assert lr[10] == pytest.approx(3e-3 * warmup_cosine(10, warmup_steps=5, max_steps=20, min_ratio=0.1))


def read_windows(path: Path) -> list[tuple]:
    return [tuple(json.loads(line)) for line in path.with_name(f"{path.name}.rank0").read_text().splitlines()]


def test_a_resume_with_another_batch_and_micro_batch_reads_each_window_once(prepared_dir, tmp_path):
    """10 steps of 8 (micro-batches of 4), resumed with steps of 16 (micro-batches of 2) to step 15:
    exactly the stream's first 160 windows were read, none twice, none skipped."""
    ckpts = tmp_path / "ckpts"
    probe = ("--trainer.callbacks+=tests.probes.RecordWindows", "--trainer.callbacks.path")
    first = fit(prepared_dir, ckpts, *probe, tmp_path / "a.jsonl", steps=10, batch=8, micro=4)
    assert first.returncode == 0, first.stderr[-3000:]
    second = fit(
        prepared_dir, ckpts, *probe, tmp_path / "b.jsonl", "--ckpt_path", "last", steps=15, batch=16, micro=2
    )  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    read = read_windows(tmp_path / "a.jsonl") + read_windows(tmp_path / "b.jsonl")
    meta = read_metadata(prepared_dir)
    windows = TokenWindows(
        split_path(prepared_dir, "train"), meta["dtype"], meta["max_length"], meta["stride"]
    )
    order = WindowOrder(len(windows), seed=1337)
    assert len(read) == 160 <= len(windows)  # within one epoch
    assert Counter(read) == Counter(tuple(windows[order(p)][0].tolist()) for p in range(160))
    assert load_checkpoint(ckpts / "last.ckpt")["TextDataModule"]["position"] == 160


def test_a_new_run_refuses_a_folder_with_another_runs_checkpoints(run_dir, prepared_dir, tmp_path):
    before = sorted(p.name for p in run_dir.iterdir())
    result = fit(prepared_dir, run_dir, steps=2)
    assert result.returncode == 2 and "--ckpt_path last" in result.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_a_fit_logged_to_a_file_writes_a_few_lines_per_interval(prepared_dir, tmp_path):
    """20 steps, a line every 5, validation every 5: 4 train lines, 4 validation lines, no noise."""
    result = fit(prepared_dir, tmp_path / "ckpts", "--trainer.log_every_n_steps", "5", "--eval_interval", "5",
                 "--trainer.enable_progress_bar", "true", steps=20)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout.strip().splitlines()
    assert [line.split(" |")[0] for line in out] == [
        f"step {s}/20" for s in (5, 5, 10, 10, 15, 15, 20, 20)
    ], out
    assert sum("validation: val/loss" in line for line in out) == 4
    everything = result.stdout + result.stderr
    for noise in (
        "Tip:",
        "LeafSpec",
        "FLOPs",
        "HINT",
        "following callbacks",
        "sync_dist",
        "Validation DataLoader",
    ):
        assert noise not in everything, noise
    assert len(result.stderr.strip().splitlines()) <= 6, result.stderr


@pytest.mark.slow  # an extra: predict and test share validate's loop, checked by default
def test_predict_writes_each_windows_loss_and_test_reports_test_metrics(run_dir, prepared_dir, tmp_path):
    common = (
        *TINY_FIT,
        "--data.data_dir",
        prepared_dir,
        "--data.batch_size",
        8,
        "--ckpt_path",
        run_dir / "last.ckpt",
    )
    predicted = run_cli("predict", *common, "--predict_output", tmp_path / "p.jsonl", cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    meta = read_metadata(prepared_dir)
    assert sum(r["scored_tokens"] for r in rows) == meta["num_tokens"]["val"] - 1  # every val token once
    mean = sum(r["loss"] * r["scored_tokens"] for r in rows) / sum(r["scored_tokens"] for r in rows)
    assert mean == pytest.approx(records(run_dir, "val")[-1]["val/loss"], abs=1e-4)
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
    tested = run_cli("test", *common, cwd=tmp_path)
    assert tested.returncode == 0 and "test/loss" in tested.stdout and "val/loss" not in tested.stdout


def test_a_run_refused_by_the_batch_split_leaves_nothing_behind(prepared_dir, tmp_path, capsys):
    """Checked before any callback writes: no metrics.jsonl, no folders (in this process: cheap)."""
    from llm_lightning.cli import main

    args = ["fit", *map(str, TINY_FIT), "--data.data_dir", str(prepared_dir), "--data.batch_size", "10"]
    args += ["--data.micro_batch_size", "4", "--checkpoint.dirpath", str(tmp_path / "ckpts")]
    args += ["--trainer.default_root_dir", str(tmp_path / "logs")]
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert "--data.batch_size 10" in line and "--data.micro_batch_size 4" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []
