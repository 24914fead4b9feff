"""Prepare across machines: a shared tokenizer, shards written by separate processes, merge-shards,
and the merged folder read like one prepared folder."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import zstandard

from llm_lightning.data.datamodule import TextDataModule
from llm_lightning.data.format import read_metadata, shard_name, split_files
from llm_lightning.data.prepare import prepare
from llm_lightning.data.prepare.read import shard_bounds
from llm_lightning.data.sources import COMPRESSION_RATIO, estimated_text_bytes
from llm_lightning.data.tokenizers import fingerprint, load_tokenizer, tokenizer_files
from llm_lightning.errors import UserError
from llm_lightning.tools.merge_shards import merge
from tests.conftest import REPO, run_cli

FLAGS = {"max_length": 32, "stride": 32, "val_fraction": 0.1, "seed": 0, "num_workers": 0, "progress": False}
ARGS = [arg for key, value in FLAGS.items() if key != "progress" for arg in (f"--{key}", str(value))]


def documents(folder: Path, split: str) -> list[str]:
    """The split's documents (text between end-of-text ids) of every token file of a folder."""
    metadata, tok = read_metadata(folder), load_tokenizer(folder)
    found = []
    for path in split_files(folder, metadata, split):
        ids = np.fromfile(path, dtype=metadata["dtype"])
        ends = np.flatnonzero(ids == tok.eos_id)
        found += [tok.decode(part[:-1]) for part in np.split(ids, ends + 1)[:-1]]
    return found


@pytest.fixture(scope="module")
def tokenizer_dir(corpus_dir, tmp_path_factory) -> Path:
    return prepare(
        corpus_dir, tmp_path_factory.mktemp("tok") / "tok", tokenizer_only=True, vocab_size=300, **FLAGS
    )


@pytest.fixture(scope="module")
def sharded(corpus_dir, tokenizer_dir, tmp_path_factory) -> Path:
    """3 shards, each prepared by its own `llm-lightning prepare` process (at once, as an array
    would), then merged by `llm-lightning merge-shards`."""
    out = tmp_path_factory.mktemp("sharded") / "out"
    common = ["prepare", "--input_dir", corpus_dir, "--output_dir", out, "--tokenizer", tokenizer_dir, *ARGS]
    env = {"PYTHONPATH": str(REPO)}
    jobs = [
        subprocess.Popen(
            [sys.executable, "-m", "llm_lightning", *map(str, common), "--num_shards", "3", "--shard_index", str(i)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **env},
        )
        for i in range(3)
    ]  # fmt: skip
    for job in jobs:
        output = job.communicate(timeout=120)[0]
        assert job.returncode == 0, output
    merged = run_cli("merge-shards", "--output_dir", out)
    assert merged.returncode == 0, merged.stderr
    assert f"merged 3 shards into {out}" in merged.stdout
    return out


@pytest.fixture(scope="module")
def single(corpus_dir, tokenizer_dir, tmp_path_factory) -> Path:
    return prepare(corpus_dir, tmp_path_factory.mktemp("single") / "out", tokenizer=tokenizer_dir, **FLAGS)


def test_tokenizer_only_is_the_tokenizer_a_whole_prepare_trains(corpus_dir, tokenizer_dir, tmp_path):
    assert sorted(p.name for p in tokenizer_dir.iterdir()) == ["tokenizer.json", "tokenizer_meta.json"]
    whole = prepare(corpus_dir, tmp_path / "whole", vocab_size=300, **FLAGS)
    assert fingerprint(tokenizer_files(whole)) == fingerprint(tokenizer_files(tokenizer_dir))


def test_three_shard_processes_merged_equal_one_prepare(sharded, single):
    merged, one = read_metadata(sharded), read_metadata(single)
    assert merged["format_version"] == 2 and merged["shards"] == [shard_name(i, 3) for i in range(3)]
    for key in ("num_tokens", "num_documents", "num_bytes", "num_files", "vocab_size", "dtype", "max_length"):
        assert merged[key] == one[key], key
    assert merged["val_documents_moved_from_train"] == one["val_documents_moved_from_train"] == 0
    for split in ("train", "val"):
        assert Counter(documents(sharded, split)) == Counter(documents(single, split)), split
        # cut by file, in order: the shards' token files are the single file cut in three
        joined = b"".join(path.read_bytes() for path in split_files(sharded, merged, split))
        assert joined == split_files(single, one, split)[0].read_bytes(), split
    # every shard is a complete prepared folder of its own, and OUT is a tokenizer folder too
    for index in range(3):
        shard = read_metadata(sharded / shard_name(index, 3))
        assert shard["shard"]["index"] == index and shard["shard"]["by"] == "file"
    assert (
        fingerprint(tokenizer_files(sharded))
        == merged["tokenizer_fingerprint"]
        == one["tokenizer_fingerprint"]
    )


