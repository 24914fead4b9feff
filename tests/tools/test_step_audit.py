"""A training step reads nothing back from the device and sends only the collectives it needs.

The step audit (`llm-lightning bench --mode step-audit`) runs real optimizer steps through fit's
code path (the recipe: Muon, QK-norm, z-loss, accumulation 2) and counts what each rank dispatches;
the tests assert its figures. The non-finite guard decides on the device and is checked here
through a real fit: a NaN step leaves the state untouched and the stop comes at the next
logging interval.
"""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch

from llm_lightning.data.datamodule import TextDataModule
from llm_lightning.tools.bench import main as bench
from llm_lightning.tools.step_audit import OpCounter
from llm_lightning.training.callbacks import NonFiniteGuard, NonFiniteStop
from llm_lightning.training.module import LanguageModel
from tests.conftest import run_cli

LAYERS = 2
AUDIT = ("bench", "--mode", "step-audit", "--preset", "tiny", "--hidden_size", "32", "--num_layers", LAYERS,
         "--num_heads", "2", "--vocab_size", "256", "--seq_len", "16", "--micro_batch_size", "2",
         "--steps", "1", "--device", "cpu")  # fmt: skip
MATRICES = 7 * LAYERS  # q, k, v, o, gate, up, down of each block, a fused matrix's parts one each


def audit(strategy: str, devices: int, capsys) -> dict:
    if devices == 1:  # in this process: no second start of torch and Lightning
        assert bench([*map(str, AUDIT[1:]), "--strategy", strategy]) == 0
        stdout = capsys.readouterr().out
    else:  # Lightning starts the other rank by running the same command again
        result = run_cli(*AUDIT, "--strategy", strategy, "--devices", devices, env={"OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        stdout = result.stdout
    lines = stdout.strip().splitlines()
    assert len(lines) == 1, stdout[-2000:]  # one JSON line, from rank 0 only
    return json.loads(lines[0])


def test_the_counter_sees_every_kind_of_host_read():
    """What the zero below would miss if the counter were blind: each read counts, and says where."""
    values = torch.tensor([1.0, float("nan")])
    with OpCounter() as counter:
        values.sum().item()
        bool(torch.isfinite(values).all())
        float(values.max())
        values.nonzero()
        values.mul(2)
    assert sum(counter.syncs.values()) == 4
    assert all("test_step_audit.py" in where for where in counter.where)
    assert counter.ops >= 5 and counter.collectives == {}


@pytest.mark.parametrize(("strategy", "devices"), [("single", 1), ("ddp", 2), ("fsdp", 2)])
def test_a_step_reads_nothing_back_from_the_device(strategy, devices, capsys):
    report = audit(strategy, devices, capsys)
    ranks = report["ranks"]
    assert len(ranks) == devices and sorted(r["rank"] for r in ranks) == list(range(devices))
    for rank in ranks:
        assert rank["host_syncs_per_step"] == 0, rank["where_per_step"]
        assert rank["aten_ops_per_step"] > 100  # the counter did see the step
        assert rank["peak_rss_mib"] > 0
    assert report["host_syncs_per_step"] == 0
    muon = report["muon_matrices_per_rank"]
    assert sum(muon) == MATRICES  # every matrix orthogonalised once, by one rank
    if devices == 1:
        assert ranks[0]["collectives_per_step"] == {}
        return
    # Dealt out: each rank orthogonalises about its share (a stack of odd length rounds up).
    assert max(muon) <= math.ceil(MATRICES / devices) + 2
    for rank in ranks:
        collectives = rank["collectives_per_step"]
        # The signal flags: one asynchronous all-reduce per optimizer step, waited a step later.
        assert collectives.get("allreduce", 0) >= 1, rank["where_per_step"]
        assert "barrier" not in collectives, rank["where_per_step"]
        if strategy == "fsdp":
            # Gradient accumulation 2: each FSDP unit reduce-scatters once per optimizer step.
            assert rank["fsdp_units"] == LAYERS + 2  # embedding, each block, norm + head
            assert collectives["_reduce_scatter_base"] == rank["fsdp_units"], rank["where_per_step"]


class PoisonStep(L.Callback):
    """Makes the gradients of optimizer step `step` NaN, and records the state around that step."""

    def __init__(self, step: int) -> None:
        self.step, self.before, self.after = step, None, None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step + 1 == self.step:
            next(pl_module.parameters()).grad.fill_(float("nan"))
            self.before = state(pl_module, optimizer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.after is None:
            self.after = state(pl_module, trainer.optimizers[0])


def state(pl_module, optimizer) -> dict[str, torch.Tensor]:
    """Every weight and every optimizer state tensor (moments, momentum, step counts), copied."""
    values = {f"param/{name}": p.detach().clone() for name, p in pl_module.named_parameters()}
    for index, (param, slots) in enumerate(optimizer.state.items()):
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                values[f"state/{index}/{key}/{tuple(param.shape)}"] = value.detach().clone()
    return values


@pytest.mark.parametrize(
    "optimizer",
    [
        "muon",
        pytest.param("adamw", marks=pytest.mark.slow),
    ],  # the recipe's by default; torch's fused AdamW extra
)
def test_a_nonfinite_step_changes_nothing_and_stops_at_the_logging_interval(
    optimizer, prepared_dir, tmp_path
):
    torch.manual_seed(0)
    model = LanguageModel(
        vocab_size=400, max_length=32, preset="tiny", hidden_size=32, num_layers=1, num_heads=2,
        optimizer=optimizer, qk_norm=True, z_loss=1e-4, warmup_steps=1, max_steps=8,
    )  # fmt: skip
    data = TextDataModule(str(prepared_dir), batch_size=4, micro_batch_size=4, num_workers=0)
    poison = PoisonStep(step=2)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=8, log_every_n_steps=4, gradient_clip_val=1.0,
        callbacks=[poison, NonFiniteGuard("stop")], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, use_distributed_sampler=False, default_root_dir=tmp_path,
    )  # fmt: skip
    with pytest.raises(NonFiniteStop, match="NaN/inf at step 2; training stopped at step 4"):
        trainer.fit(model, datamodule=data)
    assert trainer.global_step == 4  # trained on to the interval (steps 3, 4 normal), not further
    assert poison.before.keys() == poison.after.keys() and len(poison.before) > 10
    for name, value in poison.before.items():
        assert torch.equal(value, poison.after[name]), f"{name} changed in the skipped step"
