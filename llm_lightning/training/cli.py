"""LightningCLI wiring: `llm-lightning fit | validate | test | predict`.

The data's vocabulary and sequence length are linked into the model; checkpoints go to
`--checkpoint.dirpath` every `--checkpoint.every_n_train_steps` optimizer steps as
`checkpoint_step_N.ckpt`, plus `last.ckpt` and the best by val/loss (`best.ckpt`). The
seed's global `--data.batch_size` and `--data.micro_batch_size` decide the trainer's
gradient accumulation, and `--eval_interval` counts optimizer steps.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from llm_lightning.checkpoint import load_checkpoint
from llm_lightning.data.datamodule import TextDataModule, accumulation_steps
from llm_lightning.errors import UserError
from llm_lightning.training.callbacks import (
    NonFiniteGuard,
    RunLog,
    SlurmRequeue,
    StepCheckpoint,
    StepProgressBar,
)
from llm_lightning.training.checkpoint_io import AtomicCheckpointIO
from llm_lightning.training.module import SHAPE_KEYS, LanguageModel


def cpu_has_fast_bf16() -> bool:
    """avx512_bf16 or AMX: bf16 matrix products run 2-3x faster than fp32 on such CPUs."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_precision() -> str:
    """bf16-mixed where the hardware runs it fast and safely, full precision elsewhere."""
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if cpu_has_fast_bf16() else "32-true"


class BestCheckpoint(ModelCheckpoint):
    """best.ckpt: the lowest val/loss so far, kept beside the periodic checkpoints."""

    def __init__(self, dirpath: str) -> None:
        super().__init__(
            dirpath=dirpath,
            filename="best",
            monitor="val/loss",
            mode="min",
            save_top_k=1,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        )


class LLMCLI(LightningCLI):
    def init_parser(self, **kwargs) -> LightningArgumentParser:
        # Raise instead of printing the whole usage: main() turns it into one line, exit 2.
        return super().init_parser(**{"prog": "llm-lightning", **kwargs, "exit_on_error": False})

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(StepCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.dirpath": "./checkpoints",
                "checkpoint.filename": "checkpoint_step_{step}",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.every_n_train_steps": 1000,
                "checkpoint.save_top_k": -1,
                "checkpoint.save_last": True,
                "checkpoint.enable_version_counter": False,
            }
        )
        parser.add_lightning_class_args(NonFiniteGuard, "nonfinite")
        parser.add_argument(
            "--eval_interval",
            type=int,
            default=500,
            help="Validate every this many optimizer steps (the seed's --eval_interval).",
        )
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.max_length", "model.max_length", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        """Build the model a checkpoint describes (LightningCLI does that), after checking the file.

        The linked keys are left out: they come from the data, and on_load_checkpoint says
        clearly when the two disagree.
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = subcommand and self.config[subcommand].get("ckpt_path")
        if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry") or not Path(ckpt_path).exists():
            if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
                raise UserError(f"--ckpt_path {ckpt_path}: no such file; give a .ckpt file or `last`")
            return
        # mmap: every rank reads only the hyperparameters, not gigabytes of optimizer state
        hparams = dict(load_checkpoint(ckpt_path, mmap=True)["hyper_parameters"])
        for key in (*SHAPE_KEYS, "_instantiator", "_class_path", "compile", "init_from"):
            hparams.pop(key, None)
        self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def instantiate_trainer(self, **kwargs):
        config = self._get(self.config_init, "checkpoint")
        trainer_config = self._get(self.config_init, "trainer", default={})
        # Passing `callbacks` replaces the config's list: keep --trainer.callbacks in it.
        callbacks = [
            *(trainer_config.get("callbacks") or []),
            *kwargs.get("callbacks", []),
            BestCheckpoint(str(config.dirpath)),
        ]
        wants_bar = trainer_config.get("enable_progress_bar") is not False
        if wants_bar and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(StepProgressBar())
        kwargs["callbacks"] = callbacks
        trainer = super().instantiate_trainer(**kwargs)
        # Set here rather than as a `plugins` default: a plugin instance cannot be saved in config.yaml.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def before_fit(self) -> None:
        trainer, data = self.trainer, self.datamodule
        accumulation = accumulation_steps(data.batch_size, data.micro_batch_size, trainer.world_size)
        if trainer.accumulate_grad_batches not in (1, accumulation):
            raise UserError(
                "--trainer.accumulate_grad_batches is derived from --data.batch_size and "
                "--data.micro_batch_size; set those instead"
            )
        trainer.accumulate_grad_batches = accumulation
        eval_interval = self._get(self.config, "eval_interval")
        if eval_interval < 1:
            raise UserError(f"--eval_interval {eval_interval}: must be at least 1 optimizer step")
        # Lightning's val_check_interval counts micro-batches (#12205): convert from optimizer steps.
        trainer.val_check_interval = eval_interval * accumulation
        trainer.check_val_every_n_epoch = None


def run_lightning_cli(argv: list[str] | None = None) -> LLMCLI:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers fork after the tokenizer loads
    return LLMCLI(
        LanguageModel,
        TextDataModule,
        args=argv,
        seed_everything_default=1337,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "devices": 1,
            "max_steps": 100_000,
            "gradient_clip_val": 1.0,
            "log_every_n_steps": 100,
            "precision": default_precision(),
            "use_distributed_sampler": False,  # TextDataModule shards windows itself
            "callbacks": [LearningRateMonitor(logging_interval="step"), RunLog(), SlurmRequeue()],
        },
    )
