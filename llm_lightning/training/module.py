"""LanguageModel: the research code around the Transformer (loss, steps, optimizer, schedule).

Devices, precision, strategy, checkpoints and logging destinations are the Trainer's
business and come from the CLI config; parallelism and compilation are applied from outside
the model in `configure_model`.

The model's shape has one source of truth, `ModelConfig`: `__init__` takes one keyword per
config field (`--model.hidden_size`, ...; None keeps the preset's value), derived from the
dataclass by `model_config_flags`, and checkpoints store the resolved config.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import fields
from functools import partial

import docstring_parser
import lightning as L
import torch
from lightning.pytorch.utilities.parsing import save_hyperparameters

from llm_lightning.errors import UserError
from llm_lightning.io.checkpoint import (
    CONFIG_KEY,
    FORMAT,
    FORMAT_KEY,
    MODEL_PREFIX,
    config_from_hparams,
    model_config,
    upgrade_weights,
)
from llm_lightning.model import ModelConfig, Transformer, flops_per_token
from llm_lightning.model.config import DATA_FIELDS
from llm_lightning.model.hf import load_hf_weights
from llm_lightning.training.optim import build_optimizer, warmup_cosine

# The model config fields that are flags of LanguageModel (the data decides the others).
MODEL_FLAGS = tuple(f.name for f in fields(ModelConfig) if f.name not in DATA_FIELDS)


def model_config_flags(cls):
    """Add ModelConfig's fields to `cls.__init__`'s signature and docstring, as optional keywords.

    The arguments arrive in `**model_settings`; LightningCLI (through jsonargparse) reads the
    signature, so `--model.hidden_size` and friends exist without a second list of them.
    """
    init = cls.__init__
    signature = inspect.signature(init)
    own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    types = {f.name: f.type for f in fields(ModelConfig)}
    extra = [
        inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=_optional(types[name])
        )
        for name in MODEL_FLAGS
    ]
    init.__signature__ = signature.replace(parameters=own + extra)
    docs = {p.arg_name: p.description for p in docstring_parser.parse(ModelConfig.__doc__).params}
    lines = "".join(f"\n            {name}: {' '.join(docs[name].split())}" for name in MODEL_FLAGS)
    init.__doc__ = init.__doc__.rstrip() + lines + "\n        "
    return cls


def _optional(annotation: str):
    base = {"int": int, "float": float, "bool": bool}[annotation.split("|")[0].strip()]
    return base | None


@model_config_flags
class LanguageModel(L.LightningModule):
    def __init__(
        self,
        vocab_size: int = 32000,
        max_length: int = 2048,
        preset: str | None = None,
        learning_rate: float = 3e-4,
        warmup_steps: int = 2000,
        max_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        compile: bool = False,
        init_from: str | None = None,
        **model_settings,
    ) -> None:
        """
        Args:
            vocab_size: vocabulary size; linked from the prepared data by the CLI.
            max_length: training sequence length; linked from the prepared data by the CLI.
            preset: tiny, small, medium, large or xl (the seed's table); the size flags below
                override it. Without a preset the seed's defaults apply (768 x 12 layers, 12 heads).
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
        arguments = {name: value for name, value in locals().items() if name not in ("self", "model_settings", "__class__")}
        super().__init__()
        unknown = set(model_settings) - set(MODEL_FLAGS)
        if unknown:
            raise TypeError(f"LanguageModel got unexpected arguments {sorted(unknown)}")
        # Given whole: LightningModule.save_hyperparameters() would look the signature's model
        # settings up as local variables, and they are inside **model_settings.
        self._log_hyperparams = True
        hparams = {**arguments, **{name: model_settings.get(name) for name in MODEL_FLAGS}}
        save_hyperparameters(self, given_hparams=hparams, frame=inspect.currentframe())
        self.config = config_from_hparams(self.hparams)
        self.model = Transformer(self.config)
        if init_from:
            load_hf_weights(self.model, init_from)
        self.flops_per_batch: int | None = None  # set in setup() once the micro-batch is known
        self._val_sums = torch.zeros(2, dtype=torch.float64)  # (sum of token losses, scored tokens)

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

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CONFIG_KEY] = self.config.to_dict()
        checkpoint[FORMAT_KEY] = FORMAT

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = model_config(checkpoint)
        for key, flag in (("vocab_size", "vocab_size"), ("max_seq_len", "max_length")):
            if getattr(saved, key) != getattr(self.config, key):
                raise UserError(
                    f"checkpoint was trained with {flag}={getattr(saved, key)} but the data has {flag}="
                    f"{getattr(self.config, key)}; use the data folder the checkpoint was trained on"
                )
        version = checkpoint.get(FORMAT_KEY, 1)
        if version < FORMAT:
            if self.trainer.state.fn == "fit":
                raise UserError(
                    f"the checkpoint was written by an older llm-lightning (format {version}): validate, generate "
                    "and export read it, but to train on, export it and start a run with --model.init_from"
                )
            state = checkpoint["state_dict"]
            weights = {
                k.removeprefix(MODEL_PREFIX): v for k, v in state.items() if k.startswith(MODEL_PREFIX)
            }
            for name, tensor in upgrade_weights(weights, saved, version).items():
                state[MODEL_PREFIX + name] = tensor

    def on_train_start(self) -> None:
        """A resumed run trains with this command's hyperparameters, not the checkpoint's."""
        for optimizer, scheduler in zip(self.trainer.optimizers, self._schedulers(), strict=False):
            apply_hyperparameters(optimizer, scheduler, self.hparams, self.trainer.global_step)

    def _schedulers(self) -> list:
        return [config.scheduler for config in self.trainer.lr_scheduler_configs]

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
        # Sums, not a mean of per-batch means: padding and uneven batches weigh nothing.
        self._val_sums = self._val_sums.to(losses.device) + torch.stack([(losses * mask).sum(), mask.sum()])

    def on_validation_epoch_end(self) -> None:
        self._log_split_loss("val")

    def _log_split_loss(self, split: str) -> None:
        # Summed over ranks here, once: every rank then logs the same exact per-token loss.
        total = self.trainer.strategy.reduce(self._val_sums.to(self.device), reduce_op="sum")
        self._val_sums = torch.zeros_like(self._val_sums)
        # A float: the same number on every rank, so no further reduction (nor advice to add one).
        loss = float(total[0] / total[1].clamp(min=1))
        self.log(f"{split}/loss", loss, prog_bar=split == "val")
        self.log(f"{split}/ppl", math.exp(min(loss, 50.0)))

    def test_step(self, batch, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._log_split_loss("test")

    def predict_step(self, batch, batch_idx: int) -> dict:
        """Per validation window: the mean loss and greedy accuracy over its scored tokens."""
        inputs, targets, scored = batch
        hidden = self.model.hidden_states(inputs)
        losses = self.model(inputs, targets=targets, reduction="none").view_as(targets)
        greedy = self.model.lm_head(hidden).argmax(dim=-1)
        counts = scored.sum(dim=1).clamp(min=1)
        return {
            "loss": (losses * scored).sum(dim=1) / counts,
            "accuracy": ((greedy == targets) & scored).sum(dim=1) / counts,
            "scored_tokens": scored.sum(dim=1),
        }

    def configure_optimizers(self):
        h = self.hparams
        scaling = str(self.trainer.precision) == "16-mixed"  # a GradScaler unscales before clipping
        optimizer = build_optimizer(
            self.model, h.learning_rate, h.weight_decay, h.betas, self.device, scaling
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_schedule())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_schedule(self):
        """The multiplier of the peak learning rate at each optimizer step."""
        h = self.hparams
        # Sized from max_steps, never from estimated_stepping_batches (breaks resume, Lightning #20550).
        max_steps = h.max_steps or (self.trainer.max_steps if self.trainer.max_steps > 0 else 100_000)
        return partial(
            warmup_cosine, warmup_steps=h.warmup_steps, max_steps=max_steps, min_ratio=h.min_lr_ratio
        )

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clip by global norm and log that norm (gradients are already unscaled here)."""
        max_norm = float(gradient_clip_val) if gradient_clip_val else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm, foreach=True)
        self.log("train/grad_norm", norm)


def apply_hyperparameters(optimizer, scheduler, hparams, step: int) -> None:
    """Set the optimizer's and schedule's values from `hparams` (a restore brings the old ones)."""
    for group in optimizer.param_groups:
        group["initial_lr"] = hparams.learning_rate
        group["betas"] = tuple(hparams.betas)
        group["weight_decay"] = hparams.weight_decay if group.get("decay", True) else 0.0
    if scheduler is not None:
        scheduler.base_lrs = [hparams.learning_rate for _ in optimizer.param_groups]
        for group, lr_lambda in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
            group["lr"] = hparams.learning_rate * lr_lambda(step)
