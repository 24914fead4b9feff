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

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import yaml

from llm_lightning.checkpoint import load_checkpoint, load_model
from llm_lightning.data.datamodule import TextDataModule, accumulation_steps, read_metadata
from llm_lightning.data.windows import ScoredWindows, ShuffledShardSampler, window_starts
from tests.conftest import REPO, TINY_FIT, run_cli

CLUSTER = REPO / "configs" / "cluster"
BIN = Path(sys.executable).parent  # the environment's llm-lightning and torchrun
TIMEOUT = 240  # seconds for any one launched process
STEPS = 20
CHECKPOINT_FILES = [
    "best.ckpt",
    "checkpoint_step_10.ckpt",
    "checkpoint_step_20.ckpt",
    "last.ckpt",
    "metrics.jsonl",
]
# Two processes on this 2-core machine: one thread each, or they fight over the cores.
DIST_ENV = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def odd_val_stride(data_dir: Path) -> int:
    """A stride that gives an odd number of val windows: two ranks then need a padding window."""
    metadata = read_metadata(data_dir)
    for stride in range(metadata["max_length"], 0, -1):
        if len(window_starts(metadata["num_tokens"]["val"], metadata["max_length"], stride)) % 2:
            return stride
    raise AssertionError("no stride gives an odd number of val windows")


def train_flags(data_dir: Path) -> list:
    """A 20-step fit on CPU: global batch 8 of micro-batches of 4, checkpoints and validation every 10 steps."""
    return [
        *TINY_FIT, "--data.stride", odd_val_stride(data_dir), "--data.batch_size", 8, "--data.micro_batch_size", 4,
        "--trainer.max_steps", STEPS, "--trainer.log_every_n_steps", 5, "--eval_interval", 10,
        "--checkpoint.every_n_train_steps", 10, "--trainer.accelerator", "cpu",
    ]  # fmt: skip


def fit_flags(data_dir: Path, run_dir: Path, *extra) -> list:
    return [
        *train_flags(data_dir), "--data.data_dir", data_dir, "--checkpoint.dirpath", run_dir / "ckpts",
        "--trainer.default_root_dir", run_dir / "logs", *extra,
    ]  # fmt: skip


def records(ckpt_dir: Path, event: str) -> list[dict]:
    lines = (ckpt_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def val_losses(ckpt_dir: Path) -> dict[int, float]:
    return {r["step"]: r["val/loss"] for r in records(ckpt_dir, "val")}


def check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (
        f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    )


def weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_checkpoint(path)["state_dict"].items() if k.startswith("model.")}


def assert_single_writer(run_dir: Path) -> None:
    """Checkpoints once, no versioned duplicates, the run log and TensorBoard written by rank 0 only."""
    ckpt_dir = run_dir / "ckpts" if (run_dir / "ckpts").is_dir() else run_dir / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == CHECKPOINT_FILES
    assert [r["step"] for r in records(ckpt_dir, "train")] == [5, 10, 15, 20]
    assert sorted(val_losses(ckpt_dir)) == [10, 20]
    assert len(list(run_dir.rglob("events.out.tfevents.*"))) == 1
    assert load_checkpoint(ckpt_dir / "last.ckpt")["global_step"] == STEPS


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
        "--checkpoint.dirpath", out, "--trainer.default_root_dir", tmp_path / "logs", cwd=tmp_path, timeout=TIMEOUT,
    )  # fmt: skip
    check(result)
    assert [r["val/loss"] for r in records(out, "val")] == [
        pytest.approx(val_losses(ddp_run / "ckpts")[20], abs=1e-5)
    ]


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
            "--trainer.default_root_dir", tmp_path / "logs", cwd=tmp_path, timeout=TIMEOUT, env=DIST_ENV,
        )  # fmt: skip
        check(result)
        losses += [r["val/loss"] for r in records(out, "val")]
    assert len(losses) == 2 and losses[0] == pytest.approx(losses[1], abs=1e-5)


