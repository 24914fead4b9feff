"""Evaluation under a sharded strategy (FSDP2 on 2 CPU processes): the in-loop counts equal one
process's, and `eval` of the sharded checkpoint folder equals `eval` of its consolidated file."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, TINY_FIT, records, run_cli
from tests.distributed.conftest import DIST_ENV, TIMEOUT, check
from tests.evaluation.test_inloop import counted_here, eval_flags

FSDP = ("--config", REPO / "configs" / "strategy" / "fsdp.yaml", "--trainer.devices", 2)


@pytest.mark.slow  # a 2-process FSDP2 fit and two evals: ~2 minutes on 2 loaded cores
def test_sharded_checkpoint_and_in_loop_eval(prepared_dir, tmp_path):
    ckpts = tmp_path / "ckpts"
    flags = [
        *TINY_FIT, *FSDP, "--data.data_dir", prepared_dir, "--data.batch_size", 8, "--data.micro_batch_size", 4,
        "--trainer.max_steps", 10, "--trainer.accelerator", "cpu", "--checkpoint.dirpath", ckpts,
        "--checkpoint.every_n_train_steps", 10, "--eval_interval", 10, *eval_flags(10, 9),
    ]  # fmt: skip
    check(run_cli("fit", *flags, cwd=tmp_path, timeout=TIMEOUT, env=DIST_ENV))
    folder = ckpts / "last.ckpt"
    assert folder.is_dir()
    consolidated = tmp_path / "last_one.ckpt"
    check(run_cli("consolidate", "--ckpt_path", folder, "--output", consolidated))

    (record,) = records(ckpts, "eval")
    acc, acc_norm = counted_here(consolidated, 9)
    assert record["eval/readme_qa/acc"] == pytest.approx(acc, abs=1e-12)
    assert record["eval/readme_qa/acc_norm"] == pytest.approx(acc_norm, abs=1e-12)

    reports = {}
    for name, path in (("folder", folder), ("file", consolidated)):
        output = tmp_path / f"{name}.json"
        check(run_cli("eval", "--ckpt_path", path, "--tasks", "readme_qa", "--limit", 12, "--output", output))
        reports[name] = json.loads(output.read_text())
    assert reports["folder"]["results"] == reports["file"]["results"]
    assert reports["folder"]["samples"] == reports["file"]["samples"]
