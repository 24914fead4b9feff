"""The transformer: shapes, causality, GQA, RoPE, KV cache, presets, and parity with HF Llama."""

import pytest
import torch

from llm_lightning.errors import UserError
from llm_lightning.model import PRESETS, ModelConfig, Transformer, flops_per_token, num_parameters
from llm_lightning.model.layers import (
    RotaryEmbedding,
    apply_rotary,
    fuse_gate_up,
    fuse_qkv,
    split_gate_up,
    split_qkv,
)
from tests.conftest import randomized


def small_config(**overrides) -> ModelConfig:
    values = dict(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=32)
    return ModelConfig(**{**values, **overrides})


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_logits_shape_and_parameter_count():
    config = small_config()
    model = Transformer(config)
    logits = model(torch.randint(0, 97, (3, 11)))
    assert logits.shape == (3, 11, 97)
    assert sum(p.numel() for p in model.parameters()) == num_parameters(config)


def test_tied_embeddings_share_one_matrix():
    config = small_config(tie_embeddings=True)
    model = Transformer(config)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == num_parameters(config)


def test_causal_changing_a_token_leaves_earlier_logits_unchanged():
    model = randomized(Transformer(small_config())).eval()
    ids = torch.randint(0, 97, (2, 16))
    changed = ids.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 97
    before, after = model(ids), model(changed)
    torch.testing.assert_close(before[:, :9], after[:, :9])
    assert not torch.allclose(before[:, 9:], after[:, 9:])


def test_gqa_with_all_kv_heads_equals_multi_head_attention():
    """num_kv_heads == num_heads must be plain MHA: compare with an explicit softmax attention."""
    config = small_config(num_kv_heads=4, num_layers=1)
    model = randomized(Transformer(config)).eval()
    attn = model.layers[0].attn
    x = torch.randn(2, 10, 64)
    cos, sin = model.rotary(0, 10)
    q, k, v = (x @ w.t() for w in split_qkv(attn.qkv_proj.weight, config))
    q, k, v = (t.view(2, 10, 4, 16).transpose(1, 2) for t in (q, k, v))
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    scores = (q @ k.transpose(-1, -2)) / 16**0.5
    scores = scores.masked_fill(torch.ones(10, 10).triu(1).bool(), float("-inf"))
    expected = attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 10, 64))
    torch.testing.assert_close(attn(x, cos, sin), expected, atol=1e-5, rtol=1e-5)


def test_gqa_shares_each_kv_head_across_its_query_group():
    """A GQA model equals an MHA model whose k/v weights repeat each kv head for its group."""
    gqa = randomized(Transformer(small_config(num_kv_heads=2))).eval()
    mha = randomized(Transformer(small_config(num_kv_heads=4))).eval()
    state = gqa.state_dict()
    for i in range(2):
        w = state[f"layers.{i}.attn.qkv_proj.weight"]
        q, k, v = split_qkv(w, gqa.config)
        repeat = lambda t: t.view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)  # noqa: E731
        state[f"layers.{i}.attn.qkv_proj.weight"] = fuse_qkv(q, repeat(k), repeat(v), mha.config)
    mha.load_state_dict(state)
    ids = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(gqa(ids), mha(ids), atol=1e-5, rtol=1e-5)


