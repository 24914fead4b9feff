"""Our Transformer in Hugging Face's Llama layout (Qwen3's, with QK-norm), and back.

The architectures are the same; only names differ, and we fuse q/k/v and gate/up into one
projection each (layers.py: `fuse_qkv`, `fuse_gate_up`). This module owns the whole mapping:
the config.json of an equivalent LlamaForCausalLM, the state dict both ways, and reading an
exported folder's weights back (`load_hf_weights`, for continued pretraining). `transformers`
is imported only by `to_hf_llama` (tests, benchmarks): export writes config.json and
safetensors without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llm_lightning.errors import UserError
from llm_lightning.model.config import ModelConfig
from llm_lightning.model.layers import fuse_gate_up, fuse_qkv, split_gate_up, split_qkv
from llm_lightning.model.transformer import Transformer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def hf_config(config: ModelConfig, eos_id: int | None = None) -> dict:
    """The config.json of an equivalent LlamaForCausalLM (Qwen3ForCausalLM with QK-norm: the
    same architecture plus an RMSNorm on each head's queries and keys)."""
    qwen3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "use_sliding_window": False}
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    return {
        **(qwen3 if config.qk_norm else llama),
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,  # read by transformers 4.x
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},  # 5.x
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": config.init_std,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }


def config_from_hf(values: dict) -> ModelConfig:
    rope = values.get("rope_parameters") or {}
    return ModelConfig(
        vocab_size=values["vocab_size"],
        hidden_size=values["hidden_size"],
        num_layers=values["num_hidden_layers"],
        num_heads=values["num_attention_heads"],
        num_kv_heads=values.get("num_key_value_heads") or values["num_attention_heads"],
        intermediate_size=values["intermediate_size"],
        max_seq_len=values.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", values.get("rope_theta", 10000.0))),
        norm_eps=values.get("rms_norm_eps", 1e-5),
        tie_embeddings=values.get("tie_word_embeddings", False),
        init_std=values.get("initializer_range", 0.02),
        qk_norm=values.get("model_type") == "qwen3",
    )


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    cfg = model.config
    state = {"model.embed_tokens.weight": model.embed_tokens.weight, "model.norm.weight": model.norm.weight}
    if not cfg.tie_embeddings:
        state["lm_head.weight"] = model.lm_head.weight
    for i, block in enumerate(model.layers):
        prefix = f"model.layers.{i}."
        q, k, v = split_qkv(block.attn.qkv_proj.weight, cfg)
        gate, up = split_gate_up(block.mlp.gate_up_proj.weight)
        state.update(
            {
                prefix + "input_layernorm.weight": block.attn_norm.weight,
                prefix + "self_attn.q_proj.weight": q,
                prefix + "self_attn.k_proj.weight": k,
                prefix + "self_attn.v_proj.weight": v,
                prefix + "self_attn.o_proj.weight": block.attn.o_proj.weight,
                prefix + "post_attention_layernorm.weight": block.mlp_norm.weight,
                prefix + "mlp.gate_proj.weight": gate,
                prefix + "mlp.up_proj.weight": up,
                prefix + "mlp.down_proj.weight": block.mlp.down_proj.weight,
            }
        )
        if cfg.qk_norm:
            state[prefix + "self_attn.q_norm.weight"] = block.attn.q_norm.weight
            state[prefix + "self_attn.k_norm.weight"] = block.attn.k_norm.weight
    return {name: tensor.detach().contiguous() for name, tensor in state.items()}


def from_hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict from a Llama one (the way back, for continued pretraining)."""
    ours = {
        "embed_tokens.weight": state["model.embed_tokens.weight"],
        "norm.weight": state["model.norm.weight"],
    }
    ours["lm_head.weight"] = state.get("lm_head.weight", state["model.embed_tokens.weight"])
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        q, k, v = (state[p + f"self_attn.{n}_proj.weight"] for n in "qkv")
        ours.update(
            {
                f"layers.{i}.attn_norm.weight": state[p + "input_layernorm.weight"],
                f"layers.{i}.attn.qkv_proj.weight": fuse_qkv(q, k, v, config),
                f"layers.{i}.attn.o_proj.weight": state[p + "self_attn.o_proj.weight"],
                f"layers.{i}.mlp_norm.weight": state[p + "post_attention_layernorm.weight"],
                f"layers.{i}.mlp.gate_up_proj.weight": fuse_gate_up(
                    state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"]
                ),
                f"layers.{i}.mlp.down_proj.weight": state[p + "mlp.down_proj.weight"],
            }
        )
        if config.qk_norm:
            ours[f"layers.{i}.attn.q_norm.weight"] = state[p + "self_attn.q_norm.weight"]
            ours[f"layers.{i}.attn.k_norm.weight"] = state[p + "self_attn.k_norm.weight"]
    return ours


def to_hf_llama(model: Transformer):
    """An in-memory transformers model with our weights (needs `transformers`): LlamaForCausalLM,
    or Qwen3ForCausalLM for a model with QK-norm."""
    import transformers

    values = hf_config(model.config)
    name = values["architectures"][0]
    config_class = getattr(transformers, name.replace("ForCausalLM", "Config"))
    hf = getattr(transformers, name)(config_class(**values))
    hf.load_state_dict(to_hf_state_dict(model), strict=not model.config.tie_embeddings)
    return hf


def load_hf_weights(model: Transformer, folder: str | Path, flag: str = "--model.init_from") -> None:
    """Copy the weights of an exported Llama folder into `model` (continued pretraining).

    The folder's config.json must describe the same architecture as `model.config`; the
    context length may differ (rotary embeddings extend).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise UserError(
            f"{flag} {folder}: needs {CONFIG_FILE} and {WEIGHTS_FILE} (a folder written by `llm-lightning export`)"
        )
    try:
        theirs = config_from_hf(json.loads((folder / CONFIG_FILE).read_text()))
    except (json.JSONDecodeError, KeyError, TypeError, UserError) as error:
        raise UserError(f"{flag} {folder}/{CONFIG_FILE}: not a Llama config ({error})") from None
    ours = model.config
    have, want = theirs.architecture(), ours.architecture()
    differ = [name for name in want if have[name] != want[name]]
    if differ:
        raise UserError(
            f"{flag} {folder}: the exported model has {', '.join(f'{n}={have[n]}' for n in differ)} but this "
            f"run's model has {', '.join(f'{n}={want[n]}' for n in differ)}; pass the same model sizes "
            "(and data prepared with the same tokenizer)"
        )
    try:
        state = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, OSError) as error:
        raise UserError(f"{flag} {folder}/{WEIGHTS_FILE}: unreadable ({error})") from None
    try:
        model.load_state_dict(from_hf_state_dict(state, ours))
    except KeyError as error:
        raise UserError(f"{flag} {folder}/{WEIGHTS_FILE}: missing tensor {error}") from None
    except RuntimeError as error:
        raise UserError(f"{flag} {folder}/{WEIGHTS_FILE}: {str(error).splitlines()[-1].strip()}") from None
