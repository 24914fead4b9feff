"""LanguageModel: the research code around the Transformer (loss, steps, optimizer, schedule).

Devices, precision, strategy, checkpoints and logging destinations are the Trainer's
business and come from the CLI config; parallelism and compilation are applied from outside
the model in `configure_model`.
"""

from __future__ import annotations

from functools import partial

import lightning as L
import torch
from torchmetrics import SumMetric

from llm_lightning.errors import UserError
from llm_lightning.model import ModelConfig, Transformer, flops_per_token
from llm_lightning.training.optim import build_optimizer, warmup_cosine

# Keys of the model's shape that must agree between a checkpoint and the data it meets.
SHAPE_KEYS = ("vocab_size", "max_length")
# Size flags that override a preset (None: keep the preset's value).
MODEL_KEYS = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "intermediate_size",
    "rope_theta",
    "tie_embeddings",
    "dropout",
    "init_std",
)


def config_from_hparams(hparams) -> ModelConfig:
    """The ModelConfig that LanguageModel's hyperparameters describe (a preset plus overrides)."""
    overrides = dict(
        vocab_size=hparams["vocab_size"],
        max_seq_len=hparams["max_length"],
        **{key: hparams.get(key) for key in MODEL_KEYS},
    )
    if hparams.get("preset"):
        return ModelConfig.from_preset(hparams["preset"], **overrides)
    return ModelConfig(**{k: v for k, v in overrides.items() if v is not None})


class LanguageModel(L.LightningModule):
    def __init__(
        self,
        vocab_size: int = 32000,
        max_length: int = 2048,
        preset: str | None = None,
        hidden_size: int | None = None,
        num_layers: int | None = None,
        num_heads: int | None = None,
        num_kv_heads: int | None = None,
        intermediate_size: int | None = None,
        rope_theta: float | None = None,
        tie_embeddings: bool | None = None,
        dropout: float | None = None,
        init_std: float | None = None,
        learning_rate: float = 3e-4,
        warmup_steps: int = 2000,
        max_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        compile: bool = False,
        init_from: str | None = None,
    ) -> None:
        """
        Args:
            vocab_size: vocabulary size; linked from the prepared data by the CLI.
            max_length: training sequence length; linked from the prepared data by the CLI.
            preset: tiny, small, medium, large or xl (the seed's table); the size flags below
                override it. Without a preset the seed's defaults apply (768 x 12 layers, 12 heads).
            hidden_size: model width.
            num_layers: transformer blocks.
            num_heads: query heads.
            num_kv_heads: key/value heads for grouped-query attention (default: num_heads).
            intermediate_size: SwiGLU width (default: 8/3 x hidden, rounded up to 256).
            rope_theta: RoPE base.
            tie_embeddings: share the input embedding with the LM head.
            dropout: dropout on attention and residual branches (default 0).
            init_std: standard deviation of the weight init (default sqrt(2 / (5 x hidden)));
                the residual output projections start at zero.
            learning_rate: peak AdamW learning rate.
            warmup_steps: optimizer steps of linear warmup.
            max_steps: length of the cosine decay; defaults to the trainer's max_steps.
            min_lr_ratio: the cosine decays to learning_rate x this.
            weight_decay: AdamW weight decay, on weight matrices only.
            betas: AdamW betas.
            compile: torch.compile the transformer (the seed's --compile_model).
            init_from: a Hugging Face Llama folder (from `llm-lightning export`) whose weights
                start this run: continued pretraining.
        """
        super().__init__()
        self.save_hyperparameters()
        self.config = config_from_hparams(self.hparams)
        self.model = Transformer(self.config)
        if init_from:
            from llm_lightning.tools.export import load_hf_weights

            load_hf_weights(self.model, init_from)
        self.val_loss_sum = SumMetric()
        self.val_token_count = SumMetric()
        self.flops_per_batch: int | None = None  # set in setup() once the micro-batch is known

    # ----------------------------------------------------------------- engineering hooks
    def configure_model(self) -> None:
        """Applied from outside the model, in a fixed order: (parallelism is the strategy's), compile."""
        if self.hparams.compile and not getattr(self, "_compiled", False):
            # In place: state-dict keys stay free of `_orig_mod.` (Lightning #17415).
            self.model.compile()
            self._compiled = True

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            micro = getattr(datamodule, "micro_batch_size", 1)
            self.flops_per_batch = (
                flops_per_token(self.config, self.hparams.max_length) * micro * self.hparams.max_length
            )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("hyper_parameters", {})
        for key in SHAPE_KEYS:
            if key in saved and saved[key] != self.hparams[key]:
                raise UserError(
                    f"checkpoint was trained with {key}={saved[key]} but the data has {key}="
                    f"{self.hparams[key]}; use the data folder the checkpoint was trained on"
                )

    # ----------------------------------------------------------------- research code
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def _token_losses(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token losses (batch x seq,) in fp32, without the full logits in memory."""
        return self.model(inputs, targets=targets, reduction="none")

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        # The model's chunked loss: its gradients come out of the forward pass, cache-hot.
        loss = self.model(inputs, targets=targets)
        # A tensor, not loss.item(): Lightning reduces it at log time, no sync every step.
        self.log("train/loss", loss, prog_bar=True)
        self.last_loss = loss.detach()
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        inputs, targets, scored = batch
        losses = self._token_losses(inputs, targets)
        mask = scored.flatten().to(losses.dtype)
        # Sums over ranks, not a mean of per-batch means: padding and uneven batches weigh nothing.
        self.val_loss_sum.update((losses * mask).sum())
        self.val_token_count.update(mask.sum())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss_sum.compute() / self.val_token_count.compute().clamp(min=1)
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)
        self.log("val/ppl", torch.exp(loss), sync_dist=False)
        self.val_loss_sum.reset()
        self.val_token_count.reset()

    def test_step(self, batch, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.model(inputs).argmax(dim=-1)

    def configure_optimizers(self):
        h = self.hparams
        scaling = str(self.trainer.precision) == "16-mixed"  # a GradScaler unscales before clipping
        optimizer = build_optimizer(
            self.model, h.learning_rate, h.weight_decay, h.betas, self.device, scaling
        )
        # Sized from max_steps, never from estimated_stepping_batches (breaks resume, Lightning #20550).
        max_steps = h.max_steps or (self.trainer.max_steps if self.trainer.max_steps > 0 else 100_000)
        schedule = partial(
            warmup_cosine, warmup_steps=h.warmup_steps, max_steps=max_steps, min_ratio=h.min_lr_ratio
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clip by global norm and log that norm (gradients are already unscaled here)."""
        max_norm = float(gradient_clip_val) if gradient_clip_val else float("inf")
        wrapped = self.trainer.model
        if hasattr(wrapped, "clip_grad_norm_"):  # FSDP shards the gradients: ask the wrapper
            norm = wrapped.clip_grad_norm_(max_norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm, foreach=True)
        self.log("train/grad_norm", norm)
