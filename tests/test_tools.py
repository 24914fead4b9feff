"""After training: generate, export (and init_from back), monitor, setup, and bad checkpoints.

One small fit is shared by the whole module; every subcommand runs through the real CLI at
least once, the finer checks run in-process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_FIT, randomized, run_cli, synthetic_documents

from llm_lightning.checkpoint import load_checkpoint, load_model, load_tokenizer
from llm_lightning.errors import UserError
from llm_lightning.model import ModelConfig, Transformer
from llm_lightning.tools import monitor
from llm_lightning.tools.export import export, load_hf_weights
from llm_lightning.tools.generate import TextStream, generate, resolve_device, sample_next

MAX_STEPS = 20
PROMPT = "The cat sees"
MODEL_FLAGS = TINY_FIT[: TINY_FIT.index("--model.warmup_steps")]  # the model's shape flags


@pytest.fixture(scope="module")
def trained(run_dir):
    checkpoint = load_checkpoint(run_dir / "last.ckpt")
    return load_model(checkpoint), load_tokenizer(checkpoint)


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory) -> Path:
    """last.ckpt exported through the CLI."""
    output = tmp_path_factory.mktemp("export") / "hf_model"
    result = run_cli("export", "--ckpt_path", run_dir / "last.ckpt", "--output_dir", output)
    assert result.returncode == 0, result.stderr[-3000:]
    return output


def greedy_text(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    ids = torch.tensor([tokenizer.encode(prompt)])
    out = generate(model, ids, max_new_tokens, temperature=0, eos_id=tokenizer.eos_id)[0].tolist()
    if tokenizer.eos_id in out[ids.shape[1] :]:
        out = out[: out.index(tokenizer.eos_id, ids.shape[1])]
    return prompt + tokenizer.decode(out)[len(tokenizer.decode(ids[0].tolist())) :]


# ------------------------------------------------------------------------------------ generate


def test_generate_cli_greedy_is_deterministic(run_dir, trained):
    """The CLI's streamed greedy text equals the in-process greedy text (so repeats agree)."""
    result = run_cli(
        "generate",
        "--ckpt_path",
        run_dir / "last.ckpt",
        "--prompt",
        PROMPT,
        "--temperature",
        "0",
        "--max_new_tokens",
        "24",
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stderr
    model, tokenizer = trained
    expected = greedy_text(model, tokenizer, PROMPT, 24)
    assert result.stdout.rstrip("\n") == expected
    assert len(expected) > len(PROMPT) + 10
    assert greedy_text(model, tokenizer, PROMPT, 24) == expected


def test_kv_cache_equals_no_cache(trained):
    """Greedy and seeded sampling give the same tokens with and without the cache, past the window."""
    model, tokenizer = trained
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    steps = model.config.max_seq_len + 8  # the window fills and slides
    cached = generate(model, ids, steps, temperature=0, use_cache=True)
    plain = generate(model, ids, steps, temperature=0, use_cache=False)
    assert cached.shape == (1, ids.shape[1] + steps)
    assert torch.equal(cached, plain)
    sampled = [
        generate(
            model,
            ids,
            steps,
            temperature=1.0,
            top_k=50,
            top_p=0.95,
            use_cache=use_cache,
            generator=torch.Generator().manual_seed(7),
        )
        for use_cache in (True, False)
    ]
    assert torch.equal(*sampled)


def test_cached_logits_equal_full_forward(trained):
    model, _ = trained
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    with torch.inference_mode():
        full = model(ids)
        cache = model.new_cache(2, 20)
        steps = [model(ids[:, :8], cache=cache)] + [
            model(ids[:, i : i + 1], cache=cache) for i in range(8, 20)
        ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)


def test_long_prompt_keeps_the_last_tokens_and_eos_stops(trained):
    model, tokenizer = trained
    window = model.config.max_seq_len
    ids = torch.tensor([tokenizer.encode(" ".join(synthetic_documents(1)))])
    assert ids.shape[1] > window
    out = generate(model, ids, 3, temperature=0)
    assert torch.equal(out[:, :-3], ids)
    assert torch.equal(out[:, -3:], generate(model, ids[:, -window:], 3, temperature=0)[:, -3:])
    first = int(out[0, ids.shape[1]])
    assert generate(model, ids, 10, temperature=0, eos_id=first).shape[1] == ids.shape[1] + 1


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert int(sample_next(logits, temperature=0)) == 1
    for seed in range(5):
        generator = torch.Generator().manual_seed(seed)
        assert int(sample_next(logits, 1.0, top_k=1, generator=generator)) == 1
        assert int(sample_next(logits, 1.0, top_p=0.01, generator=generator)) == 1
        assert int(sample_next(logits, 1.0, top_k=2, generator=generator)) in (1, 3)


def test_stream_holds_back_partial_characters(trained):
    _, tokenizer = trained  # byte-level bpe: "é" is two byte tokens
    ids = tokenizer.encode("café")
    stream = TextStream(tokenizer, [])
    pieces = [stream.add(i) for i in ids]
    assert "".join(pieces) == "café"
    assert all("\ufffd" not in piece for piece in pieces)


def test_bad_device_is_a_user_error():
    with pytest.raises(UserError, match="--device"):
        resolve_device("cuda:99")
    with pytest.raises(UserError, match="--device"):
        resolve_device("banana")
    assert resolve_device("cpu").type == "cpu"


# -------------------------------------------------------------------------------------- export


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
    from llm_lightning.data.tokenizer import train_tokenizer

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
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    val = [r for r in monitor.read_records(tmp_path / "ckpts" / "metrics.jsonl") if r["event"] == "val"]
    trained_val = [r for r in monitor.read_records(run_dir / "metrics.jsonl") if r["event"] == "val"]
    assert val[-1]["val/loss"] == pytest.approx(trained_val[-1]["val/loss"], abs=1e-4)


# ------------------------------------------------------------------------------------- monitor


def test_monitor_cli_prints_the_last_step_and_plots(run_dir, tmp_path):
    plot = tmp_path / "plots" / "loss.png"
    result = run_cli("monitor", "--checkpoint_dir", run_dir, "--plot", plot)
    assert result.returncode == 0, result.stderr
    assert f"{MAX_STEPS} / {MAX_STEPS}" in result.stdout
    for label in ("train loss", "val loss", "perplexity", "learning rate", "tokens/s", "elapsed", "ETA"):
        assert label in result.stdout
    assert "last.ckpt" in result.stdout and "checkpoint_step_10.ckpt" in result.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.stat().st_size > 10_000


def test_monitor_follows_resumes_and_skips_partial_lines(tmp_path):
    records = [
        {"event": "start", "step": 0, "max_steps": 100, "tokens_per_step": 1000, "time": 0, "elapsed": 0},
        {"event": "train", "step": 10, "train/loss": 5.0, "lr": 1e-3, "time": 10, "elapsed": 10},
        {"event": "train", "step": 20, "train/loss": 4.0, "lr": 1e-3, "time": 20, "elapsed": 20},
        {"event": "val", "step": 20, "val/loss": 4.5, "time": 21, "elapsed": 21},
        {"event": "train", "step": 30, "train/loss": 9.0, "lr": 1e-3, "time": 30, "elapsed": 30},
        # resumed from the step-20 checkpoint: step 30 above is redone
        {"event": "start", "step": 20, "max_steps": 100, "tokens_per_step": 1000, "time": 100, "elapsed": 0},
        {"event": "train", "step": 40, "train/loss": 3.0, "lr": 5e-4, "time": 140, "elapsed": 40},
    ]
    text = "".join(json.dumps(r) + "\n" for r in records) + '{"event": "train", "st'
    (tmp_path / "metrics.jsonl").write_text(text)
    state = monitor.load_state(tmp_path)
    assert [r["step"] for r in state.train] == [10, 20, 40]
    assert state.step == 40 and not state.finished
    assert state.elapsed == 30 + 40
    assert monitor.seconds_per_step(state) == 2.0
    table = monitor.render(tmp_path, state, now=150)
    assert "40 / 100" in table and "0:02:00" in table  # ETA: 60 steps x 2 s
    assert "checkpoints: none yet" in table


def test_monitor_missing_folder_or_log_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        monitor.main(["--checkpoint_dir", str(tmp_path / "nope")])
    with pytest.raises(UserError, match="metrics.jsonl"):
        monitor.main(["--checkpoint_dir", str(tmp_path)])


# ---------------------------------------------------------------------------------- setup, errors


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


def test_bad_checkpoints_exit_2_with_one_line(run_dir, tmp_path):
    truncated = tmp_path / "truncated.ckpt"
    data = (run_dir / "last.ckpt").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    for command, path in (("generate", truncated), ("export", foreign)):
        extra = ["--output_dir", tmp_path / "out"] if command == "export" else ["--prompt", "x"]
        result = run_cli(command, "--ckpt_path", path, *extra)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and str(path) in lines[0], result.stderr
    assert not (tmp_path / "out").exists()
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all" * 100)
    with pytest.raises(UserError, match="garbage.ckpt"):
        export(garbage, tmp_path / "out")