# ------------------------------------------------------------------------------ two nodes with torchrun
def test_torchrun_two_nodes_on_loopback(ddp_run, prepared_dir, tmp_path):
    """configs/cluster/torchrun_multinode.sh on two simulated nodes, one process each."""
    env = {
        **os.environ, **DIST_ENV, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
        "RUN_ID": "test-two-nodes", "CONFIG": "configs/tiny.yaml", "RUN_DIR": str(tmp_path),
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
FAKE_SRUN = """#!/bin/bash
# srun stand-in: record the call, start the tasks of one node with their SLURM ranks, wait for them
echo "srun $*" >> "$FAKE_SLURM_DIR/calls.log"
ntasks=$SLURM_NTASKS
while [[ $# -gt 0 && $1 == -* ]]; do
    [[ $1 == --ntasks=* ]] && ntasks=${1#--ntasks=}
    shift
done
pids=()
for ((rank = 0; rank < ntasks; rank++)); do
    SLURM_PROCID=$rank SLURM_LOCALID=$rank SLURM_NTASKS=$ntasks "$@" &
    pids+=($!)
done
echo "${pids[*]}" > "$FAKE_SLURM_DIR/tasks.pid"
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
FAKE_SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$FAKE_SLURM_DIR/calls.log"
"""


def slurm_env(fake_bin: Path, tasks: int = 1) -> dict:
    """What sbatch gives a one-node job with TASKS tasks; the fake srun adds each task's rank."""
    return {
        **os.environ, **DIST_ENV, "PATH": f"{fake_bin}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}",
        "FAKE_SLURM_DIR": str(fake_bin), "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "llm-test",
        "SLURM_NNODES": "1", "SLURM_NTASKS": str(tasks), "SLURM_NTASKS_PER_NODE": str(tasks),
        "SLURM_NODEID": "0", "SLURM_NODELIST": "127.0.0.1", "SLURM_CPUS_PER_TASK": "1",
        "MASTER_PORT": str(free_port()),
    }  # fmt: skip


def write_fake_slurm(fake_bin: Path) -> None:
    fake_bin.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (fake_bin / name).write_text(text)
        (fake_bin / name).chmod(0o755)


def descendants(pid: int) -> list[int]:
    """PID and every process below it (DataLoader workers), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.kill(pid, signum)


def wait_for(condition, what: str, process: subprocess.Popen, log: Path, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the job ended before {what}:\n{log.read_text()[-6000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-6000:]}")
        time.sleep(0.1)


def start_job(flags: list[str], env: dict, log: Path) -> subprocess.Popen:
    """Run the batch script as SLURM would, in its own process group."""
    with log.open("w") as stream:
        command = ["bash", str(CLUSTER / "slurm.sbatch"), *flags]
        return subprocess.Popen(
            command, cwd=REPO, env=env, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True
        )


def kill_job(job: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(job.pid, signal.SIGKILL)  # the script, its tasks and their DataLoader workers


REQUEUE_CASES = [
    pytest.param(1, 0, id="one-task"),
    pytest.param(
        2, 1, id="two-tasks-with-workers",
        marks=[pytest.mark.slow],
    ),
]  # fmt: skip


@pytest.mark.parametrize(("tasks", "workers"), REQUEUE_CASES)
def test_sigusr1_requeues_and_the_requeued_job_resumes(tasks, workers, corpus_dir, tmp_path):
    """configs/cluster/slurm.sbatch under a fake srun/scontrol, with real signals to the real fit.

    `#SBATCH --signal=SIGUSR1@90` makes SLURM send SIGUSR1 to every process of the job step 90 s
    before the time limit; the job must save, call `scontrol requeue` and, once SLURM has ended
    it with SIGTERM and started the script again, continue from that checkpoint to max_steps.
    """
    fake_bin, run_dir = tmp_path / "bin", tmp_path / "run"
    ckpt_dir, calls = run_dir / "checkpoints", fake_bin / "calls.log"
    write_fake_slurm(fake_bin)
    env = {
        **slurm_env(fake_bin, tasks), "CONFIG": "configs/tiny.yaml", "RAW_DIR": str(corpus_dir),
        "DATA_DIR": str(tmp_path / "processed_data"), "RUN_DIR": str(run_dir),
        "PREPARE_ARGS": "--vocab_size 512 --max_length 32 --stride 32 --val_fraction 0.1",
    }  # fmt: skip
    steps = 60  # long enough to be signalled while training; no periodic checkpoint before the end
    flags = [*map(str, TINY_FIT), "--data.batch_size", str(4 * tasks), "--data.micro_batch_size", "4",
             "--data.num_workers", str(workers), "--trainer.max_steps", str(steps),
             "--checkpoint.every_n_train_steps", str(steps), "--eval_interval", str(steps),
             "--trainer.accelerator", "cpu"]  # fmt: skip

    def training() -> bool:
        return (ckpt_dir / "metrics.jsonl").exists() and bool(records(ckpt_dir, "train"))

    def requeued() -> bool:
        return calls.exists() and "scontrol requeue 4242" in calls.read_text()

    log = tmp_path / "first.log"
    first = start_job(flags, env, log)
    try:
        wait_for(training, "training", first, log)
        tasks_and_workers = [
            pid for task in (fake_bin / "tasks.pid").read_text().split() for pid in descendants(int(task))
        ]
        signal_all(tasks_and_workers, signal.SIGUSR1)
        wait_for(requeued, "scontrol requeue", first, log, timeout=60)
        # SLURM then ends the job: SIGTERM, and SIGKILL after its KillWait (30 s by default).
        signal_all(tasks_and_workers, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            first.wait(timeout=30)
    finally:
        kill_job(first)
    # SlurmRequeue saved last.ckpt at a step boundary; Lightning's own handler (hpc_ckpt) never ran
    assert not list(run_dir.glob("hpc_ckpt_*.ckpt"))
    newest = load_checkpoint(ckpt_dir / "last.ckpt")["global_step"]
    assert 0 < newest < steps

    log = tmp_path / "second.log"
    second = start_job(flags, env, log)  # the requeued job runs the script again
    try:
        second.wait(timeout=TIMEOUT)
    finally:
        kill_job(second)
    assert second.returncode == 0, log.read_text()[-6000:]
    assert [r["step"] for r in records(ckpt_dir, "start")] == [0, newest]
    assert load_checkpoint(ckpt_dir / "last.ckpt")["global_step"] == steps
    launched = calls.read_text().splitlines()
    assert sum(" prepare " in line for line in launched) == 1  # by one task, once; skipped on requeue
    assert sum(" fit " in line for line in launched) == 2
    assert launched.count("scontrol requeue 4242") == 1


# ------------------------------------------------------------------------------ scripts and configs parse
def print_config(capsys, args: list[str]) -> dict:
    """The config LightningCLI resolves from ARGS, without building anything."""
    from llm_lightning.training.cli import run_lightning_cli

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info, mock.patch.object(sys, "argv", ["llm-lightning"]):
        run_lightning_cli([*map(str, args), "--print_config"])
    output = capsys.readouterr()
    assert exit_info.value.code in (0, None), output.err[-3000:]
    return yaml.safe_load(output.out)


def recorded_calls(fake_bin: Path) -> list[list[str]]:
    """Argument lists the fake launcher was called with (NUL-separated, one file per call)."""
    paths = sorted(fake_bin.glob("call-*"), key=lambda path: int(path.name.removeprefix("call-")))
    return [path.read_text().split("\0")[:-1] for path in paths]


RECORDER = """#!/bin/bash
# launcher stand-in: write its arguments, NUL-separated, to call-N beside it; run nothing
shopt -s nullglob
calls=("$(dirname "$0")"/call-*)
for arg in "$0" "$@"; do printf '%s\\0' "$arg"; done > "$(dirname "$0")/call-${#calls[@]}"
"""


def write_recorder(fake_bin: Path, *names: str) -> None:
    fake_bin.mkdir(exist_ok=True)
    for name in names:
        (fake_bin / name).write_text(RECORDER)
        (fake_bin / name).chmod(0o755)


def test_slurm_script_command_lines_parse(prepared_dir, tmp_path, capsys):
    fake_bin = tmp_path / "bin"
    write_recorder(fake_bin, "srun")
    env = {**slurm_env(fake_bin), "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "8",
           "DATA_DIR": str(tmp_path / "missing"), "RUN_DIR": str(tmp_path / "run")}  # fmt: skip
    result = subprocess.run(["bash", str(CLUSTER / "slurm.sbatch")], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    check(result)
    prepare_call, fit_call = recorded_calls(fake_bin)

    # prepare: one task on one node, flags known to `llm-lightning prepare`
    from llm_lightning.data.prepare import build_parser

    assert prepare_call[1:5] == ["--nodes=1", "--ntasks=1", "llm-lightning", "prepare"]
    options = build_parser().parse_args(prepare_call[5:])
    assert options.output_dir == str(tmp_path / "missing") and options.max_length == 2048

    # fit: every flag known to the CLI; nodes and devices from the allocation
    program = fit_call.index("llm-lightning")
    assert fit_call[program + 1] == "fit"
    args = fit_call[program + 1 :]
    args[args.index("--data.data_dir") + 1] = str(prepared_dir)
    config = print_config(capsys, args)
    assert config["trainer"]["num_nodes"] == 2 and str(config["trainer"]["devices"]) == "8"
    assert config["trainer"]["strategy"]["class_path"].endswith("DDPStrategy")
    assert config["checkpoint"]["dirpath"] == str(tmp_path / "run" / "checkpoints")
    assert config["trainer"]["default_root_dir"] == str(tmp_path / "run")
    assert config["ckpt_path"] == "last"  # nothing saved yet


def test_torchrun_script_command_line_parses(prepared_dir, tmp_path, capsys):
    from torch.distributed.run import get_args_parser

    fake_bin = tmp_path / "bin"
    write_recorder(fake_bin, "torchrun")
    env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}", "NODE_RANK": "1"}
    check(subprocess.run(["bash", str(CLUSTER / "torchrun_multinode.sh")], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=60))  # fmt: skip
    ((_, *torchrun_args),) = recorded_calls(fake_bin)
    launch = get_args_parser().parse_args(torchrun_args)
    assert (launch.nnodes, launch.nproc_per_node, launch.rdzv_backend) == ("2", "8", "c10d")
    assert launch.module and launch.training_script == "llm_lightning"
    assert launch.rdzv_conf == "is_host=0"
    args = list(launch.training_script_args)
    args[args.index("--data.data_dir") + 1] = str(prepared_dir)
    config = print_config(capsys, args)
    assert config["trainer"]["num_nodes"] == 2 and str(config["trainer"]["devices"]) == "8"
    assert config["ckpt_path"] == "last"


SIZES = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
FRAGMENTS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").glob("*/*.yaml"))


@pytest.mark.parametrize("size", SIZES)
def test_size_config_parses(size, prepared_dir, capsys):
    config = print_config(
        capsys, ["fit", "--config", REPO / "configs" / size, "--data.data_dir", prepared_dir]
    )
    assert config["model"]["preset"] == size.removesuffix(".yaml")


@pytest.mark.parametrize("fragment", FRAGMENTS)
def test_fragment_stacks_on_a_size_config(fragment, prepared_dir, capsys):
    size = REPO / "configs" / ("large.yaml" if "fsdp" in fragment else "medium.yaml")
    config = print_config(
        capsys, ["fit", "--config", size, "--config", REPO / fragment, "--data.data_dir", prepared_dir]
    )
    expected = yaml.safe_load((REPO / fragment).read_text())["trainer"]
    for key, value in expected.items():
        if key == "strategy":
            assert config["trainer"]["strategy"]["class_path"] == value["class_path"]
        else:
            assert config["trainer"][key] == value


# ------------------------------------------------------------------------------ FSDP (GPU only)
def fsdp_strategy():
    """configs/strategy/fsdp.yaml's strategy, built by jsonargparse as LightningCLI builds it."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import Strategy

    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    fragment = yaml.safe_load((REPO / "configs" / "strategy" / "fsdp.yaml").read_text())
    config = parser.parse_object({"strategy": fragment["trainer"]["strategy"]})
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in 4.49
    return instantiate(config).strategy


def test_fsdp_fragment_wraps_and_checkpoints_each_block():
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from llm_lightning.model.transformer import Block

    strategy = fsdp_strategy()
    assert isinstance(strategy, FSDPStrategy)
    wrap = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(wrap, ModuleWrapPolicy) and wrap._module_classes == {Block}
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {Block}
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert strategy._state_dict_type == "full"  # one .ckpt file that loads on one device
    assert strategy.mixed_precision is None  # follows --trainer.precision
    assert strategy.kwargs["use_orig_params"]  # the module's own parameters reach configure_optimizers


def test_fsdp_needs_a_gpu():
    """Why FSDP is not trained in this suite: Lightning and PyTorch both refuse it on CPU."""
    import lightning as L

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: run FSDP for real instead")
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        L.Trainer(accelerator="cpu", devices=2, strategy=fsdp_strategy(), logger=False)
    probe = (
        "import torch, torch.distributed as dist\n"
        "from torch.distributed.fsdp import FullyShardedDataParallel as FSDP\n"
        f"dist.init_process_group('gloo', init_method='tcp://127.0.0.1:{free_port()}', rank=0, world_size=1)\n"
        "try:\n    FSDP(torch.nn.Linear(4, 4))\nexcept RuntimeError as e:\n    print('refused:', e)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert "refused:" in result.stdout, result.stdout + result.stderr


# ------------------------------------------------------------------------------ data under DDP
def test_ranks_read_distinct_windows_and_keep_the_global_batch():
    length, micro, global_batch = 101, 4, 16
    order = {}  # world size -> windows of each optimizer step, over all ranks
    for world in (1, 2, 4):
        shards = [
            list(ShuffledShardSampler(length, seed=7, rank=rank, world_size=world, global_batch=global_batch))
            for rank in range(world)
        ]
        assert len({len(s) for s in shards}) == 1  # the same number of batches on every rank
        seen = [i for shard in shards for i in shard]
        assert len(seen) == len(set(seen))  # no window on two ranks
        assert len(seen) == length // global_batch * global_batch  # whole global batches only
        per_rank = global_batch // world  # micro x accumulation on each rank
        assert accumulation_steps(global_batch, micro, world) * micro == per_rank
        order[world] = [
            sorted(i for s in shards for i in s[k * per_rank : (k + 1) * per_rank])
            for k in range(len(shards[0]) // per_rank)
        ]
    # Each optimizer step sees the same windows whatever the number of ranks.
    assert order[1] == order[2] == order[4]
    assert len(order[1]) == length // global_batch


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


@pytest.mark.parametrize(("global_batch", "world"), [(8, 1), (8, 2), (12, 1), (24, 2)])
def test_every_optimizer_step_of_an_epoch_has_the_full_global_batch(prepared_dir, global_batch, world):
    """No partial accumulation at the end of an epoch: each rank's batches are whole optimizer steps."""
    micro = 4
    accumulation = accumulation_steps(global_batch, micro, world)
    counts = set()
    for rank in range(world):
        data = TextDataModule(prepared_dir, batch_size=global_batch, micro_batch_size=micro, num_workers=0)
        data.trainer = SimpleNamespace(global_rank=rank, world_size=world)
        counts.add(len(data.train_dataloader()))
    (batches,) = counts  # the same on every rank
    assert batches > 0 and batches % accumulation == 0


def test_training_never_prepares_data(tmp_path):
    """Preparing is its own command, run once; the DataModule only reads a complete folder."""
    import lightning as L

    from llm_lightning.errors import UserError

    assert TextDataModule.prepare_data is L.LightningDataModule.prepare_data
    with pytest.raises(UserError, match="prepare"):
        TextDataModule(tmp_path / "nothing_here")
