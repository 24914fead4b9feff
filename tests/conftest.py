"""Shared fixtures: a small learnable corpus written by the test, prepared once per session."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SUBJECTS = ["the cat", "a dog", "the old king", "my sister", "the river", "a small bird", "the farmer"]
VERBS = ["sees", "follows", "remembers", "carries", "finds", "watches", "calls"]
OBJECTS = ["the moon", "a red apple", "the long road", "his friend", "the quiet house", "a song"]
ENDINGS = [".", " today.", " at night.", " again.", " in the rain."]


def synthetic_documents(count: int, seed: int = 0, sentences: int = 12) -> list[str]:
    """Documents from a tiny grammar: learnable, so a model's loss must fall well below chance."""
    rng = random.Random(seed)
    documents = []
    for _ in range(count):
        lines = [
            f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(ENDINGS)}"
            for _ in range(sentences)
        ]
        documents.append(" ".join(lines).capitalize())
    return documents


def write_corpus(folder: Path, documents: list[str]) -> Path:
    """Spread documents over .txt, .md, .json and .jsonl files, with a nested folder."""
    (folder / "nested").mkdir(parents=True, exist_ok=True)
    quarter = max(1, len(documents) // 4)
    for i, doc in enumerate(documents[:quarter]):
        (folder / f"doc_{i:03d}.txt").write_text(doc)
    for i, doc in enumerate(documents[quarter : 2 * quarter]):
        (folder / "nested" / f"note_{i:03d}.md").write_text(f"# Note {i}\n\n{doc}")
    (folder / "items.json").write_text(
        json.dumps([{"text": d} for d in documents[2 * quarter : 3 * quarter]])
    )
    with (folder / "nested" / "lines.jsonl").open("w") as stream:
        for doc in documents[3 * quarter :]:
            stream.write(json.dumps({"text": doc}) + "\n")
    return folder


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("raw_text_data"), synthetic_documents(120))


@pytest.fixture(scope="session")
def prepared_dir(corpus_dir, tmp_path_factory) -> Path:
    """A prepared dataset: bpe vocab 512, windows of 32 tokens."""
    from llm_lightning.data.prepare import prepare

    output = tmp_path_factory.mktemp("prepared") / "processed_data"
    prepare(
        input_dir=corpus_dir,
        output_dir=output,
        tokenizer_type="bpe",
        vocab_size=512,
        max_length=32,
        stride=32,
        num_workers=1,
        val_fraction=0.1,
        seed=0,
    )
    return output


# Flags that make a fit small and fast on a CPU: a 2-layer model, fp32, no workers.
TINY_FIT = [
    "--model.preset",
    "tiny",
    "--model.hidden_size",
    "64",
    "--model.num_layers",
    "2",
    "--model.num_heads",
    "4",
    "--model.warmup_steps",
    "5",
    "--model.learning_rate",
    "3e-3",
    "--trainer.precision",
    "32-true",
    "--trainer.log_every_n_steps",
    "5",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
    "--data.num_workers",
    "0",
]


@pytest.fixture(scope="session")
def run_dir(prepared_dir, tmp_path_factory) -> Path:
    """The checkpoint folder of one 20-step fit (checkpoints and validation at 10 and 20),
    shared by the tests that need a trained run rather than a particular one."""
    folder = tmp_path_factory.mktemp("trained_run")
    result = run_cli(
        "fit", *TINY_FIT, "--data.data_dir", prepared_dir, "--data.batch_size", "8",
        "--data.micro_batch_size", "4", "--trainer.max_steps", "20", "--checkpoint.dirpath", folder / "ckpts",
        "--checkpoint.every_n_train_steps", "10", "--eval_interval", "10", cwd=folder,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "ckpts"


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300, env: dict | None = None):
    """Run `python -m llm_lightning ARGS` in a subprocess, as a user would."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "llm_lightning", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def randomized(model):
    """`model` with every weight random, norm gains included.

    A fresh Transformer starts with its residual projections at zero (every block is the
    identity), so a test of attention, caching or weight mapping on it could not fail.
    """
    import torch

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.1
            param.copy_(1.0 + noise if param.dim() == 1 else noise)
    return model
