"""Shared fixtures: a small learnable corpus written by the test, prepared once per session."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

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
    """A prepared dataset: bpe vocab 400 (divisible by 2 and 4, for tensor parallelism), windows of 32 tokens."""
    from llm_lightning.data.prepare import prepare

    output = tmp_path_factory.mktemp("prepared") / "processed_data"
    prepare(
        input_dir=corpus_dir,
        output_dir=output,
        tokenizer_type="bpe",
        vocab_size=400,
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
    # The repository on the path: tests add their probes (tests/probes.py) as callbacks.
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "llm_lightning", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def run_in_terminal(*args: str, cwd: Path | None = None, timeout: int = 300) -> tuple[int, str]:
    """Run `python -m llm_lightning ARGS` with stdout on a pseudo-terminal, as in a user's shell:
    (exit code, everything written to the terminal)."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    leader, follower = pty.openpty()
    # A real terminal has a size; tqdm draws nothing on one of 0 columns.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "llm_lightning", *map(str, args)],
        cwd=cwd,
        stdout=follower,
        stderr=subprocess.DEVNULL,
    )
    os.close(follower)
    output, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: the process has exited
                break
            if not chunk:
                break
            output += chunk
        elif process.poll() is not None:
            break
    os.close(leader)
    return process.wait(timeout=30), output.decode(errors="replace")


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


@pytest.fixture(scope="session")
def trained(run_dir):
    """The shared run's final model and its tokenizer, loaded as generate and export load them."""
    from llm_lightning.io.checkpoint import load_checkpoint, load_model, load_tokenizer

    checkpoint = load_checkpoint(run_dir / "last.ckpt")
    return load_model(checkpoint), load_tokenizer(checkpoint)


@pytest.fixture(scope="session")
def exported(run_dir, tmp_path_factory) -> Path:
    """The shared run's last.ckpt exported through the CLI."""
    output = tmp_path_factory.mktemp("export") / "hf_model"
    result = run_cli("export", "--ckpt_path", run_dir / "last.ckpt", "--output_dir", output)
    assert result.returncode == 0, result.stderr[-3000:]
    return output


# ------------------------------------------------------------------ helpers shared by the fit tests
def fit_flags(
    data_dir: Path, ckpt_dir: Path, *extra, steps: int = 20, batch: int = 8, micro: int = 4
) -> list:
    """A tiny fit's flags: checkpoints and validation every 10 steps, logs beside the checkpoints."""
    return [
        *TINY_FIT, "--data.data_dir", data_dir, "--data.batch_size", batch, "--data.micro_batch_size", micro,
        "--trainer.max_steps", steps, "--checkpoint.dirpath", ckpt_dir, "--checkpoint.every_n_train_steps", 10,
        "--eval_interval", 10, "--trainer.default_root_dir", ckpt_dir.parent / "logs", *extra,
    ]  # fmt: skip


def fit(data_dir: Path, ckpt_dir: Path, *extra: str, steps: int = 20, batch: int = 8, micro: int = 4):
    """`llm-lightning fit` of the tiny model in a subprocess, run from beside the checkpoint folder."""
    flags = fit_flags(data_dir, ckpt_dir, *extra, steps=steps, batch=batch, micro=micro)
    return run_cli("fit", *flags, cwd=ckpt_dir.parent)


def records(ckpt_dir: Path, event: str) -> list[dict]:
    lines = (ckpt_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def weights(path: Path) -> dict[str, torch.Tensor]:
    from llm_lightning.io.checkpoint import load_checkpoint

    return load_checkpoint(path)["state_dict"]


def assert_same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=atol, rtol=0.0 if atol == 0 else 1e-5, msg=key)
