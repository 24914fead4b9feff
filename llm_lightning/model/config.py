"""Model configuration: one dataclass, the seed's size presets, and the counts derived from it.

Derived fields (head_dim, the SwiGLU width, the key/value group size) are computed in
`__post_init__`, so a config is always complete and checked. Parameter and FLOP counts
live here, beside the shape they describe, so MFU and the README table use one formula.
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


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    num_kv_heads: int | None = None  # None: one key/value head per query head (plain MHA)
    intermediate_size: int | None = None  # None: 8/3 x hidden rounded up to `multiple_of`
    multiple_of: int = 256
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float | None = None  # None: sqrt(2 / (5 x hidden_size)), the "small init"
    dropout: float = 0.0

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
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "intermediate_size",
            "multiple_of",
            "max_seq_len",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"model {name}={value!r}: must be a positive integer")

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
    def from_preset(cls, name: str, **overrides) -> ModelConfig:
        """A preset from the seed's table; explicit overrides (not None) win."""
        if name not in PRESETS:
            raise UserError(f"unknown model preset {name!r}: choose one of {', '.join(PRESETS)}")
        values = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

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
    block = attention + mlp + 2 * h  # two RMSNorm weights
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
    matmul_params = num_parameters(config, include_embedding=False) - (2 * config.num_layers + 1) * h
    if config.tie_embeddings:  # the tied head still does its matmul
        matmul_params += config.vocab_size * h
    return 6 * matmul_params + 12 * config.num_layers * h * seq_len
