"""scripts/gpu_check.sh in its CPU mode: the GPU check's every step, at tiny sizes, so it cannot rot."""

from __future__ import annotations

import json
import subprocess

from tests.conftest import REPO


def test_gpu_check_runs_every_step_on_a_cpu(tmp_path):
    report_path = tmp_path / "report.json"
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu", str(report_path)],
        capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "PYTHON": __import__("sys").executable},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["ok"] and report["mode"] == "cpu"
    for name in ("setup", "bench", "bench_compile", "flash_attention", "fit_ddp", "fit_fsdp"):
        assert report[name]["ok"], (name, report[name])
    assert report["bench"]["tokens_per_s"] > 0 and report["bench_compile"]["tokens_per_s"] > 0
    assert any("flash" in kernel for kernel in report["flash_attention"]["attention_kernels"])
    assert report["fit_fsdp"]["last_is_folder"] and not report["fit_ddp"]["last_is_folder"]
