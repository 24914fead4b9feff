"""`llm-lightning bench`, and the exactness of the optimizations it measures. No timing assertions."""

from __future__ import annotations

import json

import pytest
import torch

from llm_lightning.errors import UserError
from llm_lightning.tools import bench
from tests.conftest import run_cli

TINY = ["--hidden_size", "32", "--num_layers", "1", "--num_heads", "4", "--vocab_size", "64"]
TINY += ["--seq_len", "16", "--micro_batch_size", "2", "--steps", "2", "--warmup", "1", "--device", "cpu"]


@pytest.mark.parametrize("mode", ["loop", "fit"])
def test_bench_writes_valid_json(mode, tmp_path):
    path = tmp_path / "out" / "bench.json"
    assert bench.main([*TINY, "--mode", mode, "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["mode"] == mode
    assert len(result["step_times_s"]) == 2
    assert result["tokens_per_step"] == 2 * 16
    assert result["tokens_per_s"] > 0 and result["achieved_tflops"] > 0
    assert result["mfu"] > 0 and result["peak_memory_bytes"] > 0
    step = result["step_time_s"]
    assert step["min"] <= step["median"] <= step["max"]
    if mode == "fit":
        assert 0 <= result["data_wait_share"] < 1
    else:
        assert result["data_wait_share"] is None


def test_bench_profile_names_where_the_step_time_goes(capsys):
    assert bench.main([*TINY, "--profile", "5"]) == 0
    table = capsys.readouterr().out
    assert "op (self time)" in table and "aten::" in table
    result = bench.run(bench.parse_args([*TINY, "--profile", "50"]))
    ops = {op["op"]: op for op in result["profile"]}
    assert "aten::mm" in ops  # the matrix products are there, with a share of the step
    assert all(0 < op["share"] <= 1 and op["calls"] > 0 for op in ops.values())
    assert sum(op["share"] for op in ops.values()) <= 1 + 1e-6


@pytest.mark.parametrize(
    "args, message",
    [
        (["--profile", "5", "--mode", "fit"], "--profile"),
        (["--precision", "fp8"], "--precision fp8"),
        (["--mode", "train"], "--mode train"),
        (["--steps", "0"], "--steps 0"),
        (["--device", "tpu"], "--device tpu"),
        (["--num_heads", "3"], "num_heads"),
    ],
)
def test_bad_bench_flags_raise_user_errors(args, message):
    with pytest.raises(UserError, match=message):
        bench.main([*TINY, *args])


@pytest.mark.slow  # tests/e2e/bad_inputs.yaml holds the default suite's device rows
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_one_line_and_exit_2():
    result = run_cli("bench", *TINY, "--device", "cuda")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--device cuda" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
