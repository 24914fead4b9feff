"""Scale-out on CPU with gloo: DDP, a two-node torchrun, SLURM requeue, cluster scripts, FSDP config.

Each training run is a real `llm-lightning` process (or several). The tolerances:
- One process accumulating two micro-batches and two processes with one micro-batch each see
  the same 8 windows per optimizer step, but grouped differently (one process: windows 0-3,
  then 4-7 of the step; two ranks: 0,2,4,6 and 1,3,5,7), so every per-micro-batch sum runs in a
  different order, and the two halves are added by autograd's accumulation on one process and
  by gloo's all-reduce on two. In fp32 (`32-true`, dropout 0) each such sum differs by about
  one rounding (~1e-7 relative); over 20 AdamW steps the weights drifted apart by at most
  2e-6 here, the validation losses by 5e-7. The test allows 1e-4 and 1e-5.
- Validation on one rank and on two is the same sum of per-token losses over the same tokens,
  split differently: 1e-5.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from llm_lightning.data.datamodule import TextDataModule, accumulation_steps
from llm_lightning.data.format import read_metadata
from llm_lightning.data.sampler import StreamSampler, WindowOrder
from llm_lightning.data.windows import ScoredWindows
from llm_lightning.io.checkpoint import load_checkpoint, load_model
from tests.conftest import REPO, TINY_FIT, records, run_cli, weights
from tests.distributed.conftest import (
    BIN,
    CLUSTER,
    DIST_ENV,
    TIMEOUT,
    assert_single_writer,
    check,
    fit_flags,
    free_port,
    odd_val_stride,
    train_flags,
    val_losses,
)
from tests.probes import recorded


@pytest.fixture(scope="module")
def ddp_run(prepared_dir, tmp_path_factory) -> Path:
    """Two processes through Lightning's own DDP launcher."""
    run_dir = tmp_path_factory.mktemp("ddp")
    flags = fit_flags(prepared_dir, run_dir, "--trainer.strategy", "ddp", "--trainer.devices", 2)
    check(run_cli("fit", *flags, cwd=run_dir, timeout=TIMEOUT, env=DIST_ENV))
    return run_dir


@pytest.fixture(scope="module")
def single_run(prepared_dir, tmp_path_factory) -> Path:
    """The same global batch on one process: two micro-batches accumulated per step."""
    run_dir = tmp_path_factory.mktemp("single")
    check(run_cli("fit", *fit_flags(prepared_dir, run_dir), cwd=run_dir, timeout=TIMEOUT))
    return run_dir


# ------------------------------------------------------------------------------ DDP through the CLI
def test_two_process_ddp_reaches_max_steps_and_writes_once(ddp_run):
    assert_single_writer(ddp_run)
    (start,) = records(ddp_run / "ckpts", "start")
    assert start["world_size"] == 2
    assert start["tokens_per_step"] == 8 * 32  # the global batch the user asked for


def test_one_process_with_accumulation_matches_two_processes(ddp_run, single_run):
    (start,) = records(single_run / "ckpts", "start")
    assert start["world_size"] == 1 and start["tokens_per_step"] == 8 * 32
    one, two = val_losses(single_run / "ckpts"), val_losses(ddp_run / "ckpts")
    assert one.keys() == two.keys() == {10, 20}
    for step in one:
        assert one[step] == pytest.approx(two[step], abs=1e-5), step
    assert one[20] < one[10]  # it trained
    a, b = weights(single_run / "ckpts" / "last.ckpt"), weights(ddp_run / "ckpts" / "last.ckpt")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-4, f"weights differ by {worst}"


@pytest.mark.slow  # by default: the sharded checkpoint on one process (tests/distributed/test_sharded.py)
def test_ddp_checkpoint_loads_on_one_device(ddp_run, prepared_dir, tmp_path):
    last = ddp_run / "ckpts" / "last.ckpt"
    checkpoint = load_checkpoint(last)
    assert not [
        k for k in checkpoint["state_dict"] if "module." in k.removeprefix("model.") or "_orig_mod" in k
    ]
    model = load_model(checkpoint)
    logits = model(torch.randint(0, model.config.vocab_size, (2, 16)))
    assert logits.shape == (2, 16, model.config.vocab_size) and torch.isfinite(logits).all()

    # `validate` on one device scores the same tokens as the two ranks did during fit.
    out = tmp_path / "validate"
    result = run_cli(
        "validate", *TINY_FIT, "--data.data_dir", prepared_dir, "--data.stride", odd_val_stride(prepared_dir),
        "--data.batch_size", 4, "--ckpt_path", last, "--trainer.accelerator", "cpu",
        "--checkpoint.dirpath", out, "--trainer.default_root_dir", tmp_path / "logs",
        "--trainer.callbacks+=tests.probes.RecordMetrics", "--trainer.callbacks.path", tmp_path / "metrics.jsonl",
        cwd=tmp_path, timeout=TIMEOUT,
    )  # fmt: skip
    check(result)
    assert [r["val/loss"] for r in recorded(tmp_path / "metrics.jsonl")] == [
        pytest.approx(val_losses(ddp_run / "ckpts")[20], abs=1e-5)
    ]
    assert not out.exists()  # validate leaves the run's folders alone


