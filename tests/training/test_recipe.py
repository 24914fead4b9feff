"""The training recipe's pieces: schedules (WSD extends on resume), z-loss, QK-norm's export."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llm_lightning.model import ModelConfig, Transformer
from llm_lightning.model.hf import to_hf_llama
from llm_lightning.model.loss import linear_cross_entropy
from llm_lightning.training.optim import schedule
from tests.conftest import fit, randomized, records


def test_the_schedules_warm_up_then_decay_to_the_floor():
    for name in ("cosine", "linear", "wsd"):
        f = schedule(name, warmup_steps=10, max_steps=100, min_ratio=0.1, decay_fraction=0.2)
        assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)  # linear warmup
        assert f(100) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)  # the floor, also past the end
        values = [f(step) for step in range(10, 101)]
        assert all(a >= b - 1e-12 for a, b in zip(values, values[1:], strict=False))  # never rises
    wsd = schedule("wsd", warmup_steps=10, max_steps=100, min_ratio=0.1, decay_fraction=0.2)
    assert [wsd(s) for s in (10, 50, 80)] == [1.0, 1.0, 1.0]  # stable until the last 20%
    assert wsd(90) == pytest.approx(0.55)  # linear: half way down
    sqrt = schedule("wsd", 10, 100, 0.1, decay_fraction=0.2, decay_shape="sqrt")
    assert sqrt(90) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.5)))
    assert schedule("linear", 10, 100, 0.0)(55) == pytest.approx(0.5)


def test_a_wsd_run_extended_on_resume_continues_at_the_peak(prepared_dir, tmp_path):
    """10 of 20 steps (stable phase), resumed with max_steps 40: no jump, the decay moves to the end."""
    wsd = ("--model.lr_schedule", "wsd", "--model.decay_fraction", "0.25", "--model.warmup_steps", "2")
    ckpts = tmp_path / "ckpts"
    assert fit(prepared_dir, ckpts, *wsd, steps=10).returncode == 0  # horizon 10: decay in steps 8-10
    shorter = {r["step"]: r["lr"] for r in records(ckpts, "train")}
    assert shorter[5] == pytest.approx(3e-3) and shorter[10] == pytest.approx(3e-4)
    stable = tmp_path / "stable"
    assert fit(prepared_dir, stable, *wsd, "--model.max_steps", "20", steps=10).returncode == 0
    resumed = fit(prepared_dir, stable, *wsd, "--ckpt_path", "last", steps=40)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    lr = {r["step"]: r["lr"] for r in records(stable, "train")}
    assert lr[10] == lr[15] == lr[25] == pytest.approx(3e-3)  # the peak on both sides of the resume
    assert lr[35] == pytest.approx(3e-3 * (0.1 + 0.9 * 0.5)) and lr[40] == pytest.approx(3e-4)


def test_z_loss_adds_its_term_and_its_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    logits = hidden @ weight.t()
    expected = F.cross_entropy(logits, targets) + 1e-2 * torch.logsumexp(logits, dim=-1).square().mean()
    expected.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ours = linear_cross_entropy(hidden, weight, targets, chunk_rows=8, z_loss=1e-2)
    ours.backward()
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(hidden.grad, grads[0])
    torch.testing.assert_close(weight.grad, grads[1])
    plain = linear_cross_entropy(hidden, weight, targets, chunk_rows=8)
    assert torch.equal(linear_cross_entropy(hidden, weight, targets, chunk_rows=8, z_loss=0.0), plain)
    torch.testing.assert_close(plain, F.cross_entropy(logits.detach(), targets))


def test_qk_norm_exports_as_qwen3_with_the_same_logits():
    config = ModelConfig(
        vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, qk_norm=True
    )
    model = randomized(Transformer(config)).eval()
    hf = to_hf_llama(model).eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    ids = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-4
    no_norm = ModelConfig(**{**config.to_dict(), "qk_norm": False})
    assert type(to_hf_llama(Transformer(no_norm))).__name__ == "LlamaForCausalLM"
