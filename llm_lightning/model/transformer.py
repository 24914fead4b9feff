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
  (README, Performance). Each parameter is drawn from its own generator, seeded by the model's
  seed (drawn from torch's global RNG when the model is built), the parameter's name and a
  block of rows (`init_weights`): so a model built on the meta device and sharded before it is
  initialised draws only its own rows and gets the weights one process would have.
Weights map one to one onto Hugging Face's LlamaForCausalLM (q/k/v and gate/up are fused
here, in layouts an even row split keeps whole heads of, and split apart on export: hf.py).
"""

from __future__ import annotations

import zlib
from functools import partial

import torch
from torch import nn

from llm_lightning.model.config import ModelConfig
from llm_lightning.model.layers import Attention, KVCache, RMSNorm, RotaryEmbedding, SwiGLU, attention_kernels
from llm_lightning.model.loss import compute_dtype, linear_cross_entropy


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


# Rows drawn from one generator in the initialisation (any multiple of it gives a rank its rows cheaply).
INIT_BLOCK_ROWS = 64


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # Drawn first and on the CPU: the layers' own default inits below consume the global RNG
        # on a real device but not on the meta device, and the seed must not depend on that.
        self.init_seed = int(torch.randint(0, 2**62, (), device="cpu"))
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
        if self.embed_tokens.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, write=None) -> None:
        """Initialise every parameter (and rebuild the rotary tables) from `init_seed`.

        `write(param, value)` stores a parameter's initial value into it, where `value(rows)`
        gives rows [rows.start, rows.stop) of it (None: all): the default copies the whole value;
        sharded training passes one that draws only this rank's rows, so that a model
        materialised from the meta device, sharded, equals one process's without any rank ever
        holding a whole parameter.
        """
        self.rotary.reset_parameters()
        for name, param in self.named_parameters():
            # Wrappers (activation checkpointing, compile) applied before a meta-device init add
            # these to the names: the streams must not depend on them.
            name = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
            value = partial(self.initial_value, name, tuple(param.shape))
            if write is None:
                param.copy_(value())
            else:
                write(param, value)

    def initial_value(self, name: str, shape: tuple[int, ...], rows: slice | None = None) -> torch.Tensor:
        """Rows `rows` (default all) of a parameter's initial value, on the CPU.

        Random matrices are drawn in blocks of INIT_BLOCK_ROWS rows, each from its own generator
        seeded by the model's seed, the parameter's name (not its position: wrappers and sharding
        keep the order of neither) and the block's index: any slice of rows comes out the same
        whether drawn alone or as part of the whole.
        """
        start, stop, _ = (rows or slice(None)).indices(shape[0])
        part = (max(stop - start, 0), *shape[1:])
        if len(shape) == 1:  # norm weights
            return torch.ones(part, device="cpu")
        if name.endswith(("o_proj.weight", "down_proj.weight")):  # writes into the residual stream
            return torch.zeros(part, device="cpu")
        first, last = start // INIT_BLOCK_ROWS, -(-stop // INIT_BLOCK_ROWS)
        blocks = []
        for block in range(first, last):
            generator = torch.Generator(device="cpu").manual_seed(
                self.init_seed ^ zlib.crc32(f"{name}#{block}".encode())
            )
            height = min(INIT_BLOCK_ROWS, shape[0] - block * INIT_BLOCK_ROWS)
            blocks.append(
                torch.empty((height, *shape[1:]), device="cpu").normal_(
                    0.0, self.config.init_std, generator=generator
                )
            )
        whole = torch.cat(blocks) if len(blocks) > 1 else blocks[0] if blocks else torch.empty(part)
        offset = start - first * INIT_BLOCK_ROWS
        return whole[offset : offset + part[0]]

    def reset_parameters(self) -> None:
        self.init_weights()

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype=None) -> KVCache:
        weight = self.embed_tokens.weight
        return KVCache(
            self.config, batch_size, max_len or self.config.max_seq_len, weight.device, dtype or weight.dtype
        )

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The final normalised hidden states, (batch, seq, hidden): everything but the LM head."""
        start = cache.length if cache is not None else 0
        cos, sin = self.rotary(start, input_ids.shape[1])
        # The residual stream in the compute dtype (bf16 under bf16-mixed), as FSDP2's bf16
        # parameters give: every strategy computes alike (README, "Residual stream dtype").
        x = self.embed_tokens(input_ids)
        x = x.to(compute_dtype(x))
        with attention_kernels(x):  # cuDNN attention first on Hopper, also when blocks are traced
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
