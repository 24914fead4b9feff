"""One line about the model at the start of a fit, instead of Lightning's summary table.

Lightning's table lists every submodule and a FLOPs column that reads 0 unless a sample
input is set; in a log file the model's size and shape say what matters.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities import rank_zero_info


class ModelLine(ModelSummary):
    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        config = getattr(pl_module, "config", None)
        params = sum(p.numel() for p in pl_module.parameters())
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        shape = ""
        if config is not None:
            shape = (
                f": {config.num_layers} layers x {config.hidden_size} hidden, {config.num_heads} heads "
                f"({config.num_kv_heads} key/value), vocabulary {config.vocab_size}, context {config.max_seq_len}"
            )
        rank_zero_info(f"model{shape}; {params / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable)")
