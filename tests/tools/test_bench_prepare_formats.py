"""bench-prepare's input formats: the generated corpus holds the same documents as plain files,
zstd-compressed JSON lines and Parquet, so each format's row times the same text."""

from __future__ import annotations

import pytest

from llm_lightning.data.sources import find_files, iter_pieces
from llm_lightning.errors import UserError
from llm_lightning.tools.bench_prepare import build_parser, report
from llm_lightning.tools.synthetic_corpus import FORMATS, write_corpus


def test_every_format_holds_the_same_documents(tmp_path):
    found = {}
    for fmt in FORMATS:
        write_corpus(tmp_path / fmt, 300_000, seed=4, fmt=fmt)
        files = find_files(tmp_path / fmt)
        found[fmt] = sorted(p.text for p in iter_pieces(tmp_path / fmt, files, block_chars=10**9))
        assert fmt == "plain" or all(name.endswith(fmt) for name in files), files
    assert found["plain"] == found["jsonl.zst"] == found["parquet"] and len(found["plain"]) > 100
    with pytest.raises(UserError, match="--formats"):
        write_corpus(tmp_path / "x", 10, seed=0, fmt="csv")


def test_the_report_has_a_row_per_format():
    run = {"seconds": 1.0, "cpu_seconds": 1.0, "tokens": 100, "documents": 1, "other_cpus": 0.0,
           "peak_main_mb": 50.0, "peak_worker_mb": 60.0, "tokens_per_s": 100.0}  # fmt: skip
    names = ["prepare_1w", "prepare_2w", "ceiling_1t", "ceiling_2t", "prepare_small", "prepare_parquet"]
    result = {"size_mb": 1, "tokenizer": {"kind": "bpe", "vocab_size": 300}, "cpu_count": 2, "load_before": 0.0,
              "load_after": 0.0, "discarded_rounds": 0, "median": dict.fromkeys(names, run),
              "runs": {name: [run] for name in names}}  # fmt: skip
    assert "prepare, 2 workers, parquet input" in report(result, [1, 2], ["parquet"])
    assert build_parser().parse_args(["--formats", "jsonl.zst", "parquet"]).formats == [
        "jsonl.zst",
        "parquet",
    ]
