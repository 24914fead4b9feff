"""The parallelism pieces on one process: activation checkpointing, the gradient norm, memory accounting."""

from __future__ import annotations

import json

import pytest
import torch

from llm_lightning.model import ModelConfig, Transformer, num_parameters
from llm_lightning.training.optim import build_optimizer
from llm_lightning.training.parallel import clip_grad_norm, grad_norm, parallelize
from llm_lightning.training.parallel.memory import held_bytes, measure_activations, training_memory
from tests.conftest import randomized, run_cli

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
