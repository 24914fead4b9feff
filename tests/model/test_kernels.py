"""The fused kernels are exact: rotary embedding and the chunked LM-head loss against the plain formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm_lightning.model import ModelConfig, Transformer
from llm_lightning.model.layers import apply_rotary
from llm_lightning.model.loss import linear_cross_entropy
from tests.conftest import randomized


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


# Importing inductor scripts a torch.jit class, which torch 2.13 deprecates (not ours to fix).
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_chunk_work_matches_the_plain_loss_with_z_loss():
    """The per-chunk work through torch.compile (what CUDA runs) against the plain formulas, on a CPU."""
    from llm_lightning.model.loss import _LinearCrossEntropy

    torch.manual_seed(0)
    hidden = torch.randn(96, 32, requires_grad=True)
    weight = (0.3 * torch.randn(97, 32)).requires_grad_()
    targets = torch.randint(0, 97, (96,))
    z = 1e-2
    logits = F.linear(hidden, weight)
    expected = F.cross_entropy(logits, targets) + z * torch.logsumexp(logits, dim=-1).square().mean()
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    loss = _LinearCrossEntropy.apply(hidden, weight, targets, 48, z, True)  # two chunks, one shape
    grads = torch.autograd.grad(loss, (hidden, weight))
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_cudnn_first_attention_order_leaves_cpu_results_unchanged():
    """attention_priority only reorders kernels: on a CPU (no cuDNN) the same numbers, and it is restored."""
    from llm_lightning.model import layers

    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=32
    )
    model = randomized(Transformer(config))
    ids = torch.randint(0, 97, (2, 17))
    order = torch._C._get_sdp_priority_order()
    expected = model(ids)
    layers.attention_priority = "cudnn"
    try:
        torch.testing.assert_close(model(ids), expected, atol=0, rtol=0)
    finally:
        layers.attention_priority = "auto"
    assert torch._C._get_sdp_priority_order() == order


def test_compile_setting_is_auto_true_or_false():
    from llm_lightning.errors import UserError
    from llm_lightning.training.module import LanguageModel, resolve_compile

    assert LanguageModel(vocab_size=97, max_length=16, preset="tiny").hparams.compile == "auto"
    assert resolve_compile("auto", torch.device("cuda")) and not resolve_compile("auto", torch.device("cpu"))
    assert resolve_compile(True, torch.device("cpu")) and not resolve_compile(False, torch.device("cuda"))
    with pytest.raises(UserError, match="--model.compile"):
        LanguageModel(vocab_size=97, max_length=16, preset="tiny", compile="sometimes")
