"""`llm-lightning bench`, and the exactness of the optimizations it measures. No timing assertions."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from llm_lightning.errors import UserError
from llm_lightning.model import ModelConfig, Transformer
from llm_lightning.model.layers import apply_rotary, linear_cross_entropy
from llm_lightning.tools import bench
from tests.conftest import randomized, run_cli

TINY = ["--hidden_size", "32", "--num_layers", "1", "--num_heads", "4", "--vocab_size", "64"]
TINY += ["--seq_len", "16", "--micro_batch_size", "2", "--steps", "2", "--warmup", "1", "--device", "cpu"]


@pytest.mark.parametrize("mode", ["loop", "fit"])
def test_bench_writes_valid_json(mode, tmp_path):
    path = tmp_path / "out" / "bench.json"
    assert bench.main([*TINY, "--mode", mode, "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["mode"] == mode
    assert len(result["step_times_s"]) == 2
    assert result["tokens_per_step"] == 2 * 16
    assert result["tokens_per_s"] > 0 and result["achieved_tflops"] > 0
    assert result["mfu"] > 0 and result["peak_memory_bytes"] > 0
    step = result["step_time_s"]
    assert step["min"] <= step["median"] <= step["max"]
    if mode == "fit":
        assert 0 <= result["data_wait_share"] < 1
    else:
        assert result["data_wait_share"] is None


def test_bench_profile_names_where_the_step_time_goes(capsys):
    assert bench.main([*TINY, "--profile", "5"]) == 0
    table = capsys.readouterr().out
    assert "op (self time)" in table and "aten::" in table
    result = bench.run(bench.parse_args([*TINY, "--profile", "50"]))
    ops = {op["op"]: op for op in result["profile"]}
    assert "aten::mm" in ops  # the matrix products are there, with a share of the step
    assert all(0 < op["share"] <= 1 and op["calls"] > 0 for op in ops.values())
    assert sum(op["share"] for op in ops.values()) <= 1 + 1e-6


@pytest.mark.parametrize(
    "args, message",
    [
        (["--profile", "5", "--mode", "fit"], "--profile"),
        (["--precision", "fp8"], "--precision fp8"),
        (["--mode", "train"], "--mode train"),
        (["--steps", "0"], "--steps 0"),
        (["--device", "tpu"], "--device tpu"),
        (["--num_heads", "3"], "num_heads"),
    ],
)
def test_bad_bench_flags_raise_user_errors(args, message):
    with pytest.raises(UserError, match=message):
        bench.main([*TINY, *args])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_one_line_and_exit_2():
    result = run_cli("bench", *TINY, "--device", "cuda")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--device cuda" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def plain_rotary(x, cos, sin):
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


def test_rotary_matches_the_plain_formula_forward_and_backward():
    torch.manual_seed(0)
    base = torch.randn(2, 10, 3, 8, dtype=torch.float64, requires_grad=True)
    angles = torch.outer(torch.arange(10.0), torch.rand(4)).repeat(1, 2).double()
    cos, sin = angles.cos(), angles.sin()
    upstream = torch.randn(2, 3, 10, 8, dtype=torch.float64)
    ours = apply_rotary(base.transpose(1, 2), cos, sin)  # the strided layout attention passes
    (expected_grad,) = torch.autograd.grad(
        (plain_rotary(base.transpose(1, 2), cos, sin) * upstream).sum(), base
    )
    (ours_grad,) = torch.autograd.grad((ours * upstream).sum(), base)
    torch.testing.assert_close(ours, plain_rotary(base.transpose(1, 2), cos, sin))
    torch.testing.assert_close(ours_grad, expected_grad)


@pytest.mark.parametrize("chunk_rows", [7, 64, 1000])
def test_chunked_cross_entropy_matches_the_plain_one_to_fp32_tolerance(chunk_rows):
    torch.manual_seed(0)
    hidden = torch.randn(150, 32, requires_grad=True)
    weight = (0.3 * torch.randn(97, 32)).requires_grad_()
    targets = torch.randint(0, 97, (150,))
    expected = F.cross_entropy(F.linear(hidden, weight), targets)
    expected_grads = torch.autograd.grad(2.5 * expected, (hidden, weight))
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows)
    grads = torch.autograd.grad(2.5 * loss, (hidden, weight))
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        per_token = linear_cross_entropy(hidden, weight, targets, reduction="none", chunk_rows=chunk_rows)
    expected_per_token = F.cross_entropy(F.linear(hidden, weight), targets, reduction="none")
    torch.testing.assert_close(per_token, expected_per_token, atol=1e-6, rtol=1e-6)


def test_chunked_cross_entropy_under_bf16_autocast_matches_the_plain_one():
    """The same arithmetic as lm_head under autocast: bf16 logits, fp32 softmax."""
    torch.manual_seed(0)
    hidden = torch.randn(300, 64, requires_grad=True)
    weight = (0.1 * torch.randn(500, 64)).requires_grad_()
    targets = torch.randint(0, 500, (300,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.cross_entropy(F.linear(hidden, weight).float(), targets)
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=128)
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    grads = torch.autograd.grad(loss, (hidden, weight))
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=2e-2 * want.abs().max().item(), rtol=0)


def test_model_loss_equals_cross_entropy_of_its_logits():
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=32
    )
    model = randomized(Transformer(config))
    ids = torch.randint(0, 97, (3, 17))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    expected = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    loss = model(inputs, targets=targets)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, expected)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    with torch.no_grad():
        per_token = model(inputs, targets=targets, reduction="none")
    torch.testing.assert_close(per_token.mean(), expected)
