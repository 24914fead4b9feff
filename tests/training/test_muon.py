"""Muon + AdamW as one optimizer: every parameter once, torch's math, fused parts, loss scaling,
and through the real CLI: exact resume, accumulation, DDP and FSDP2 equal to one process.

The CLI runs orthogonalise in fp32 (--model.muon_precision float32), so that differences are the
gradients' summation order only; Newton-Schulz enlarges small differences (its slope near 0 is
~3.4 per iteration), hence the tolerances of 1e-4 on val losses and 2e-3 on single weights.
"""

from __future__ import annotations

import pytest
import torch

from llm_lightning.model import ModelConfig, Transformer
from llm_lightning.model.layers import split_gate_up, split_qkv
from llm_lightning.training.optim.muon import MuonAdamW, build_muon_adamw, muon_adamw_groups, newton_schulz
from tests.conftest import REPO, assert_same_weights, fit, fit_flags, randomized, records, run_cli, weights
from tests.distributed.conftest import DIST_ENV

CONFIG = ModelConfig(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=16)
MUON = ("--model.optimizer", "muon", "--model.muon_precision", "float32", "--model.max_steps", "20")


@pytest.mark.parametrize("tied", [False, True])
def test_the_groups_hold_every_parameter_once(tied):
    model = Transformer(ModelConfig(**{**CONFIG.to_dict(), "tie_embeddings": tied}))
    groups = muon_adamw_groups(
        model, lr=1e-3, weight_decay=0.1, muon_lr=0.02, muon_weight_decay=0.0, lr_rule="original"
    )
    listed = [id(p) for group in groups for p in group["params"]]
    assert len(listed) == len(set(listed)) == len({id(p) for p in model.parameters()})
    muon = {id(p) for g in groups if g["kind"] == "muon" for p in g["params"]}
    matrices = {
        id(m.weight) for block in model.layers for m in block.modules() if isinstance(m, torch.nn.Linear)
    }
    assert muon == matrices  # the embedding, the head and every gain stay with AdamW


def test_one_matrix_is_torchs_muon_bit_for_bit():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(48, 32))
    twin = torch.nn.Parameter(weight.detach().clone())
    ours = MuonAdamW(
        [{"kind": "muon", "params": [weight], "ns_dtype": "bfloat16"}], muon_defaults={"lr": 0.02}
    )
    theirs = torch.optim.Muon([twin], lr=0.02, weight_decay=0.0)
    for _ in range(3):
        grad = torch.randn(48, 32)
        weight.grad, twin.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    assert torch.equal(weight, twin)


