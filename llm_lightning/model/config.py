"""Model configuration: one dataclass, the seed's size presets, and the counts derived from it.

`ModelConfig` is the one list of the model's settings: the trainer's `--model.*` shape flags,
checkpoints, export and bench all read its fields (the LightningModule derives its flags from
them). Derived fields (the SwiGLU width, the init spread) are filled in `__post_init__`, so a
config is always complete and checked. Parameter and FLOP counts live here, beside the shape
they describe, so MFU and the README table use one formula.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from llm_lightning.errors import UserError

# The seed README's table. xl shares each key/value head between 4 query heads (GQA):
# with full multi-head attention 2048 x 32 would be 1.78B parameters, not the table's 1.5B.
PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=256, num_layers=6, num_heads=8),
    "small": dict(hidden_size=768, num_layers=12, num_heads=12),
    "medium": dict(hidden_size=1024, num_layers=24, num_heads=16),
    "large": dict(hidden_size=1536, num_layers=24, num_heads=16),
    "xl": dict(hidden_size=2048, num_layers=32, num_heads=32, num_kv_heads=8),
}

# Settings the training data decides (the trainer links them from the prepared folder).
DATA_FIELDS = ("vocab_size", "max_seq_len")
# Settings that shape training but not the function the weights compute (rotary tables
# extend past max_seq_len; multiple_of only rounds intermediate_size, which is compared).
_NOT_ARCHITECTURE = ("init_std", "dropout", "max_seq_len", "multiple_of")


@dataclass
class ModelConfig:
    """The decoder's shape and initialisation.

    Args:
        vocab_size: embedding rows and LM-head outputs.
        hidden_size: model width.
        num_layers: transformer blocks.
        num_heads: query heads.
        num_kv_heads: key/value heads for grouped-query attention (default: num_heads, plain
            multi-head attention).
        intermediate_size: SwiGLU width (default: 8/3 x hidden_size, rounded up to multiple_of).
        multiple_of: the SwiGLU width is rounded up to a multiple of this.
        max_seq_len: context length (rotary tables grow past it when needed).
        rope_theta: RoPE base.
        norm_eps: RMSNorm epsilon.
        tie_embeddings: share the input embedding with the LM head.
        init_std: spread of the normal weight init (default sqrt(2 / (5 x hidden_size)), the
            "small init"); the residual output projections start at zero.
        dropout: dropout on the attention and residual branches.
        qk_norm: RMSNorm on each head's queries and keys before the rotary embedding (as Qwen3):
            attention logits stay bounded, so larger learning rates stay stable.
    """

    vocab_size: int = 32000
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    multiple_of: int = 256
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float | None = None
    dropout: float = 0.0
    qk_norm: bool = False

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.intermediate_size is None:
            self.intermediate_size = _round_up(8 * self.hidden_size // 3, self.multiple_of)
        self._check_sizes()
        if self.init_std is None:
            # Nguyen & Salazar's small init (GPT-NeoX's too): the spread shrinks with the width.
            self.init_std = math.sqrt(2 / (5 * self.hidden_size))
        self._check()

    def _check_sizes(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type.startswith("int") and (not isinstance(value, int) or value < 1):
                raise UserError(f"model {f.name}={value!r}: must be a positive integer")

    def _check(self) -> None:
        for name in ("rope_theta", "norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                raise UserError(f"model {name}={getattr(self, name)!r}: must be positive")
        if self.hidden_size % self.num_heads:
            raise UserError(f"model num_heads={self.num_heads} must divide hidden_size={self.hidden_size}")
        if self.num_heads % self.num_kv_heads:
            raise UserError(f"model num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise UserError(f"model head_dim={self.head_dim} (hidden_size/num_heads) must be even for RoPE")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model dropout={self.dropout}: must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_groups(self) -> int:
        """How many query heads share one key/value head."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_preset(cls, name: str | None, **overrides) -> ModelConfig:
        """A preset from the seed's table (or the defaults for None); overrides that are not None win."""
        if name is not None and name not in PRESETS:
            raise UserError(f"unknown model preset {name!r}: choose one of {', '.join(PRESETS)}")
        values = {**PRESETS.get(name, {}), **{k: v for k, v in overrides.items() if v is not None}}
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    def architecture(self) -> dict:
        """The fields that decide what the weights compute: two configs that differ only
        elsewhere (init, dropout, context length, rounding rule) can share weights."""
        return {k: v for k, v in asdict(self).items() if k not in _NOT_ARCHITECTURE}

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def _round_up(value: int, multiple: int) -> int:
    return multiple * math.ceil(value / multiple)


def num_parameters(config: ModelConfig, include_embedding: bool = True) -> int:
    """Exact parameter count of `Transformer(config)` (the tests check it against the module)."""
    h, kv_dim = config.hidden_size, config.num_kv_heads * config.head_dim
    attention = h * h + 2 * h * kv_dim + h * h  # q, k, v, o
    mlp = 3 * h * config.intermediate_size  # gate, up, down
    block = attention + mlp + 2 * h + (2 * config.head_dim if config.qk_norm else 0)  # RMSNorm weights
    body = config.num_layers * block + h  # final norm
    embedding = config.vocab_size * h
    head = 0 if config.tie_embeddings else config.vocab_size * h
    return body + head + (embedding if include_embedding else 0)


def flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward), the PaLM / nanoGPT count.

    6 x (matmul parameters, LM head included, token embedding excluded since it is a lookup)
    plus 12 x layers x hidden x seq_len for the attention scores and their weighted sum.
    """
    h = config.hidden_size
    norms = (2 * h + (2 * config.head_dim if config.qk_norm else 0)) * config.num_layers + h
    matmul_params = num_parameters(config, include_embedding=False) - norms
    if config.tie_embeddings:  # the tied head still does its matmul
        matmul_params += config.vocab_size * h
    return 6 * matmul_params + 12 * config.num_layers * h * seq_len
