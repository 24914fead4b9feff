"""setup and the demo corpus."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli


@pytest.mark.slow  # by default: tests/e2e/test_gpu_check.py runs `llm-lightning setup` as its first step
def test_setup_exits_0_here():
    result = run_cli("setup")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "torch" in result.stdout and "forward + backward" in result.stdout
    assert "FAIL" not in result.stdout


def test_demo_corpus_has_every_format_and_respects_the_budget(tmp_path):
    from llm_lightning.tools.demo import build_corpus

    corpus = build_corpus(tmp_path, megabytes=0.2)
    assert {".txt", ".md", ".json", ".jsonl"} <= set(corpus.files)
    written = sum(len(p.read_text()) for p in tmp_path.rglob("*.txt")) + sum(
        len(p.read_text()) for p in tmp_path.rglob("*.md")
    )
    assert 0 < written <= corpus.chars <= 200_000
