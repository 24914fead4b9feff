"""monitor: the run table, plots, resumed logs, partial lines."""

from __future__ import annotations

import json

import pytest

from llm_lightning.errors import UserError
from llm_lightning.tools import monitor
from tests.conftest import run_cli


def test_monitor_cli_prints_the_last_step_and_plots(run_dir, tmp_path):
    plot = tmp_path / "plots" / "loss.png"
    result = run_cli("monitor", "--checkpoint_dir", run_dir, "--plot", plot)
    assert result.returncode == 0, result.stderr
    assert "20 / 20" in result.stdout
    for label in ("train loss", "val loss", "perplexity", "learning rate", "tokens/s", "elapsed", "ETA"):
        assert label in result.stdout
    assert "last.ckpt" in result.stdout and "checkpoint_step_10.ckpt" in result.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.stat().st_size > 10_000


def test_monitor_follows_resumes_and_skips_partial_lines(tmp_path):
    records = [
        {"event": "start", "step": 0, "max_steps": 100, "tokens_per_step": 1000, "time": 0, "elapsed": 0},
        {"event": "train", "step": 10, "train/loss": 5.0, "lr": 1e-3, "time": 10, "elapsed": 10},
        {"event": "train", "step": 20, "train/loss": 4.0, "lr": 1e-3, "time": 20, "elapsed": 20},
        {"event": "val", "step": 20, "val/loss": 4.5, "time": 21, "elapsed": 21},
        {"event": "train", "step": 30, "train/loss": 9.0, "lr": 1e-3, "time": 30, "elapsed": 30},
        # resumed from the step-20 checkpoint: step 30 above is redone
        {"event": "start", "step": 20, "max_steps": 100, "tokens_per_step": 1000, "time": 100, "elapsed": 0},
        {"event": "train", "step": 40, "train/loss": 3.0, "lr": 5e-4, "time": 140, "elapsed": 40},
    ]
    text = "".join(json.dumps(r) + "\n" for r in records) + '{"event": "train", "st'
    (tmp_path / "metrics.jsonl").write_text(text)
    state = monitor.load_state(tmp_path)
    assert [r["step"] for r in state.train] == [10, 20, 40]
    assert state.step == 40 and not state.finished
    assert state.elapsed == 30 + 40
    assert monitor.seconds_per_step(state) == 2.0
    table = monitor.render(tmp_path, state, now=150)
    assert "40 / 100" in table and "0:02:00" in table  # ETA: 60 steps x 2 s
    assert "checkpoints: none yet" in table


def test_monitor_missing_folder_or_log_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        monitor.main(["--checkpoint_dir", str(tmp_path / "nope")])
    with pytest.raises(UserError, match="metrics.jsonl"):
        monitor.main(["--checkpoint_dir", str(tmp_path)])


def row(table: str, name: str) -> str:
    """The value of one row of monitor's table."""
    return next(line[len(name) :].strip() for line in table.splitlines() if line.startswith(name + " "))


def write_log(folder, *records) -> None:
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


START = {"event": "start", "step": 0, "max_steps": 100, "tokens_per_step": 1000, "time": 0, "elapsed": 0}
TRAIN = {"event": "train", "step": 40, "train/loss": 3.0, "lr": 1e-3, "time": 40, "elapsed": 40}


@pytest.mark.parametrize(
    "end, expected",
    [
        ({"reason": "max_time"}, "stopped: --trainer.max_time reached at step 40"),
        ({"reason": "interrupted"}, "stopped by a signal (SIGTERM/SIGINT), state saved at step 40"),
        ({"reason": "nonfinite"}, "stopped: the loss became NaN/inf at step 40"),
        (
            {"reason": "error", "message": "RuntimeError: out of memory"},
            "stopped by an error at step 40: RuntimeError",
        ),
    ],
)
def test_monitor_says_how_a_run_ended_and_shows_no_eta(tmp_path, end, expected):
    write_log(tmp_path, START, TRAIN, {"event": "end", "step": 40, "time": 41, **end})
    table = monitor.render(tmp_path, monitor.load_state(tmp_path), now=1000)
    assert row(table, "status").startswith(expected)
    assert row(table, "ETA") == "-"
    monitor.follow(tmp_path, None, interval=0.01)  # returns at once: the run has ended


def test_monitor_tells_a_running_run_from_a_silent_one(tmp_path):
    write_log(tmp_path, START, TRAIN)
    assert "status         running" in monitor.render(tmp_path, monitor.load_state(tmp_path), now=50).replace(
        "  ", " "
    ) or ("running" in monitor.render(tmp_path, monitor.load_state(tmp_path), now=50))
    silent = monitor.render(tmp_path, monitor.load_state(tmp_path), now=40 + 3600)
    assert "not updating for 1:00:00 (crashed or killed?)" in silent
    write_log(
        tmp_path,
        START,
        TRAIN,
        {"event": "end", "step": 40, "time": 41, "reason": "finished"},
        {**START, "step": 40, "time": 50},
    )  # fmt: skip  - resumed: running again
    assert row(monitor.render(tmp_path, monitor.load_state(tmp_path), now=60), "status") == "running"
