"""Sharded training for real on CPU with gloo: FSDP2 on 2 processes, TP on 2, FSDP2+TP on 4.

Every run is the real `llm-lightning fit` with a configs/strategy/ fragment; the model uses
grouped-query attention (4 query heads, 2 key/value heads), so tensor parallelism splits the
key/value heads too. The reference is one process with the same global batch.

Tolerances (fp32): the sharded runs compute the same sums in other orders (reduce-scatters,
all-reduces, split matrix products), so each number differs by a few roundings. The val loss
after 10 steps agrees to 1e-5 (measured: 1e-7). Single weights agree to 2e-3: a few embedding
rows of rare tokens have gradients near zero, where Adam's normalisation turns rounding noise
into updates of the learning rate's size (measured: 3e-4 after 10 steps at lr 3e-3); the val
loss, which all weights decide, shows the runs are the same training.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from llm_lightning.data.format import read_metadata, split_path
from llm_lightning.data.sampler import WindowOrder
from llm_lightning.data.windows import TokenWindows
from llm_lightning.io.checkpoint import is_sharded, load_checkpoint
from tests.conftest import REPO, TINY_FIT, records, run_cli, weights
from tests.distributed.conftest import DIST_ENV, TIMEOUT, check

STRATEGIES = REPO / "configs" / "strategy"
GQA = ("--model.num_kv_heads", "2")
PLAN = ("--model.max_steps", "20", "--eval_interval", "10", "--checkpoint.every_n_train_steps", "10")


def flags(data: Path, ckpts: Path, steps: int, micro: int, *extra) -> list:
    return [
        *TINY_FIT, *GQA, *PLAN, "--data.data_dir", data, "--data.batch_size", 8, "--data.micro_batch_size", micro,
        "--trainer.max_steps", steps, "--trainer.accelerator", "cpu", "--checkpoint.dirpath", ckpts,
        "--trainer.default_root_dir", ckpts.parent / "logs", *extra,
    ]  # fmt: skip


def sharded(fragment: str, devices: int) -> tuple:
    return ("--config", STRATEGIES / fragment, "--trainer.devices", devices)


def probe(path: Path) -> tuple:
    return ("--trainer.callbacks+=tests.probes.RecordWindows", "--trainer.callbacks.path", path)


def record_sharding(path: Path) -> tuple:
    return ("--trainer.callbacks+=tests.probes.RecordSharding", "--trainer.callbacks.path", path)


def train(data: Path, ckpts: Path, steps: int, micro: int, *extra) -> Path:
    ckpts.parent.mkdir(parents=True, exist_ok=True)
    check(
        run_cli(
            "fit", *flags(data, ckpts, steps, micro, *extra), cwd=ckpts.parent, timeout=TIMEOUT, env=DIST_ENV
        )
    )
    return ckpts


def val_at(ckpts: Path, step: int) -> float:
    return {r["step"]: r["val/loss"] for r in records(ckpts, "val")}[step]


def assert_same_training(a: Path, b: Path, step: int) -> None:
    assert val_at(a, step) == pytest.approx(val_at(b, step), abs=1e-5)
    wa, wb = weights(a / "last.ckpt"), weights(b / "last.ckpt")
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst < 2e-3, f"weights differ by {worst}"


@pytest.fixture(scope="module")
def runs(prepared_dir, tmp_path_factory) -> dict[str, Path]:
    """The reference (1 process, 20 steps) and 10 steps of each sharded layout."""
    root = tmp_path_factory.mktemp("sharded")
    fsdp_probes = (*sharded("fsdp.yaml", 2), *probe(root / "w.jsonl"), *record_sharding(root / "fsdp" / "s"))
    return {
        "one": train(prepared_dir, root / "one" / "ckpts", 20, 8, *record_sharding(root / "one" / "s")),
        # micro-batch 2 on 2 ranks: accumulation 2, so FSDP2's no-sync path is what trains here
        "fsdp": train(prepared_dir, root / "fsdp" / "ckpts", 10, 2, *fsdp_probes),
        "tp": train(prepared_dir, root / "tp" / "ckpts", 10, 8, *sharded("tp.yaml", 2)),
        "2d": train(prepared_dir, root / "2d" / "ckpts", 10, 4, *sharded("fsdp_tp.yaml", 4)),
    }


@pytest.mark.parametrize("layout", ["fsdp", "tp", "2d"])
def test_each_layout_trains_like_one_process(runs, layout):
    ckpts = runs[layout]
    assert val_at(ckpts, 10) == pytest.approx(val_at(runs["one"], 10), abs=1e-5)
    last = ckpts / "last.ckpt"
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == {"fsdp": 2, "tp": 2, "2d": 4}[layout]
    assert (ckpts / "checkpoint_step_10.ckpt").is_dir() and (ckpts / "best.ckpt").is_dir()
    assert not list(ckpts.parent.glob("**/*.tmp-*"))  # every save renamed into place
    (start,) = records(ckpts, "start")
    assert start["data_parallel_size"] == {"fsdp": 2, "tp": 1, "2d": 2}[layout]


def test_fsdp_starts_from_one_process_weights_and_reduce_scatters_once_per_step(runs):
    """Built on the meta device and initialised shard by shard, the FSDP2 run starts from the very
    weights of the one-process run; with accumulation 2, each FSDP unit reduce-scatters its
    gradients once per optimizer step (not once per micro-batch)."""
    one = torch.load(runs["one"].parent / "s.init.pt")
    fsdp = torch.load(runs["fsdp"].parent / "s.init.pt")
    assert one.keys() == fsdp.keys()
    for name, value in one.items():
        assert torch.equal(value, fsdp[name]), name
    for rank in (0, 1):
        lines = (runs["fsdp"].parent / f"s.rank{rank}").read_text().splitlines()
        steps = [json.loads(line) for line in lines]
        assert len(steps) == 10
        for step in steps:
            # embedding, 2 blocks, final norm + head (the root then holds no parameters)
            assert step["units"] == 4
            scatters = sum(n for op, n in step["collectives"].items() if "reduce_scatter" in op)
            assert scatters == step["units"], step


@pytest.mark.parametrize("layout", ["tp", "2d"])
def test_a_sharded_run_resumes_from_last_on_its_layout(runs, prepared_dir, layout):
    devices, fragment, micro = {"tp": (2, "tp.yaml", 8), "2d": (4, "fsdp_tp.yaml", 4)}[layout]
    ckpts = train(prepared_dir, runs[layout], 20, micro, *sharded(fragment, devices), "--ckpt_path", "last")
    assert_same_training(runs["one"], ckpts, 20)


def read_windows(path: Path, ranks: int) -> list[tuple]:
    return [tuple(json.loads(line)) for r in range(ranks) for line in path.with_name(f"{path.name}.rank{r}").read_text().splitlines()]  # fmt: skip


def test_elastic_two_processes_then_one_equals_one_process(runs, prepared_dir, tmp_path):
    """10 steps of FSDP2 on 2 processes, resumed to 20 on 1 device (no sharding) in the same folder:
    the 1-process run's training, files written where the shard folders were, and the windows
    read across both parts are the stream's first 160, each once."""
    ckpts = runs["fsdp"]
    assert is_sharded(ckpts / "last.ckpt") and is_sharded(ckpts / "best.ckpt")
    train(prepared_dir, ckpts, 20, 8, *probe(tmp_path / "w.jsonl"), "--ckpt_path", "last")
    assert_same_training(runs["one"], ckpts, 20)
    assert (ckpts / "last.ckpt").is_file() and (ckpts / "best.ckpt").is_file()
    assert is_sharded(ckpts / "checkpoint_step_10.ckpt") and not list(ckpts.glob("*.tmp-*"))
    first = read_windows(ckpts.parents[1] / "w.jsonl", 2)
    second = read_windows(tmp_path / "w.jsonl", 1)
    metadata = read_metadata(prepared_dir)
    windows = TokenWindows(
        split_path(prepared_dir, "train"), metadata["dtype"], metadata["max_length"], metadata["stride"]
    )
    order = WindowOrder(len(windows), seed=1337)
    expected = [tuple(windows[order(p)][0].tolist()) for p in range(160)]
    assert len(first) == len(second) == 80
    assert Counter(first + second) == Counter(expected)
    assert len(windows) >= 160  # within one epoch: "each once" means no repeats