@pytest.mark.slow
def test_validate_on_two_ranks_equals_one_rank(ddp_run, prepared_dir, tmp_path):
    """An odd number of val windows: rank 1 gets a zero-mask padding window that must count for nothing."""
    losses = []
    for devices in (1, 2):
        out = tmp_path / f"validate{devices}"
        result = run_cli(
            "validate", *TINY_FIT, "--data.data_dir", prepared_dir, "--data.stride", odd_val_stride(prepared_dir),
            "--data.batch_size", 4, "--ckpt_path", ddp_run / "ckpts" / "last.ckpt", "--trainer.accelerator", "cpu",
            "--trainer.devices", devices, "--trainer.strategy", "ddp", "--checkpoint.dirpath", out,
            "--trainer.default_root_dir", tmp_path / "logs",
            "--trainer.callbacks+=tests.probes.RecordMetrics", "--trainer.callbacks.path", out.with_suffix(".jsonl"),
            cwd=tmp_path, timeout=TIMEOUT, env=DIST_ENV,
        )  # fmt: skip
        check(result)
        losses += [r["val/loss"] for r in recorded(out.with_suffix(".jsonl"))]
    assert len(losses) == 2 and losses[0] == pytest.approx(losses[1], abs=1e-5)


# ------------------------------------------------------------------------------ two nodes with torchrun
def test_torchrun_two_nodes_on_loopback(ddp_run, prepared_dir, tmp_path):
    """configs/cluster/torchrun_multinode.sh on two simulated nodes, one process each."""
    config = tmp_path / "defaults.yaml"  # the script needs a config; ddp_run used none (no recipe)
    config.write_text("seed_everything: 1337\n")
    env = {
        **os.environ, **DIST_ENV, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
        "RUN_ID": "test-two-nodes", "CONFIG": str(config), "RUN_DIR": str(tmp_path),
        "DATA_DIR": str(prepared_dir),
    }  # fmt: skip
    flags = [*map(str, train_flags(prepared_dir))]
    nodes = [
        subprocess.Popen(
            ["bash", str(CLUSTER / "torchrun_multinode.sh"), *flags],
            cwd=REPO,
            env={**env, "NODE_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (1, 0)  # the order the nodes come up in does not matter
    ]
    try:
        outputs = [node.communicate(timeout=TIMEOUT)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-6000:]
    assert_single_writer(tmp_path)
    (start,) = records(tmp_path / "checkpoints", "start")
    assert start["world_size"] == 2
    # Same world size, same global batch, same data: the same run as Lightning's launcher made.
    two_nodes, two_processes = val_losses(tmp_path / "checkpoints"), val_losses(ddp_run / "ckpts")
    assert two_nodes == pytest.approx(two_processes, abs=1e-5)


# ------------------------------------------------------------------------------ SLURM requeue
# ------------------------------------------------------------------------------ data under DDP
def test_ranks_read_distinct_windows_and_keep_the_global_batch():
    length, micro, global_batch, steps = 101, 4, 16, 9  # 9 steps: past the first epoch's end
    order = WindowOrder(length, seed=7)
    per_step = {}  # world size -> the windows of each optimizer step, over all ranks
    for world in (1, 2, 4):
        per_rank = accumulation_steps(global_batch, micro, world) * micro
        assert per_rank * world == global_batch
        shards = []
        for rank in range(world):
            iterator = iter(StreamSampler(order, 0, micro, rank, world))
            shards.append([next(iterator) for _ in range(steps * per_rank)])
        per_step[world] = [
            sorted(i for shard in shards for i in shard[k * per_rank : (k + 1) * per_rank])
            for k in range(steps)
        ]
    # Each optimizer step sees the same windows whatever the number of ranks: the stream's next 16.
    assert per_step[1] == per_step[2] == per_step[4]
    assert per_step[1] == [sorted(order(p) for p in range(k * 16, (k + 1) * 16)) for k in range(steps)]


def test_val_windows_scored_exactly_once_over_ranks(prepared_dir):
    metadata = read_metadata(prepared_dir)
    path, max_length = prepared_dir / "dataset" / "val.bin", metadata["max_length"]
    stride = odd_val_stride(prepared_dir)
    single = ScoredWindows(path, metadata["dtype"], max_length, stride)
    expected = sum(int(single[i][2].sum()) for i in range(len(single)))
    assert expected == metadata["num_tokens"]["val"] - 1  # every target token of the split, once
    total, sizes = 0, set()
    for rank in range(2):
        windows = ScoredWindows(path, metadata["dtype"], max_length, stride, rank=rank, world_size=2)
        sizes.add(len(windows))
        total += sum(int(windows[i][2].sum()) for i in range(len(windows)))
    assert len(sizes) == 1  # equal batch counts on both ranks (the odd window out is padding)
    assert total == expected


def test_training_never_prepares_data(tmp_path):
    """Preparing is its own command, run once; the DataModule only reads a complete folder."""
    import lightning as L

    from llm_lightning.errors import UserError

    assert TextDataModule.prepare_data is L.LightningDataModule.prepare_data
    with pytest.raises(UserError, match="prepare"):
        TextDataModule(tmp_path / "nothing_here")
