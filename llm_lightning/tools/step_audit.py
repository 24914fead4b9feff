"""`llm-lightning bench --mode step-audit`: what one optimizer step of `fit` does, op by op.

A few real optimizer steps run through fit's code path (LanguageModel, TextDataModule over a
temporary prepared folder, the Trainer with the CLI's callbacks: step plan, run log, non-finite
guard, signal handling, the terminal progress bar) with the recipe the issue names: Muon,
QK-norm, z-loss, accumulation 2. A TorchDispatchMode (`OpCounter`) counts, from the start of the
first measured step to the end of the last (warmup steps and logging-interval steps excluded):
- host syncs: device-to-host reads (`aten._local_scalar_dense`, which `.item()`, `bool()`,
  `float()` and `is_nonzero` end in, data-dependent shapes such as `nonzero`, and copies of a
  device tensor to the CPU). On a CPU-only run these cost nothing, but they are the same calls
  that stall a GPU's queue, so counting them on CPU finds them before a GPU run;
- aten ops (what each rank launches), and collectives by kind (c10d and functional ops).
Each rank's figures are gathered to rank 0, which prints one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import tempfile
from collections import Counter
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

WARMUP_STEPS = 2  # the first steps allocate optimizer state and warm caches: not a steady step
ACCUMULATION = 2
NEVER = 10**6  # a logging / checkpoint interval no audited step reaches

_aten = torch.ops.aten
# Ops that read a device value on the host (the host waits for the device queue to drain).
SYNC_OPS = {
    _aten._local_scalar_dense,
    _aten.item,
    _aten.is_nonzero,
    _aten.equal,
    _aten.nonzero,
    _aten.masked_select,
    _aten._unique2,
    _aten.unique_consecutive,
    _aten.allclose,
}
COPY_OPS = {_aten._to_copy, _aten.copy_}
COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional")
NOT_COLLECTIVES = {"wait_tensor", "_wrap_tensor_autograd"}  # functional collectives' bookkeeping


def _is_device_to_host(func, args, kwargs) -> bool:
    """A copy from an accelerator tensor into host memory (`.cpu()`, `.to("cpu")`, `copy_`)."""
    if func._overloadpacket not in COPY_OPS or not args or not isinstance(args[0], torch.Tensor):
        return False
    if func._overloadpacket is _aten.copy_:
        source, target = args[1], args[0]
        return (
            isinstance(source, torch.Tensor) and source.device.type != "cpu" and target.device.type == "cpu"
        )
    target = kwargs.get("device")
    return args[0].device.type != "cpu" and target is not None and torch.device(target).type == "cpu"


def caller(depth: int = 4) -> str:
    """The innermost frames outside torch (and this file): the lines that asked for the op."""
    frame, lines = sys._getframe(1), []
    while frame is not None and len(lines) < depth:
        name = frame.f_code.co_filename
        if f"{os.sep}torch{os.sep}" not in name and name != __file__:
            path = name.split(f"site-packages{os.sep}")[-1].removeprefix(f"{Path.cwd()}{os.sep}")
            lines.append(f"{path}:{frame.f_lineno} ({frame.f_code.co_name})")
        frame = frame.f_back
    return " <- ".join(lines) or "?"


class OpCounter(TorchDispatchMode):
    """Counts aten ops, host syncs (by op) and collectives (by kind) on this thread's dispatches."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.syncs: Counter = Counter()
        self.collectives: Counter = Counter()
        self.where: Counter = Counter()  # "op at file:line" for each sync and collective: what to fix

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **kwargs)
        # A tensor subclass (DTensor, FSDP2's parameters): let it run and desugar into the plain
        # ops and collectives it issues, and count those (as CommDebugMode does).
        if any(t is not torch.Tensor and issubclass(t, torch.Tensor) for t in types):
            return NotImplemented
        packet = func._overloadpacket
        namespace = func.namespace
        name = packet.__name__
        if namespace in COLLECTIVE_NAMESPACES:
            if name not in NOT_COLLECTIVES:
                self.collectives[name.rstrip("_")] += 1
                self.where[f"{name} at {caller()}"] += 1
        else:
            self.ops += 1
        if packet in SYNC_OPS or _is_device_to_host(func, args, kwargs):
            self.syncs[f"{namespace}.{name}"] += 1
            self.where[f"{name} at {caller()}"] += 1
        return func(*args, **kwargs)


