"""The decoder-only transformer, plain `torch.nn` (no Lightning), Llama-compatible.

Notable:
- pre-normalisation: x + attn(norm(x)), then x + mlp(norm(x)), and a final RMSNorm;
- grouped-query attention through SDPA (flash / memory-efficient kernels where available);
- rotary position embeddings, extendable past `max_seq_len`;
- SwiGLU feed-forward; optional tied input/output embeddings;
- a KV cache for incremental decoding (`new_cache`, then `forward(ids, cache=cache)`);
- `forward(ids, targets=...)` returns the loss, computed chunk by chunk so the full
  (tokens x vocab) logits and their gradient are never held at once;
- init: normal(0, init_std) everywhere (by default sqrt(2 / (5 x hidden)), scaled to the width)
  except the projections that write into the residual stream (attention o_proj, MLP
  down_proj), which start at zero, so every block starts as the identity and the stream's
  variance does not grow with depth. On tinyshakespeare this reaches a lower loss in the same
  steps than GPT-2's 0.02 with 1/sqrt(2 x layers) scaled projections, or litgpt's init
  (README, Performance).
Weights map one to one onto Hugging Face's LlamaForCausalLM (q/k/v and gate/up are fused
here, in layouts an even row split keeps whole heads of, and split apart on export: hf.py).
"""

from __future__ import annotations

import torch
from torch import nn

from llm_lightning.model.config import ModelConfig
from llm_lightning.model.layers import Attention, KVCache, RMSNorm, RotaryEmbedding, SwiGLU
from llm_lightning.model.loss import linear_cross_entropy


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attn = Attention(config, layer_index)
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = SwiGLU(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin, cache))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        # The LM-head loss, an attribute so that parallelism applied from outside can swap in
        # a version for a vocabulary-split head (training/parallel/loss.py).
        self.head_loss = linear_cross_entropy
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, param in self.named_parameters():
            if param.dim() == 1:  # norm weights
                nn.init.ones_(param)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):  # writes into the residual stream
                nn.init.zeros_(param)
            else:
                nn.init.normal_(param, mean=0.0, std=self.config.init_std)

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype=None) -> KVCache:
        weight = self.embed_tokens.weight
        return KVCache(
            self.config, batch_size, max_len or self.config.max_seq_len, weight.device, dtype or weight.dtype
        )

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The final normalised hidden states, (batch, seq, hidden): everything but the LM head."""
        start = cache.length if cache is not None else 0
        cos, sin = self.rotary(start, input_ids.shape[1])
        x = self.embed_tokens(input_ids)
        for block in self.layers:
            x = block(x, cos, sin, cache)
        if cache is not None:
            cache.length += input_ids.shape[1]
        return self.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        targets: torch.Tensor | None = None,
        reduction: str = "mean",
        z_loss: float = 0.0,
    ) -> torch.Tensor:
        """Logits (batch, seq, vocab) for token ids (batch, seq).

        With `targets` (batch, seq), the cross entropy instead: the mean over tokens, or
        per-token losses (batch x seq,) with reduction="none", computed without materialising
        the whole (batch, seq, vocab) logits (see `linear_cross_entropy`); `z_loss` adds its
        coefficient x logsumexp^2 to the mean.
        """
        hidden = self.hidden_states(input_ids, cache)
        if targets is None:
            return self.lm_head(hidden)
        return self.head_loss(
            hidden.flatten(0, 1), self.lm_head.weight, targets.flatten(), reduction, z_loss=z_loss
        )
