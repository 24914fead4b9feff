"""export: a Hugging Face folder transformers loads with the same logits, its tokenizer for every kind, its guards, and init_from back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llm_lightning.errors import UserError
from llm_lightning.io.checkpoint import load_checkpoint, load_model
from llm_lightning.model import ModelConfig, Transformer
from llm_lightning.model.hf import load_hf_weights
from llm_lightning.tools import monitor
from llm_lightning.tools.export import export
from llm_lightning.tools.generate import generate
from tests.conftest import TINY_FIT, randomized, run_cli, synthetic_documents
from tests.probes import recorded

MODEL_FLAGS = TINY_FIT[: TINY_FIT.index("--model.warmup_steps")]  # the model's shape flags


def test_export_matches_transformers(exported, trained):
    transformers = pytest.importorskip("transformers")
    model, tokenizer = trained
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    text = " ".join(synthetic_documents(1, seed=3))[:150] + " Ünïcode, digits 12345 & symbols!"
    assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text)
    assert hf_tokenizer.eos_token_id == tokenizer.eos_id

    ids = torch.tensor([tokenizer.encode(text)[: model.config.max_seq_len]])
    with torch.no_grad():
        difference = (hf_model(ids).logits - model(ids)).abs().max().item()
    assert difference < 1e-4

    prompt = ids[:, :4]
    ours = generate(model, prompt, 20, temperature=0, eos_id=tokenizer.eos_id)
    theirs = hf_model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=20,
        do_sample=False,
        pad_token_id=tokenizer.eos_id,
    )
    assert ours.tolist() == theirs.tolist()
    assert hf_tokenizer.decode(theirs[0]) == tokenizer.decode(ours[0].tolist())


def test_export_refuses_an_existing_folder(exported, run_dir):
    before = (exported / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(UserError, match="--overwrite"):
        export(run_dir / "last.ckpt", exported)
    export(run_dir / "checkpoint_step_10.ckpt", exported, overwrite=True)
    assert (exported / "model.safetensors").stat().st_mtime_ns != before
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".")]  # no temp folders left
    export(run_dir / "last.ckpt", exported, overwrite=True)  # as the module's other tests expect


def fake_checkpoint(path: Path, kind: str, tie_embeddings: bool) -> tuple[Path, object]:
    """A checkpoint as fit writes it, with a random model and a freshly trained tokenizer."""
    from llm_lightning.data.tokenizers import train_tokenizer

    tokenizer = train_tokenizer(kind, iter(synthetic_documents(40)), 300)
    hparams = dict(
        vocab_size=tokenizer.vocab_size,
        max_length=16,
        preset=None,
        hidden_size=32,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        tie_embeddings=tie_embeddings,
    )
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        max_seq_len=16,
        hidden_size=32,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        tie_embeddings=tie_embeddings,
    )
    model = randomized(Transformer(config))
    state = {f"model.{name}": value for name, value in model.state_dict().items()}
    torch.save(
        {
            "state_dict": state,
            "hyper_parameters": hparams,
            "llm_lightning_format": 2,
            "TextDataModule": {"tokenizer_files": tokenizer.files()},
        },
        path,
    )
    return path, tokenizer


@pytest.mark.parametrize(("kind", "tie"), [("wordpiece", True), ("tiktoken", False), ("bpe", True)])
def test_export_tokenizer_loads_in_transformers_for_every_kind(tmp_path, kind, tie):
    transformers = pytest.importorskip("transformers")
    ckpt, tokenizer = fake_checkpoint(tmp_path / "fake.ckpt", kind, tie)
    folder = export(ckpt, tmp_path / "hf")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    text = "The old king finds a red apple. The river calls again!"
    assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text)
    assert hf_tokenizer.eos_token_id == tokenizer.eos_id
    model = load_model(load_checkpoint(ckpt))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([tokenizer.encode(text)[:16]])
    with torch.no_grad():
        assert (hf_model(ids).logits - model(ids)).abs().max().item() < 1e-4


def test_init_from_an_exported_folder(exported, trained, tmp_path):
    """load_hf_weights restores the exact weights; a different shape is a clear error."""
    model, _ = trained
    fresh = Transformer(model.config)
    load_hf_weights(fresh, exported)
    for (name, ours), theirs in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(ours, theirs), name
    other = Transformer(ModelConfig(**{**model.config.to_dict(), "num_layers": 3}))
    with pytest.raises(UserError, match="num_layers=2"):
        load_hf_weights(other, exported)
    with pytest.raises(UserError, match="config.json"):
        load_hf_weights(fresh, tmp_path)


@pytest.mark.slow  # an extra: the default suite checks the exported logits against transformers
def test_validate_with_init_from_gives_the_checkpoint_loss(exported, run_dir, prepared_dir, tmp_path):
    """Continued pretraining through the CLI: the exported weights start the run."""
    result = run_cli(
        "validate",
        "--data.data_dir",
        prepared_dir,
        "--data.batch_size",
        "8",
        "--data.num_workers",
        "0",
        "--model.init_from",
        exported,
        *MODEL_FLAGS,
        "--trainer.precision",
        "32-true",
        "--trainer.enable_progress_bar",
        "false",
        "--checkpoint.dirpath",
        tmp_path / "ckpts",
        "--trainer.callbacks+=tests.probes.RecordMetrics",
        "--trainer.callbacks.path",
        tmp_path / "metrics.jsonl",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    val = recorded(tmp_path / "metrics.jsonl")
    trained_val = [r for r in monitor.read_records(run_dir / "metrics.jsonl") if r["event"] == "val"]
    assert val[-1]["val/loss"] == pytest.approx(trained_val[-1]["val/loss"], abs=1e-4)


def test_overwrite_replaces_only_an_earlier_export(exported, tmp_path, run_dir):
    """--overwrite on a folder of someone's files (or the checkpoints' own) refuses and touches nothing."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    (mine / "config.json").write_text("{}")
    for folder in (mine, run_dir):
        before = sorted(p.name for p in folder.iterdir())
        with pytest.raises(UserError, match="not an earlier export"):
            export(run_dir / "last.ckpt", folder, overwrite=True)
        assert sorted(p.name for p in folder.iterdir()) == before
    assert (mine / "notes.txt").read_text() == "my notes"
    again = export(run_dir / "last.ckpt", exported, overwrite=True)  # an earlier export: replaced
    assert (again / "model.safetensors").is_file()
