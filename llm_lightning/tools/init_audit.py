"""`llm-lightning bench --mode init`: what each rank holds once the model is built, sharded and initialised.

`fit`'s own path up to the first step (LanguageModel, whose Transformer is built on the meta
device; the Trainer's strategy; `configure_model`: parallelize, then storage for this rank's
shards and their initial values), then no step at all (`max_steps=0`). Each rank reports its
process's peak resident set (CPU) or max allocated memory (CUDA); rank 0 prints one JSON line
with `full_fp32_mib` (the whole model's fp32 weights) beside `peak_rss_mib` per rank, so the
ratio says how much of a whole model a rank ever held.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist

from llm_lightning.model import num_parameters
from llm_lightning.tools.timing import peak_memory

MiB = 2**20


class PeakAfterInit(L.Callback):
    """Reads each rank's peak memory once the strategy has set the model up (before any step)."""

    def __init__(self) -> None:
        self.ranks: list[dict] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        device = trainer.strategy.root_device
        held = sum(_local_bytes(p) for p in pl_module.parameters())
        mine = {
            "rank": trainer.global_rank,
            "peak_mib": peak_memory(device)[0] / MiB,
            "params_mib": held / MiB,
        }
        self.ranks = [mine]
        if dist.is_available() and dist.is_initialized():
            self.ranks = [None] * dist.get_world_size()
            dist.all_gather_object(self.ranks, mine)


def _local_bytes(tensor: torch.Tensor) -> int:
    tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return tensor.numel() * tensor.element_size()


def run_init_audit(args: argparse.Namespace, config, device: torch.device) -> dict | None:
    from llm_lightning.data.datamodule import TextDataModule
    from llm_lightning.tools.bench import quiet_lightning, strategy, write_prepared_folder
    from llm_lightning.training.module import LanguageModel

    quiet_lightning()
    probe = PeakAfterInit()
    with tempfile.TemporaryDirectory(prefix="llm-bench-init-") as tmp:
        data_dir = write_prepared_folder(
            Path(tmp) / "data", config.vocab_size, args.seq_len, 4 * args.devices, args.seed
        )
        datamodule = TextDataModule(str(data_dir), batch_size=args.devices, micro_batch_size=1, num_workers=0)
        model = LanguageModel(
            vocab_size=config.vocab_size, max_length=args.seq_len, preset=args.preset, hidden_size=config.hidden_size,
            num_layers=config.num_layers, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
            compile=False, activation_checkpointing=args.activation_checkpointing,
        )  # fmt: skip
        trainer = L.Trainer(
            accelerator=device.type, devices=args.devices, strategy=strategy(args.strategy), precision=args.precision,
            max_steps=0, callbacks=[probe], default_root_dir=tmp, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
            use_distributed_sampler=False,
        )  # fmt: skip
        trainer.fit(model, datamodule=datamodule)
    if not trainer.is_global_zero:
        return None
    full = 4 * num_parameters(config) / MiB
    return {
        "mode": "init",
        "preset": args.preset,
        "strategy": args.strategy,
        "devices": args.devices,
        "device": device.type,
        "parameters": num_parameters(config),
        "full_fp32_mib": round(full, 1),
        "peak_rss_mib" if device.type == "cpu" else "peak_device_mib": [
            round(r["peak_mib"], 1) for r in probe.ranks
        ],
        "params_held_mib": [round(r["params_mib"], 1) for r in probe.ranks],
        "peak_over_full": [round(r["peak_mib"] / full, 3) for r in probe.ranks],
    }


def print_init_report(result: dict) -> None:
    print(json.dumps(result), flush=True)