def test_merged_folder_reads_like_one_folder(sharded):
    data = TextDataModule(str(sharded), batch_size=4, num_workers=0)
    meta, span = data.metadata, data.max_length + 1
    windows, sizes = data.train_windows()
    per_shard = [(n - span) // data.stride + 1 + ((n - span) % data.stride > 0) for n in windows.sizes]
    assert len(windows) == sum(per_shard) == sizes[0] and len(windows.sizes) == 3
    for index in range(len(windows)):  # no window straddles two shards
        number, local = windows.locate(index)
        assert 0 <= windows.start(number, local) <= windows.sizes[number] - span
    val = data.val_windows()
    scored = sum(int(val[i][2].sum()) for i in range(len(val)))
    assert scored == meta["num_tokens"]["val"] - 3  # each shard's tokens but its first, once
    assert {int(val[i][3]) for i in range(len(val))} == {0}


def test_by_document_when_fewer_files_than_shards(tmp_path, tokenizer_dir, corpus_dir):
    raw = tmp_path / "raw"
    raw.mkdir()
    lines = (corpus_dir / "nested" / "lines.jsonl").read_text() + json.dumps({"text": "x " * 40}) + "\n"
    (raw / "a.jsonl").write_text(lines)
    (raw / "b.json").write_text((corpus_dir / "items.json").read_text())
    out = tmp_path / "out"
    for index in range(3):
        prepare(raw, out, tokenizer=tokenizer_dir, num_shards=3, shard_index=index, **FLAGS)
    merged = merge(out)
    one = prepare(raw, tmp_path / "one", tokenizer=tokenizer_dir, **FLAGS)
    assert merged["sharded_by"] == "document" and merged["num_files"] == 2
    assert merged["num_tokens"] == read_metadata(one)["num_tokens"]
    for split in ("train", "val"):
        assert Counter(documents(out, split)) == Counter(documents(one, split))


def test_a_shard_too_small_for_a_val_window_says_use_fewer_shards(tmp_path, tokenizer_dir, corpus_dir):
    with pytest.raises(UserError, match="--shard_index 0: too little text.*fewer --num_shards"):
        prepare(corpus_dir, tmp_path / "out", tokenizer=tokenizer_dir, num_shards=60, shard_index=0, **FLAGS)
    assert not (tmp_path / "out").exists()


def test_replacing_a_shard_undoes_the_merge_and_training_notices_a_changed_shard(
    sharded, tmp_path, corpus_dir
):
    copy = tmp_path / "copy"
    shutil.copytree(sharded, copy)
    with pytest.raises(UserError, match="already merged; pass --overwrite"):
        prepare(corpus_dir, copy, tokenizer=copy, num_shards=3, shard_index=1, **FLAGS)
    prepare(corpus_dir, copy, tokenizer=copy, num_shards=3, shard_index=1, overwrite=True, **FLAGS)
    with pytest.raises(UserError, match="merge-shards"):  # not complete until merged again
        read_metadata(copy)
    merge(copy)
    (copy / "shard-2-of-3" / "dataset" / "val.bin").write_bytes(b"\0\0")
    with pytest.raises(UserError, match="shard-2-of-3/dataset/val.bin is missing or has changed"):
        read_metadata(copy)


def test_shard_bounds_balance_text_and_never_leave_a_shard_empty():
    assert shard_bounds([1] * 9, 3) == [0, 3, 6, 9]
    assert shard_bounds([100, 1, 1, 1], 3) == [0, 1, 2, 4]  # one huge file: its own shard
    assert shard_bounds([1, 1, 1, 100], 2) == [0, 3, 4]
    bounds = shard_bounds([5, 3, 8, 1, 1, 9, 2, 4], 4)
    assert bounds[0] == 0 and bounds[-1] == 8 and all(a < b for a, b in zip(bounds, bounds[1:], strict=False))


def test_estimated_text_bytes_of_compressed_and_parquet_files(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    text = "".join(f"line {i}: words that compress rather well\n" for i in range(5000)).encode()
    (tmp_path / "a.txt").write_bytes(text)
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(text))
    (tmp_path / "a.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(text))
    stream = zstandard.ZstdCompressor().compressobj()  # a streamed frame records no content size
    (tmp_path / "b.txt.zst").write_bytes(stream.compress(text) + stream.flush())
    rows = [line.decode() for line in text.splitlines()]
    pq.write_table(pa.table({"text": rows, "id": list(range(len(rows)))}), tmp_path / "a.parquet",
                   row_group_size=1000, use_dictionary=False)  # fmt: skip
    estimate = {p.name: estimated_text_bytes(p) for p in tmp_path.iterdir()}
    assert estimate["a.txt"] == estimate["a.txt.gz"] == estimate["a.txt.zst"] == len(text)
    assert estimate["b.txt.zst"] == COMPRESSION_RATIO * (tmp_path / "b.txt.zst").stat().st_size
    assert len(text) <= estimate["a.parquet"] < 1.2 * len(text)  # the text column only, 4 bytes a row more


def test_merge_refuses_shards_made_with_other_settings_or_input(tmp_path, tokenizer_dir, corpus_dir):
    raw = tmp_path / "raw"
    shutil.copytree(corpus_dir, raw)
    out = tmp_path / "out"
    prepare(raw, out, tokenizer=tokenizer_dir, num_shards=2, shard_index=0, **FLAGS)
    prepare(
        raw,
        out,
        tokenizer=tokenizer_dir,
        num_shards=2,
        shard_index=1,
        **{**FLAGS, "max_length": 30, "stride": 30},
    )
    with pytest.raises(UserError, match="shard-1-of-2 differs from shard-0-of-2 in max_length"):
        merge(out)
    (raw / "late.txt").write_text("a file that came after shard 0 was made")
    prepare(raw, out, tokenizer=tokenizer_dir, num_shards=2, shard_index=1, overwrite=True, **FLAGS)
    with pytest.raises(UserError, match="shard-1-of-2 was prepared from other input files"):
        merge(out)
    assert not (out / "metadata.json").exists()
