"""Optimizer parameter groups and the learning-rate schedule."""

import pytest

from llm_lightning.model import ModelConfig, Transformer
from llm_lightning.training.optim import parameter_groups, warmup_cosine


@pytest.mark.parametrize("tie", [False, True])
def test_decay_on_linear_and_embedding_weights_only_each_parameter_once(tie):
    model = Transformer(
        ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, tie_embeddings=tie)
    )
    decay, no_decay = parameter_groups(model, weight_decay=0.1)
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    listed = [id(p) for group in (decay, no_decay) for p in group["params"]]
    assert sorted(listed) == sorted(id(p) for p in model.parameters())
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)


def test_warmup_then_cosine_to_the_floor():
    lr = [warmup_cosine(step, warmup_steps=10, max_steps=110, min_ratio=0.1) for step in range(120)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:], strict=False))
    assert lr[60] == pytest.approx(0.55) and lr[110] == pytest.approx(0.1) and lr[119] == pytest.approx(0.1)
