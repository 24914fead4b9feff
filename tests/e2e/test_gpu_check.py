"""scripts/gpu_check.sh in its CPU mode: every measurement of the GPU check, at tiny sizes, so it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO

MEASUREMENTS = ["environment", "gemm", "recipe_eager", "recipe_compiled_cudnn", "recipe_compiled",
                "baseline_nanochat", *(f"memory_{name}" for name in ("tiny", "small", "medium", "large", "xl")),
                "fit_resume", "summary"]  # fmt: skip


def test_gpu_check_writes_a_line_per_measurement_on_a_cpu(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip
    lines = [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:], lines)
    by_name = {line["name"]: line for line in lines}
    assert sorted(by_name) == sorted(MEASUREMENTS) and len(lines) == len(MEASUREMENTS)
    assert all(line["ok"] for line in lines) and lines[-1]["name"] == "summary"
    for name in ("recipe_eager", "recipe_compiled_cudnn", "recipe_compiled", "baseline_nanochat"):
        assert by_name[name]["tokens_per_s"] > 0 and by_name[name]["mfu_measured_ceiling"] > 0, by_name[name]
    # The cuDNN-first order went through the compiled block (a CPU then runs its own kernel).
    assert by_name["recipe_compiled_cudnn"]["compile"] and by_name["recipe_compiled_cudnn"]["attention_ops"]
    assert by_name["recipe_eager"]["optimizer"] == "muon"  # the config's recipe, read at run time
    assert by_name["memory_xl"]["formula_mib"] > 0 and by_name["memory_xl"]["peak_memory_mib"] > 0
    val = by_name["fit_resume"]["val_loss"]
    assert len(val) == 2 and val[max(val)] < val[min(val)]