def test_fused_parts_are_orthogonalised_as_separate_matrices():
    model = randomized(Transformer(CONFIG))
    optimizer = build_muon_adamw(model, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), muon_lr=0.02, muon_momentum=0.0,
                                 muon_weight_decay=0.0, lr_rule="original", device=torch.device("cpu"), precision="float32")  # fmt: skip
    attn, mlp = model.layers[0].attn, model.layers[0].mlp
    before = attn.qkv_proj.weight.detach().clone(), mlp.gate_up_proj.weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    grads = attn.qkv_proj.weight.grad.clone(), mlp.gate_up_proj.weight.grad.clone()
    optimizer.step()

    def expected(grad, weight_before, parts):
        steps = []
        for part in parts(grad):  # momentum 0, nesterov: the update is the gradient itself
            scale = max(1.0, part.shape[0] / part.shape[1]) ** 0.5
            steps.append(newton_schulz(part, (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.float32) * scale)
        return steps

    q, k, v = expected(grads[0], before[0], lambda g: split_qkv(g, CONFIG))
    moved = split_qkv(before[0] - attn.qkv_proj.weight.detach(), CONFIG)
    for got, want in zip(moved, (q, k, v), strict=True):
        torch.testing.assert_close(got, 0.02 * want, atol=1e-6, rtol=1e-4)
    gate, up = expected(grads[1], before[1], split_gate_up)
    moved = split_gate_up(before[1] - mlp.gate_up_proj.weight.detach())
    torch.testing.assert_close(moved[0], 0.02 * gate, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(moved[1], 0.02 * up, atol=1e-6, rtol=1e-4)


def test_a_loss_scaler_changes_nothing_and_skips_an_inf_step():
    torch.manual_seed(0)
    results = []
    for scale in (None, 2.0**12):
        model = randomized(Transformer(CONFIG))
        optimizer = build_muon_adamw(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), muon_lr=0.02,
                                     muon_momentum=0.95, muon_weight_decay=0.0, lr_rule="original",
                                     device=torch.device("cpu"), precision="float32")  # fmt: skip
        scaler = torch.amp.GradScaler("cpu", init_scale=scale or 1.0, enabled=scale is not None)
        ids = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(1))
        for _ in range(2):
            scaler.scale(model(ids[:, :-1], targets=ids[:, 1:])).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
        results.append({k: v.clone() for k, v in model.state_dict().items()})
        if scale:
            before = {k: v.clone() for k, v in model.state_dict().items()}
            model(ids[:, :-1], targets=ids[:, 1:]).backward()
            next(model.parameters()).grad[0] = float("inf")
            scaler.step(optimizer)  # skipped: nothing moves
            scaler.update()
            assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
            assert scaler.get_scale() == scale / 2
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def muon_runs(prepared_dir, tmp_path_factory) -> dict:
    """20 steps of batch 8: one process (micro-batches of 4), micro-batches of 8, 10 + resume 10."""
    root = tmp_path_factory.mktemp("muon")
    runs = {"one": root / "one" / "ckpts", "big": root / "big" / "ckpts", "split": root / "split" / "ckpts"}
    for folder in runs.values():
        folder.parent.mkdir()
    assert fit(prepared_dir, runs["one"], *MUON, steps=20).returncode == 0
    assert fit(prepared_dir, runs["big"], *MUON, steps=20, micro=8).returncode == 0
    assert fit(prepared_dir, runs["split"], *MUON, steps=10).returncode == 0
    resumed = fit(prepared_dir, runs["split"], *MUON, "--ckpt_path", "last", steps=20)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return runs


def test_muon_resumes_exactly(muon_runs):
    assert_same_weights(muon_runs["one"] / "last.ckpt", muon_runs["split"] / "last.ckpt")  # bit for bit
    val = lambda folder: [r["val/loss"] for r in records(folder, "val")]  # noqa: E731
    assert val(muon_runs["one"]) == val(muon_runs["split"])
    assert "lr/muon" in records(muon_runs["one"], "train")[-1]


def assert_close_runs(a, b) -> None:
    assert records(a, "val")[-1]["val/loss"] == pytest.approx(records(b, "val")[-1]["val/loss"], abs=1e-4)
    wa, wb = weights(a / "last.ckpt"), weights(b / "last.ckpt")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 2e-3


def test_muon_with_accumulation_equals_one_big_batch(muon_runs):
    assert_close_runs(muon_runs["one"], muon_runs["big"])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_muon_on_two_processes_equals_one_with_accumulation(strategy, muon_runs, prepared_dir, tmp_path):
    """DDP, and FSDP2 (the whole matrix gathered for the orthogonalisation), against one process."""
    ckpts = tmp_path / "ckpts"
    ckpts.parent.mkdir(exist_ok=True)
    launch = (
        ("--trainer.strategy", "ddp")
        if strategy == "ddp"
        else ("--config", REPO / "configs/strategy/fsdp.yaml")
    )
    flags = fit_flags(
        prepared_dir, ckpts, *MUON, *launch, "--trainer.devices", 2, "--trainer.accelerator", "cpu"
    )
    result = run_cli("fit", *flags, cwd=tmp_path, env=DIST_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_close_runs(muon_runs["one"], ckpts)
