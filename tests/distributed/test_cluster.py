"""Clusters: SIGUSR1 requeue under a fake SLURM, the SLURM and torchrun scripts, every config parses."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import yaml

from llm_lightning.io.checkpoint import load_checkpoint
from tests.conftest import REPO, TINY_FIT, records
from tests.distributed.conftest import (
    BIN,
    CLUSTER,
    DIST_ENV,
    TIMEOUT,
    check,
    free_port,
)

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
    from llm_lightning.data.prepare.options import build_parser

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
