"""The parallelism pieces on one process: activation checkpointing, the gradient norm, memory accounting."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from llm_lightning.model import ModelConfig, Transformer, num_parameters
from llm_lightning.training.optim import build_optimizer
from llm_lightning.training.parallel import clip_grad_norm, grad_norm, parallelize
from llm_lightning.training.parallel.memory import held_bytes, measure_activations, training_memory
from tests.conftest import REPO, randomized, run_cli

CONFIG = ModelConfig(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=16)


def loss_and_grads(mode: str) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(0)
    model = randomized(Transformer(CONFIG))
    parallelize(model, None, activation_checkpointing=mode)
    ids = torch.randint(0, 97, (3, 17), generator=torch.Generator().manual_seed(1))
    loss = model(ids[:, :-1], targets=ids[:, 1:])
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(mode):
    loss, grads = loss_and_grads("none")
    loss_ac, grads_ac = loss_and_grads(mode)
    torch.testing.assert_close(loss_ac, loss, atol=0, rtol=0)
    assert grads.keys() == {n.replace("._checkpoint_wrapped_module", "") for n in grads_ac}
    for name, grad in grads_ac.items():
        torch.testing.assert_close(
            grad, grads[name.replace("._checkpoint_wrapped_module", "")], atol=1e-7, rtol=1e-6
        )


def test_activation_checkpointing_keeps_the_state_dict_names():
    model = parallelize(Transformer(CONFIG), None, activation_checkpointing="full")
    assert set(model.state_dict()) == set(Transformer(CONFIG).state_dict())


def test_grad_norm_and_clipping_match_torch_on_plain_tensors():
    model = randomized(Transformer(CONFIG))
    model(torch.randint(0, 97, (2, 9)), targets=torch.randint(0, 97, (2, 9))).backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    torch.testing.assert_close(grad_norm(model.parameters()), expected)
    before = clip_grad_norm(model.parameters(), 0.5)
    torch.testing.assert_close(before, expected)
    torch.testing.assert_close(grad_norm(model.parameters()), torch.tensor(0.5), atol=1e-5, rtol=0)


def test_held_bytes_match_the_formula_on_one_process():
    model = randomized(Transformer(CONFIG))
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
    model(torch.randint(0, 97, (2, 9)), targets=torch.randint(0, 97, (2, 9))).backward()
    optimizer.step()
    held = held_bytes(model, optimizer)
    formula = training_memory(
        CONFIG, strategy="ddp", devices=1, micro_batch_size=2, seq_len=8, precision="32-true"
    )
    params = num_parameters(CONFIG)
    assert held == {"parameters": 4 * params, "gradients": 4 * params, "optimizer": 8 * params}
    assert {k: formula[k] for k in held} == held


def per_token(config: ModelConfig, precision: str) -> float:
    return (measure_activations(config, precision, 16) - measure_activations(config, precision, 8)) / 8


def test_activation_bytes_grow_with_width_and_halve_in_bf16():
    wide = ModelConfig(
        vocab_size=97, hidden_size=128, num_layers=2, num_heads=8, num_kv_heads=2, max_seq_len=16
    )
    assert per_token(wide, "32-true") > 1.5 * per_token(CONFIG, "32-true") > 0
    assert per_token(CONFIG, "bf16-mixed") < 0.75 * per_token(CONFIG, "32-true")


def test_fsdp_on_two_processes_holds_half_of_ddp(tmp_path):
    """`llm-lightning bench` measured per rank: FSDP2 keeps half the parameters, gradients and AdamW state."""
    held = {}
    for strategy in ("ddp", "fsdp"):
        path = tmp_path / f"{strategy}.json"
        result = run_cli(
            "bench", "--mode", "fit", "--strategy", strategy, "--devices", 2, "--device", "cpu", "--hidden_size", 64,
            "--num_layers", 2, "--num_heads", 4, "--vocab_size", 256, "--seq_len", 16, "--micro_batch_size", 2,
            "--steps", 2, "--warmup", 1, "--precision", "32-true", "--json", path, env={"OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        held[strategy] = json.loads(path.read_text())["memory_per_rank"]
        assert f"{strategy} on 2 process(es)" in result.stdout
    for kind in ("parameters", "gradients", "optimizer"):
        assert held["fsdp"][kind] == pytest.approx(held["ddp"][kind] / 2, rel=0.01), kind


# The seed's table: GPU memory for each size (one GPU, mixed precision), in GB.
SEED_MEMORY_GB = {"tiny": 2, "small": 8, "medium": 16, "large": 24, "xl": 40}
# The global batch each config keeps (the seed's --batch_size, or the per-GPU batch x GPUs).
GLOBAL_BATCH = {"tiny": 8, "small": 32, "medium": 128, "large": 256, "xl": 512}


@pytest.mark.parametrize("size", sorted(SEED_MEMORY_GB))
def test_every_size_config_fits_its_seed_memory_row(size):
    """configs/<size>.yaml as shipped (micro-batch, accumulation, activation checkpointing, optimizer),
    on one GPU at the seed's 2048 tokens and 32,000-token vocabulary: memory.py's figure fits the row."""
    config = yaml.safe_load((REPO / "configs" / f"{size}.yaml").read_text())
    model, data, trainer = config["model"], config["data"], config["trainer"]
    assert model["preset"] == size and data["batch_size"] == GLOBAL_BATCH[size]
    devices = int(trainer.get("devices", 1)) * int(trainer.get("num_nodes", 1))
    accumulation, rest = divmod(data["batch_size"], data["micro_batch_size"] * devices)
    assert accumulation >= 1 and rest == 0, "the global batch must be whole micro-batches on every GPU"
    shape = ModelConfig.from_preset(size, vocab_size=32000, max_seq_len=2048, qk_norm=model.get("qk_norm"))
    figure = training_memory(
        shape, strategy="ddp", devices=1, micro_batch_size=data["micro_batch_size"], seq_len=2048,
        precision=trainer.get("precision", "bf16-mixed"), optimizer=model.get("optimizer", "adamw"),
        activation_checkpointing=model.get("activation_checkpointing", "none"), accumulation=accumulation,
    )  # fmt: skip
    assert str(trainer.get("precision", "bf16-mixed")) == "bf16-mixed"
    assert figure["total"] <= SEED_MEMORY_GB[size] * 1e9, {k: round(v / 1e9, 2) for k, v in figure.items()}


def test_the_formula_counts_muon_momentum_weight_copies_the_loss_and_unsharded_accumulation():
    """Each term the presets' figures rest on changes the total the way the memory it stands for does."""
    shape = ModelConfig.from_preset("small", vocab_size=32000, max_seq_len=2048)
    base = dict(micro_batch_size=2, seq_len=2048, activation_per_token=1000)
    adamw = training_memory(shape, optimizer="adamw", **base)
    muon = training_memory(shape, optimizer="muon", **base)
    assert adamw["optimizer"] - muon["optimizer"] == 4 * 12 * (4 * 768 * 768 + 3 * 768 * 2048)
    assert adamw["weight_copies"] == 2 * (num_parameters(shape) - 32000 * 768 - (2 * 12 + 1) * 768)
    assert "weight_copies" not in training_memory(shape, precision="32-true", **base)
    one_chunk = min(4096, 512 * 2**20 // (4 * 32000)) * 32000 * 6  # rows: the micro-batch's tokens at most
    assert adamw["loss"] == 4 * 32000 * 768 + 4096 * 768 * 2 + one_chunk
    sharded = training_memory(shape, strategy="fsdp", devices=4, **base)
    accumulating = training_memory(shape, strategy="fsdp", devices=4, accumulation=2, **base)
    assert accumulating["gradients"] - sharded["gradients"] == 4 * num_parameters(shape)


def test_a_meta_device_model_materialised_after_wrapping_equals_one_built_in_place():
    """The sharded path's order (build on meta, wrap, then storage and init) gives one process's weights
    and rotary tables for the same seed; the wrappers' name prefixes do not change the streams."""
    from llm_lightning.training.parallel.parallelize import materialize

    torch.manual_seed(3)
    plain = Transformer(CONFIG)
    torch.manual_seed(3)
    with torch.device("meta"):
        late = Transformer(CONFIG)
    parallelize(late, None, activation_checkpointing="full")
    materialize(late, torch.device("cpu"))
    assert set(late.state_dict()) == set(plain.state_dict())
    for name, value in plain.state_dict().items():
        assert torch.equal(late.state_dict()[name], value), name
    torch.testing.assert_close(late.rotary(0, 16), plain.rotary(0, 16), atol=0, rtol=0)
    assert not torch.equal(plain.layers[0].attn.qkv_proj.weight, plain.layers[1].attn.qkv_proj.weight)


def test_the_residual_stream_and_qk_are_in_the_compute_dtype_under_bf16_autocast():
    """As FSDP2's bf16 parameters make them: the block inputs, and q/k after QK-norm, are bf16 on one device too."""
    model = Transformer(ModelConfig(**{**CONFIG.to_dict(), "qk_norm": True}))
    seen = []
    model.layers[1].register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    model.layers[0].attn.q_norm.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 97, (2, 9)), targets=torch.randint(0, 97, (2, 9))).backward()
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert model.norm.weight.grad.dtype == torch.float32  # fp32 master weights and gradients