def test_rope_dot_products_depend_only_on_relative_position():
    rotary = RotaryEmbedding(head_dim=16, max_seq_len=8, theta=10000.0)
    q, k = torch.randn(16), torch.randn(16)

    def score(pos_q: int, pos_k: int) -> torch.Tensor:
        cos, sin = rotary(0, 64)  # also grows the table past max_seq_len
        rq = apply_rotary(q.view(1, 1, 1, 16), cos[pos_q], sin[pos_q])
        rk = apply_rotary(k.view(1, 1, 1, 16), cos[pos_k], sin[pos_k])
        return (rq * rk).sum()

    torch.testing.assert_close(score(5, 2), score(40, 37), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_kv_cache_decoding_matches_full_forward():
    model = randomized(Transformer(small_config())).eval()
    ids = torch.randint(0, 97, (2, 20))
    full = model(ids)
    cache = model.new_cache(batch_size=2, max_len=20)
    steps = [model(ids[:, :7], cache=cache)]  # prefill, then a chunk, then one token at a time
    steps.append(model(ids[:, 7:10], cache=cache))
    steps += [model(ids[:, t : t + 1], cache=cache) for t in range(10, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_forward_and_backward_on_cpu():
    model = randomized(Transformer(small_config()))
    ids = torch.randint(0, 97, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
    assert logits.dtype == torch.bfloat16
    logits.float().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_init_scales_with_width_and_blocks_start_as_the_identity():
    config = ModelConfig(vocab_size=100, hidden_size=256, num_layers=8, num_heads=4)
    assert config.init_std == pytest.approx((2 / (5 * 256)) ** 0.5)
    assert ModelConfig(vocab_size=100, hidden_size=256, num_heads=4, init_std=0.02).init_std == 0.02
    model = Transformer(config)
    for block in model.layers:
        assert not block.attn.o_proj.weight.any() and not block.mlp.down_proj.weight.any()
        assert block.attn.qkv_proj.weight.std().item() == pytest.approx(config.init_std, rel=0.05)
    assert model.embed_tokens.weight.std().item() == pytest.approx(config.init_std, rel=0.05)
    x = torch.randn(2, 5, 256)
    cos, sin = model.rotary(0, 5)
    torch.testing.assert_close(model.layers[0](x, cos, sin), x)  # identity until trained


SEED_TABLE = {"tiny": 20e6, "small": 125e6, "medium": 350e6, "large": 800e6, "xl": 1.5e9}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_counts_near_the_seed_table(name):
    config = ModelConfig.from_preset(name, vocab_size=32000)
    assert abs(num_parameters(config) / SEED_TABLE[name] - 1) < 0.10
    with torch.device("meta"):
        model = Transformer(config)
    assert sum(p.numel() for p in model.parameters()) == num_parameters(config)


def test_preset_overrides_win():
    config = ModelConfig.from_preset("tiny", num_layers=2, num_kv_heads=None)
    assert (config.hidden_size, config.num_layers, config.num_kv_heads) == (256, 2, 8)


@pytest.mark.parametrize(
    "values, field",
    [
        (dict(hidden_size=100, num_heads=3), "num_heads"),
        (dict(num_heads=12, num_kv_heads=5), "num_kv_heads"),
        (dict(num_layers=0), "num_layers"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(dropout=1.5), "dropout"),
    ],
)
def test_invalid_configs_name_the_field(values, field):
    with pytest.raises(UserError, match=field):
        ModelConfig(**values)
    with pytest.raises(UserError, match="preset"):
        ModelConfig.from_preset("huge")


def test_flops_per_token_follows_the_palm_count():
    config = ModelConfig.from_preset("small", vocab_size=32000)
    h, layers = 768, 12
    matmuls = layers * (4 * h * h + 3 * h * 2048) + 32000 * h
    assert flops_per_token(config, seq_len=1024) == 6 * matmuls + 12 * layers * h * 1024


def test_logits_match_hugging_face_llama():
    """Our weights in transformers' LlamaForCausalLM give the same logits (fp32)."""
    from llm_lightning.model.hf import to_hf_llama

    config = small_config(tie_embeddings=False)
    model = randomized(Transformer(config)).eval()
    hf = to_hf_llama(model).eval()
    ids = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_fused_layouts_give_each_row_split_whole_heads(kv_heads):
    """Splitting the fused rows in two (as tensor parallelism does) gives each half whole
    key/value groups of q, k and v, and matching halves of gate and up."""
    config = small_config(num_kv_heads=kv_heads)
    d, hidden, groups = config.head_dim, config.hidden_size, config.kv_groups
    q, k, v = (torch.randn(n * d, hidden) for n in (config.num_heads, kv_heads, kv_heads))
    fused = fuse_qkv(q, k, v, config)
    for back, plain in zip(split_qkv(fused, config), (q, k, v), strict=True):
        assert torch.equal(back, plain)
    if kv_heads % 2 == 0:  # the first half of the rows: whole groups 0 .. kv_heads/2 - 1
        block = lambda t, g, n: t[g * n * d : (g + 1) * n * d]  # noqa: E731 - rows of group g
        expected = [
            part
            for g in range(kv_heads // 2)
            for part in (block(q, g, groups), block(k, g, 1), block(v, g, 1))
        ]
        assert torch.equal(fused.chunk(2)[0], torch.cat(expected))
    gate, up = torch.randn(2, 8, hidden)
    top = split_gate_up(fuse_gate_up(gate, up).chunk(2)[0])
    assert torch.equal(top[0], gate[:4]) and torch.equal(top[1], up[:4])
