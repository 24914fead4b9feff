"""LightningCLI wiring: `llm-lightning fit | validate | test | predict`.

The data's vocabulary and sequence length are linked into the model; checkpoints go to
`--checkpoint.dirpath` every `--checkpoint.every_n_train_steps` optimizer steps as
`checkpoint_step_N.ckpt`, plus `last.ckpt` (also at every ending) and the best by val/loss
(`best.ckpt`). The seed's global `--data.batch_size` and `--data.micro_batch_size` decide the
trainer's gradient accumulation, and `--eval_interval` counts optimizer steps (`StepPlan`).

`--ckpt_path last|best|FILE`: the file is checked (one clear line if it is missing, truncated
or another project's), the model's shape comes from it (a size flag that contradicts it is an
error), and everything else (learning rate, schedule, intervals) from this command, so a
resume applies what the command says.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter, LearningRateMonitor, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from llm_lightning.data.datamodule import TextDataModule, accumulation_steps
from llm_lightning.errors import UserError
from llm_lightning.evaluation.callback import TaskEval
from llm_lightning.io.atomic import recover_folder
from llm_lightning.io.checkpoint import BEST, LAST, consolidate, is_sharded, model_config, read_header
from llm_lightning.model import PRESETS
from llm_lightning.training.callbacks import (
    AtomicCheckpointIO,
    BestCheckpoint,
    ModelLine,
    NonFiniteGuard,
    RunLog,
    SlurmRequeue,
    StepCheckpoint,
    StepPlan,
    StepProgressBar,
    StopOnSignal,
)
from llm_lightning.training.module import MODEL_FLAGS, LanguageModel
from llm_lightning.training.parallel import ShardedStrategy
from llm_lightning.training.parallel.parallelize import check_tensor_parallel_size
from llm_lightning.training.throughput import cpu_has_fast_bf16


def default_precision() -> str:
    """bf16-mixed where the hardware runs it fast and safely, full precision elsewhere."""
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if cpu_has_fast_bf16() else "32-true"


class PredictionWriter(BasePredictionWriter):
    """`predict` writes one JSON line per validation window: its loss and greedy accuracy."""

    def __init__(self, output: str = "predictions.jsonl") -> None:
        super().__init__(write_interval="batch")
        self.output = Path(output)
        self._windows = 0

    def on_predict_start(self, trainer, pl_module) -> None:
        if trainer.world_size > 1:
            raise UserError("predict runs on one device; pass --trainer.devices 1")
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.output.write_text("")
        self._windows = 0

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ):
        with self.output.open("a") as stream:
            for loss, accuracy, scored in zip(*(prediction[k].tolist() for k in ("loss", "accuracy", "scored_tokens")), strict=True):  # fmt: skip
                record = {
                    "window": self._windows,
                    "loss": loss,
                    "accuracy": accuracy,
                    "scored_tokens": scored,
                }
                stream.write(json.dumps(record) + "\n")
                self._windows += 1

    def on_predict_end(self, trainer, pl_module) -> None:
        rank_zero_info(f"wrote {self._windows} windows' loss and greedy accuracy to {self.output}")


def _is_sharded_strategy(strategy) -> bool:
    class_path = strategy.get("class_path", "") if hasattr(strategy, "get") else str(strategy)
    return class_path.endswith(("ShardedStrategy", "ModelParallelStrategy"))


def consolidated_copy(folder: Path) -> Path:
    """A sharded checkpoint as one temporary file, for strategies that read files (one device, DDP)."""
    target = Path(tempfile.mkdtemp(prefix="llm-lightning-")) / f"{folder.name}"
    atexit.register(shutil.rmtree, target.parent, True)
    torch.save(consolidate(folder), target)
    rank_zero_info(f"--ckpt_path {folder}: a sharded checkpoint, consolidated for this strategy")
    return target


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
                "checkpoint.save_last": "link",  # last.ckpt links to this step's checkpoint: one write
                "checkpoint.enable_version_counter": False,
            }
        )
        parser.add_lightning_class_args(NonFiniteGuard, "nonfinite")
        # In-loop task accuracy: --eval.tasks FILE.jsonl ... --eval.every_n_steps N --eval.limit N
        parser.add_lightning_class_args(TaskEval, "eval")
        parser.add_argument(
            "--eval_interval",
            type=int,
            default=500,
            help="Validate every this many optimizer steps (the seed's --eval_interval).",
        )
        parser.add_argument(
            "--predict_output",
            default="predictions.jsonl",
            help="predict: the JSON-lines file of per-window losses and greedy accuracies.",
        )
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.max_length", "model.max_length", apply_on="instantiate")

    # ----------------------------------------------------------------- --ckpt_path
    def _parse_ckpt_path(self) -> None:
        """Resolve last/best, check the file, and build the model the checkpoint describes."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        section = self.config[subcommand]
        ckpt_path = section.get("ckpt_path")
        if not ckpt_path:
            return
        path = self._resolve_ckpt_path(subcommand, ckpt_path, Path(section["checkpoint"]["dirpath"]))
        section["ckpt_path"] = str(path) if path else None
        if path is None:
            return
        if section["model"].get("init_from"):
            raise UserError("--model.init_from and --ckpt_path both give the starting weights; pass one")
        header = read_header(path)  # not the weights: every rank does this
        saved = model_config(header).architecture()
        self._check_shape_flags(section["model"], saved, path)
        if subcommand == "fit":
            self._check_optimizer(section["model"], header["hyper_parameters"], path)
        if is_sharded(path) and not _is_sharded_strategy(section["trainer"].get("strategy")):
            section["ckpt_path"] = str(consolidated_copy(path))
        values = {name: saved[name] for name in MODEL_FLAGS if name in saved}
        self.config = self.parser.parse_object(
            {subcommand: {"model": {"preset": None, **values}}}, self.config
        )

    @staticmethod
    def _resolve_ckpt_path(subcommand: str, ckpt_path: str, dirpath: Path) -> Path | None:
        named = {"last": LAST, "best": BEST}
        if ckpt_path in ("hpc", "registry"):
            raise UserError(f"--ckpt_path {ckpt_path}: not supported here; give last, best or a .ckpt file")
        if ckpt_path not in named:
            path = Path(ckpt_path)
            if not path.exists():
                raise UserError(f"--ckpt_path {ckpt_path}: no such file; give a .ckpt file, last or best")
            return path
        path = dirpath / named[ckpt_path]
        recover_folder(dirpath)  # a save killed between its two renames, a dead run's work folders
        if path.exists():
            return path
        if subcommand == "fit" and ckpt_path == "last":  # a first run under a requeueing scheduler
            rank_zero_info(f"--ckpt_path last: no {LAST} in {dirpath} yet, so training starts from scratch")
            return None
        why = (
            "the fit has not validated yet?"
            if ckpt_path == "best"
            else "has a fit run with this --checkpoint.dirpath?"
        )
        raise UserError(f"--ckpt_path {ckpt_path}: no {named[ckpt_path]} in {dirpath} ({why})")

    @staticmethod
    def _check_shape_flags(model: dict, saved: dict, path: Path) -> None:
        """A size flag or preset that contradicts the checkpoint's model is an error, not a new model."""
        asked = dict(PRESETS.get(model.get("preset"), {}))
        asked.update({name: model[name] for name in MODEL_FLAGS if model.get(name) is not None})
        for name, value in asked.items():
            if name in saved and saved[name] != value:
                source = f"--model.{name} {value}"
                if model.get(name) is None:
                    source = f"--model.preset {model['preset']} ({name}={value})"
                raise UserError(
                    f"{source} contradicts {path}, whose model has {name}={saved[name]}: the model's shape "
                    "comes from the checkpoint; drop the flag (or start a new run without --ckpt_path)"
                )

    @staticmethod
    def _check_optimizer(model: dict, hparams, path: Path) -> None:
        """Refused, not re-initialised: a resume continues the run, and its optimizer state is half of it."""
        asked, then = model.get("optimizer") or "adamw", hparams.get("optimizer") or "adamw"
        if asked != then:
            raise UserError(
                f"--model.optimizer {asked}: {path} was trained with {then}, whose state cannot carry over; "
                f"resume with --model.optimizer {then}, or start a new run from its weights (export, then "
                "--model.init_from)"
            )

    def before_fit(self) -> None:
        """A new run never writes over another run's checkpoints: resume it, or choose another folder.

        The batch split is checked here, before any callback writes into the folder."""
        self._check_batch_split()
        if self.config.fit.get("ckpt_path"):
            return
        dirpath = Path(self.config.fit.checkpoint.dirpath)
        found = sorted(p.name for p in dirpath.glob("*.ckpt")) if dirpath.is_dir() else []
        if found:
            raise UserError(
                f"--checkpoint.dirpath {dirpath} already holds a run's checkpoints ({', '.join(found[:3])}"
                f"{' ...' if len(found) > 3 else ''}); resume it with --ckpt_path last, or choose another folder"
            )

    def _check_batch_split(self) -> None:
        data, trainer = self.datamodule, self.trainer
        strategy = trainer.strategy
        tp = (
            strategy.tensor_parallel_size(trainer.num_devices) if isinstance(strategy, ShardedStrategy) else 1
        )
        accumulation_steps(
            data.batch_size, data.micro_batch_size, max(trainer.num_devices * trainer.num_nodes // tp, 1)
        )

    # ----------------------------------------------------------------- trainer
    def instantiate_trainer(self, **kwargs):
        config = self._get(self.config_init, "checkpoint")
        trainer_config = self._get(self.config_init, "trainer", default={})
        # Passing `callbacks` replaces the config's list: keep --trainer.callbacks in it.
        callbacks = [
            *(trainer_config.get("callbacks") or []),
            *kwargs.get("callbacks", []),
            BestCheckpoint(str(config.dirpath)),
            StepPlan(self._get(self.config, "eval_interval")),
            StopOnSignal(),
        ]
        if self.subcommand == "predict":
            callbacks.append(PredictionWriter(self._get(self.config, "predict_output")))
        if trainer_config.get("enable_model_summary") is not False:
            callbacks.append(ModelLine())
        wants_bar = trainer_config.get("enable_progress_bar") is not False
        if wants_bar and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(StepProgressBar())
        kwargs["callbacks"] = callbacks
        trainer = super().instantiate_trainer(**kwargs)
        if isinstance(trainer.strategy, ShardedStrategy):  # before other processes start: one clear line
            check_tensor_parallel_size(
                self.model.config, trainer.strategy.tensor_parallel_size(trainer.num_devices)
            )
        # Set here rather than as a `plugins` default: a plugin instance cannot be saved in config.yaml.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


class _DropNoise(logging.Filter):
    """Lines Lightning prints on every fit that say nothing to act on here."""

    NOISE = (
        "Tip: For seamless cloud logging",  # an advertisement for its cloud logger
        "Skipping setting a default `ModelSummary`",  # we replaced the summary on purpose (ModelLine)
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(fragment in record.getMessage() for fragment in self.NOISE)


def quiet_lightning() -> None:
    """Keep a fit's output to what a user acts on (each item named, nothing silenced wholesale)."""
    for handler in logging.getLogger("lightning.pytorch").handlers:
        handler.addFilter(_DropNoise())
    # 2D meshes: the gradient norm's partial sums are reduced over both mesh dimensions, which
    # torch calls "suboptimal" on every step; once per step it is not worth a flattened mesh.
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    # Lightning 2.6 still builds a torch pytree LeafSpec; torch 2.13 deprecates that. Not ours to fix.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
    # A fresh fit refuses a folder that holds checkpoints (before_fit): this is a resume's folder.
    warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")


def run_lightning_cli(argv: list[str] | None = None) -> LLMCLI:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers fork after the tokenizer loads
    quiet_lightning()
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
            "use_distributed_sampler": False,  # TextDataModule deals windows to data-parallel ranks itself
            "callbacks": [LearningRateMonitor(logging_interval="step"), RunLog(), SlurmRequeue()],
        },
    )