def test_one_process_checkpoint_resumes_sharded_and_sharded_resumes_in_ddp(runs, prepared_dir, tmp_path):
    """A single-file checkpoint (1 device; DDP writes the same) resumes on FSDP2 x 2, a sharded one in
    DDP, each in the folder that holds it: the other kind is written over it under the same name."""
    into_fsdp = tmp_path / "fsdp" / "ckpts"
    into_fsdp.mkdir(parents=True)
    (into_fsdp / "last.ckpt").write_bytes((runs["one"] / "checkpoint_step_10.ckpt").read_bytes())
    train(prepared_dir, into_fsdp, 20, 4, *sharded("fsdp.yaml", 2), "--ckpt_path", "last")
    assert_same_training(runs["one"], into_fsdp, 20)
    assert is_sharded(into_fsdp / "last.ckpt")
    into_ddp = tmp_path / "ddp" / "ckpts"
    shutil.copytree(runs["2d"] / "checkpoint_step_10.ckpt", into_ddp / "last.ckpt")
    ddp = ("--trainer.strategy", "ddp", "--trainer.devices", 2)
    train(prepared_dir, into_ddp, 20, 4, *ddp, "--ckpt_path", "last")
    assert_same_training(runs["one"], into_ddp, 20)
    assert (into_ddp / "last.ckpt").is_file() and not list(into_ddp.glob("*.tmp-*"))


