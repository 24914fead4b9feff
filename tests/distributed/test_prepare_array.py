"""configs/cluster/prepare_array.sbatch: it submits tokenizer -> shard array -> merge with dependencies,
and each stage's command line parses against the real `prepare` and `merge-shards` CLIs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from llm_lightning.data.prepare.options import check_options, options_from_argv
from llm_lightning.tools import merge_shards
from tests.conftest import REPO
from tests.distributed.conftest import CLUSTER, check
from tests.distributed.test_cluster import recorded_calls, write_recorder

SCRIPT = CLUSTER / "prepare_array.sbatch"
FAKE_SBATCH = """#!/bin/bash
# sbatch stand-in: write its arguments, NUL-separated, to call-N beside it; print a job id as --parsable does
shopt -s nullglob
calls=("$(dirname "$0")"/call-*)
for arg in "$0" "$@"; do printf '%s\\0' "$arg"; done > "$(dirname "$0")/call-${#calls[@]}"
echo "$((100 + ${#calls[@]}));cluster"
"""


def run_script(fake_bin: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=full_env, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    check(result)
    return result


def test_prepare_array_chains_its_jobs_and_its_commands_parse(tmp_path):
    data = tmp_path / "prepared"
    env = {"NUM_SHARDS": "3", "RAW_DIR": str(tmp_path / "raw"), "DATA_DIR": str(data)}
    submit_bin = tmp_path / "submit"
    submit_bin.mkdir()
    (submit_bin / "sbatch").write_text(FAKE_SBATCH)
    (submit_bin / "sbatch").chmod(0o755)
    submitted = run_script(submit_bin, env)
    tokenizer, shards, merge = (call[1:] for call in recorded_calls(submit_bin))
    assert tokenizer[-2:] == [str(SCRIPT), "tokenizer"] and "--parsable" in tokenizer
    assert shards[-2:] == [str(SCRIPT), "shard"]
    assert "--dependency=afterok:100" in shards and "--array=0-2" in shards
    assert merge[-2:] == [str(SCRIPT), "merge"] and "--dependency=afterok:101" in merge
    assert "tokenizer job 100, shards job 101 (array of 3), merge job 102" in submitted.stdout

    # Each job, as SLURM runs it: its `srun` command line, checked by the real parsers.
    options = {}
    for stage, extra in (
        ("tokenizer", {}),
        ("shard", {"SLURM_ARRAY_TASK_ID": "1", "SLURM_CPUS_PER_TASK": "6"}),
    ):
        run_bin = tmp_path / f"run-{stage}"
        write_recorder(run_bin, "srun")
        run_script(run_bin, {**env, **extra}, stage)
        ((_, program, command, *argv),) = recorded_calls(run_bin)
        assert (program, command) == ("llm-lightning", "prepare")
        input_dir, output_dir, options[stage] = options_from_argv(argv)
        check_options(options[stage])  # a UserError here would be the job's error
        assert input_dir == str(tmp_path / "raw")
    assert options["tokenizer"].tokenizer_only and options["shard"].tokenizer == str(data / "tokenizer")
    assert (options["shard"].num_shards, options["shard"].shard_index, options["shard"].num_workers) == (
        3,
        1,
        6,
    )
    for name in ("max_length", "stride", "val_fraction", "seed", "extensions", "text_field"):
        assert getattr(options["tokenizer"], name) == getattr(options["shard"], name), name  # the same sample
    run_bin = tmp_path / "run-merge"
    write_recorder(run_bin, "srun")
    run_script(run_bin, env, "merge")
    ((_, program, command, *argv),) = recorded_calls(run_bin)
    assert (program, command) == ("llm-lightning", "merge-shards")
    parsed = merge_shards.build_parser().parse_args(argv)
    assert (parsed.output_dir, parsed.num_shards) == (str(data), 3)
