"""`monitor` shows the latest in-loop task accuracy, and `--plot` draws it, from metrics.jsonl."""

from __future__ import annotations

import json
import re

from llm_lightning.tools import monitor


def test_monitor_shows_and_plots_task_accuracy(tmp_path):
    rows = [
        {"event": "start", "step": 0, "max_steps": 20, "tokens_per_step": 256, "time": 1.0},
        {"event": "train", "step": 10, "train/loss": 3.0, "lr": 1e-3, "time": 2.0},
        {"event": "eval", "step": 10, "eval/quiz/acc": 0.25, "eval/quiz/acc_norm": 0.5, "eval/time_s": 1.5},
        {"event": "eval", "step": 20, "eval/quiz/acc": 0.75, "eval/quiz/acc_norm": 0.625, "eval/time_s": 2.5},
        {"event": "end", "step": 20, "reason": "finished"},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot = tmp_path / "run.png"
    assert monitor.main(["--checkpoint_dir", str(tmp_path), "--plot", str(plot)]) == 0
    table = monitor.render(tmp_path, monitor.load_state(tmp_path))
    assert re.search(r"^quiz acc +0\.7500  acc_norm 0\.6250$", table, re.M), table
    assert "2.5 s  (step 20)" in table
    assert plot.read_bytes().startswith(b"\x89PNG")