def test_a_sharded_checkpoint_validates_generates_and_exports_on_one_process(runs, prepared_dir, tmp_path):
    folder = runs["2d"] / "checkpoint_step_10.ckpt"
    out = tmp_path / "metrics.jsonl"
    validated = run_cli(
        "validate", *TINY_FIT, *GQA, "--data.data_dir", prepared_dir, "--data.batch_size", 8, "--ckpt_path", folder,
        "--trainer.callbacks+=tests.probes.RecordMetrics", "--trainer.callbacks.path", out, cwd=tmp_path,
    )  # fmt: skip
    check(validated)
    (result,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert result["val/loss"] == pytest.approx(val_at(runs["2d"], 10), abs=1e-5)
    generated = run_cli(
        "generate", "--ckpt_path", folder, "--prompt", "The cat", "--max_new_tokens", 8, "--seed", 0
    )
    check(generated)
    check(run_cli("export", "--ckpt_path", folder, "--output_dir", tmp_path / "hf"))
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    check(run_cli("consolidate", "--ckpt_path", folder, "--output", tmp_path / "one.ckpt"))
    assert load_checkpoint(tmp_path / "one.ckpt")["global_step"] == 10


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


SPOIL = {
    "fit": ("__1_0.distcp", truncate),
    "validate": (".metadata", lambda p: p.write_bytes(b"garbage, not a pickle" * 20)),
    "export": ("__1_0.distcp", truncate),
    "generate": (".metadata", lambda p: p.write_bytes(b"garbage, not a pickle" * 20)),
    "consolidate": ("__1_0.distcp", truncate),
}


def on_folder(command: str, folder: Path, data: Path, out: Path) -> tuple:
    if command == "fit":  # sharded on 2 processes, from the folder's last.ckpt
        return ("fit", *flags(data, folder.parent, 20, 4, *sharded("fsdp.yaml", 2), "--ckpt_path", "last"))
    if command == "validate":
        data_flags = ("--data.data_dir", data, "--data.batch_size", 8)
        return ("validate", *TINY_FIT, *GQA, *data_flags, "--ckpt_path", folder)
    extra = {"export": ("--output_dir", out), "generate": ("--prompt", "a"), "consolidate": ("--output", out)}
    return (command, "--ckpt_path", folder, *extra[command])


@pytest.mark.parametrize(
    "command", ["fit", "export", *(pytest.param(c, marks=pytest.mark.slow) for c in ("validate", "generate", "consolidate"))]
)  # fmt: skip
def test_a_damaged_shard_or_metadata_is_one_line_naming_the_file(runs, prepared_dir, tmp_path, command):
    """A truncated shard or a garbage .metadata: one line naming that file, exit 2, nothing written."""
    folder = tmp_path / "ckpts" / "last.ckpt"
    shutil.copytree(runs["2d"] / "checkpoint_step_10.ckpt", folder)
    name, spoil = SPOIL[command]
    spoil(folder / name)
    result = run_cli(*on_folder(command, folder, prepared_dir, tmp_path / "out"), cwd=tmp_path, env=DIST_ENV)
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("llm-lightning: error:")]
    assert str(folder / name) in line and "Traceback" not in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["ckpts"] and os.listdir(folder.parent) == ["last.ckpt"]


def test_kill_9_during_a_sharded_save_keeps_the_previous_last(prepared_dir, tmp_path):
    """A real SIGKILL while shards are being written; `--ckpt_path last` then resumes."""
    ckpts = tmp_path / "ckpts"
    argv = flags(prepared_dir, ckpts, 200, 4, *sharded("fsdp.yaml", 2), "--checkpoint.every_n_train_steps", 1)
    process = subprocess.Popen(
        [sys.executable, "-m", "llm_lightning", "fit", *map(str, argv)],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO), **DIST_ENV},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline:  # a save in progress, after an earlier one (linked as last)
            if (ckpts / "last.ckpt").is_dir() and any(ckpts.glob("checkpoint_step_*.ckpt.tmp-*")):
                break
            assert process.poll() is None, "the run ended before it could be killed"
            time.sleep(0.01)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    killed_at = load_checkpoint(ckpts / "last.ckpt")["global_step"]  # complete, readable
    assert killed_at >= 1
    resumed = train(prepared_dir, ckpts, killed_at + 2, 4, *sharded("fsdp.yaml", 2), "--ckpt_path", "last")
    assert [r["step"] for r in records(resumed, "start")][-1] == killed_at
    assert load_checkpoint(ckpts / "last.ckpt")["global_step"] == killed_at + 2
    assert not list(ckpts.glob("*.tmp-*"))  # the dead run's leftovers are cleaned up


def test_head_counts_that_do_not_divide_are_one_clear_line(prepared_dir, tmp_path):
    result = run_cli(
        "fit", *flags(prepared_dir, tmp_path / "ckpts", 2, 8, *sharded("tp.yaml", 2), "--model.num_kv_heads", 1),
        cwd=tmp_path, env=DIST_ENV,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("llm-lightning: error:")]
    assert len(lines) == 1 and "--model.num_kv_heads 1" in lines[0] and "tensor-parallel size 2" in lines[0]