class StepAudit(L.Callback):
    """Counts ops over `steps` optimizer steps after `warmup` ones; gathers every rank's figures."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.counter: OpCounter | None = None
        self.measured = 0
        self.figures: dict | None = None  # this rank's, once the audited steps are done
        self.ranks: list[dict] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        if self.counter is None and self.measured == 0 and trainer.global_step == self.warmup:
            self.counter = OpCounter()
            self.counter.__enter__()  # left on across batches and hooks until the last step ends

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.counter is not None and trainer.global_step >= self.warmup + self.steps:
            self.counter.__exit__(None, None, None)
            self.measured = trainer.global_step - self.warmup
            self.figures = self._figures(trainer, pl_module)
            self.counter = None

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        if self.counter is not None:  # leave no dispatch mode behind on a failed run
            self.counter.__exit__(None, None, None)
            self.counter = None

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        figures = self.figures or {"error": "the audited steps did not run"}
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, figures)
            self.ranks = gathered
        else:
            self.ranks = [figures]

    def _figures(self, trainer: L.Trainer, pl_module) -> dict:
        counter, steps = self.counter, max(self.measured, 1)
        optimizer = trainer.optimizers[0]
        device = trainer.strategy.root_device
        peak_device = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        return {
            "rank": trainer.global_rank,
            "host_syncs_per_step": sum(counter.syncs.values()) / steps,
            "host_syncs_by_op": {name: n / steps for name, n in sorted(counter.syncs.items())},
            "aten_ops_per_step": counter.ops / steps,
            "collectives_per_step": {name: n / steps for name, n in sorted(counter.collectives.items())},
            "muon_matrices_per_rank": getattr(optimizer, "matrices_orthogonalised", None),
            "fsdp_units": _fsdp_units(pl_module.model),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_device_mib": peak_device,
            "where_per_step": {name: n / steps for name, n in counter.where.most_common()},
        }


def _fsdp_units(model: torch.nn.Module) -> int:
    """FSDP2 units holding parameters (0 unsharded): each should reduce-scatter once per step."""
    from llm_lightning.training.parallel.parallelize import fsdp_units

    return fsdp_units(model)


def run_step_audit(args: argparse.Namespace, config, device: torch.device) -> dict | None:
    """Runs the audit; rank 0 (or the only process) returns the report, other ranks None."""
    from llm_lightning.data.datamodule import TextDataModule
    from llm_lightning.tools.bench import quiet_lightning, strategy, write_prepared_folder
    from llm_lightning.training.callbacks import (
        NonFiniteGuard,
        RunLog,
        StepPlan,
        StepProgressBar,
        StopOnSignal,
    )
    from llm_lightning.training.module import LanguageModel

    quiet_lightning()
    steps = WARMUP_STEPS + args.steps + 1  # one more: the last audited step's hooks end in full
    micro_batches = steps * ACCUMULATION * args.devices
    audit = StepAudit(WARMUP_STEPS, args.steps)
    with tempfile.TemporaryDirectory(prefix="llm-step-audit-") as tmp:
        data_dir = write_prepared_folder(
            Path(tmp) / "data",
            config.vocab_size,
            args.seq_len,
            micro_batches * args.micro_batch_size,
            args.seed,
        )
        datamodule = TextDataModule(
            str(data_dir),
            batch_size=args.micro_batch_size * ACCUMULATION * args.devices,
            micro_batch_size=args.micro_batch_size,
            num_workers=args.num_workers if args.num_workers is not None else 0,
        )
        model = LanguageModel(
            vocab_size=config.vocab_size, max_length=args.seq_len, preset=args.preset,
            hidden_size=config.hidden_size, num_layers=config.num_layers, num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads, warmup_steps=2, max_steps=steps, optimizer="muon",
            qk_norm=True, z_loss=1e-4, compile=args.compile, activation_checkpointing=args.activation_checkpointing,
        )  # fmt: skip
        checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=Path(tmp) / "checkpoints", save_last=False)
        trainer = L.Trainer(
            accelerator=device.type,
            devices=args.devices,
            strategy=strategy(args.strategy),
            precision=args.precision,
            max_steps=steps,
            gradient_clip_val=1.0,
            log_every_n_steps=NEVER,  # logging-interval steps read metrics on purpose: not audited
            callbacks=[
                StepPlan(eval_interval=NEVER),
                RunLog(),
                NonFiniteGuard(),
                StopOnSignal(),
                StepProgressBar(lines=False),  # a terminal's bar, the case that refreshes per step
                checkpoints,
                audit,  # last: the other callbacks' step hooks run inside the audited span
            ],
            default_root_dir=tmp,
            logger=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            use_distributed_sampler=False,
        )
        with contextlib.redirect_stdout(sys.stderr):  # the bar and Lightning's lines: stdout keeps the JSON
            trainer.fit(model, datamodule=datamodule)
    if not trainer.is_global_zero:
        return None
    return report(args, audit.ranks)


def report(args: argparse.Namespace, ranks: list[dict]) -> dict:
    """One object: the worst rank's headline figures, and every rank's own."""
    worst = max(rank.get("host_syncs_per_step", float("inf")) for rank in ranks)
    return {
        "mode": "step-audit",
        "preset": args.preset,
        "strategy": args.strategy,
        "devices": args.devices,
        "device": args.device,
        "precision": args.precision,
        "accumulation": ACCUMULATION,
        "audited_steps": args.steps,
        "warmup_steps": WARMUP_STEPS,
        "host_syncs_per_step": worst,
        "aten_ops_per_step": [rank.get("aten_ops_per_step") for rank in ranks],
        "collectives_per_step": [rank.get("collectives_per_step") for rank in ranks],
        "muon_matrices_per_rank": [rank.get("muon_matrices_per_rank") for rank in ranks],
        "fsdp_units": [rank.get("fsdp_units") for rank in ranks],
        "peak_rss_mib": [rank.get("peak_rss_mib") for rank in ranks],
        "peak_device_mib": [rank.get("peak_device_mib") for rank in ranks],
        "ranks": ranks,
    }


def print_report(result: dict) -> None:
    print(json.dumps(result, sort_keys=False), flush=True)
