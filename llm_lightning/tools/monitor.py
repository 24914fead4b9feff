"""`llm-lightning monitor --checkpoint_dir DIR`: the state of a run, from its files alone.

Reads `DIR/metrics.jsonl` (written by the RunLog callback during `fit`) and the `*.ckpt` files
beside it, so it works on a live run, a finished one, or one copied from a cluster. A run on a
mixture of data folders also gets a val loss row and an epochs row per folder. A resumed
run appends to the same log: each "start" record opens a new segment, and records of an
earlier segment past the step the new one started from are dropped (they were redone).
"""

from __future__ import annotations

import datetime
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from llm_lightning.errors import ArgumentParser, UserError
from llm_lightning.io.metrics import METRICS_FILE, read_records

# How long a run may go without writing before monitor calls it "not updating" (crashed or killed?).
STALE_AFTER = 15 * 60
ENDINGS = {
    "finished": "finished (max_steps reached)",
    "max_time": "stopped: --trainer.max_time reached",
    "stopped": "stopped early (a callback asked to stop)",
    "interrupted": "stopped by a signal (SIGTERM/SIGINT), state saved",
    "nonfinite": "stopped: the loss became NaN/inf",
    "error": "stopped by an error",
}


@dataclass
class RunState:
    """What the log says about a run, oldest record first."""

    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)  # in-loop task accuracy (`fit --eval.tasks`)
    max_steps: int | None = None
    tokens_per_step: int | None = None
    segment_start: dict | None = None  # the last "start" record
    earlier_elapsed: float = 0.0  # training seconds of the segments before the last one
    last_time: float | None = None
    last_elapsed: float = 0.0
    end: dict | None = None  # the "end" record of the current segment, if the run ended

    @property
    def step(self) -> int:
        steps = [r["step"] for r in self.train + self.val]
        if self.segment_start:
            steps.append(self.segment_start.get("step", 0))
        return max(steps, default=0)

    @property
    def elapsed(self) -> float:
        return self.earlier_elapsed + self.last_elapsed

    @property
    def finished(self) -> bool:
        """The run ended, for whatever reason (a crash that wrote nothing cannot be told apart)."""
        return self.end is not None or (bool(self.max_steps) and self.step >= self.max_steps)

    def status(self, now: float) -> str:
        if self.end is not None:
            text = ENDINGS.get(self.end.get("reason"), f"ended ({self.end.get('reason')})")
            message = self.end.get("message")
            return f"{text} at step {self.end['step']}" + (
                f": {message}" if message and "error" in text else ""
            )
        if self.finished:
            return f"finished (max_steps reached) at step {self.step}"
        if self.last_time is not None and now - self.last_time > STALE_AFTER:
            return f"not updating for {_duration(now - self.last_time)} (crashed or killed?)"
        return "running"


def run_state(records: list[dict]) -> RunState:
    state = RunState()
    for record in records:
        event = record.get("event")
        if event == "start":
            state.earlier_elapsed += state.last_elapsed
            state.last_elapsed = 0.0
            state.segment_start = record
            state.end = None
            state.max_steps = record.get("max_steps") or state.max_steps
            state.tokens_per_step = record.get("tokens_per_step") or state.tokens_per_step
            # A resume from an earlier checkpoint redoes the steps after it.
            state.train = [r for r in state.train if r["step"] <= record["step"]]
            state.val = [r for r in state.val if r["step"] <= record["step"]]
            state.evals = [r for r in state.evals if r["step"] <= record["step"]]
        elif event == "train":
            state.train.append(record)
        elif event == "val":
            state.val.append(record)
        elif event == "eval":
            state.evals.append(record)
        elif event == "end":
            state.end = record
        if "elapsed" in record:
            state.last_elapsed = max(state.last_elapsed, float(record["elapsed"]))
        if "time" in record:
            state.last_time = float(record["time"])
    return state


def seconds_per_step(state: RunState) -> float | None:
    """Wall time per optimizer step over the current segment (validation and saving included)."""
    start = state.segment_start
    if start and state.train and "time" in start:
        last = state.train[-1]
        steps = last["step"] - start["step"]
        if steps > 0 and "time" in last:
            return (last["time"] - start["time"]) / steps
    if state.train and state.tokens_per_step and state.train[-1].get("train/tokens_per_s"):
        return state.tokens_per_step / state.train[-1]["train/tokens_per_s"]
    return None


def checkpoints(folder: Path) -> list[tuple[str, int, float]]:
    """(name, bytes, modification time) of the folder's checkpoints, oldest first."""
    found = []
    for path in folder.glob("*.ckpt"):
        try:
            info = path.stat()
        except OSError:  # removed while we looked (top-k rotation)
            continue
        found.append((path.name, info.st_size, info.st_mtime))
    return sorted(found, key=lambda item: (item[2], item[0]))


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    text = str(datetime.timedelta(seconds=rest))
    return f"{days}d {text}" if days else text


def _size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


def _number(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def per_source(record: dict, prefix: str, label: str, spec: str) -> list[tuple[str, str]]:
    """Rows for each source of a mixture: its val loss, or how many passes over it so far."""
    return [
        (label.format(key[len(prefix) :]), _number(value, spec))
        for key, value in record.items()
        if key.startswith(prefix)
    ]


def eval_rows(record: dict) -> list[tuple[str, str]]:
    """The latest in-loop task accuracy: acc and acc_norm per task, and the seconds it took."""
    tasks = sorted({key.split("/")[1] for key in record if key.startswith("eval/") and key.count("/") == 2})
    rows = [
        (f"{task} acc", f"{record[f'eval/{task}/acc']:.4f}  acc_norm {record[f'eval/{task}/acc_norm']:.4f}")
        for task in tasks
    ]
    if rows:
        rows.append(
            ("eval time", f"{record.get('eval/time_s', float('nan')):.1f} s  (step {record['step']})")
        )
    return rows


def render(folder: Path, state: RunState, now: float | None = None) -> str:
    """The table `monitor` prints."""
    now = time.time() if now is None else now
    last_train = state.train[-1] if state.train else {}
    last_val = state.val[-1] if state.val else {}
    step, max_steps = state.step, state.max_steps
    progress = f"{step} / {max_steps}" if max_steps else str(step)
    if max_steps:
        progress += f"  ({100 * step / max_steps:.1f}%)"
    per_step = seconds_per_step(state)
    eta = None
    if state.finished:
        eta_text = "-"
    else:
        eta = (max_steps - step) * per_step if max_steps and per_step else None
        eta_text = _duration(eta)
    if state.last_time is not None and not state.finished:
        eta_text += f"  (last update {_duration(now - state.last_time)} ago)"
    val_loss = last_val.get("val/loss")
    ppl = last_val.get("val/ppl") or (math.exp(min(val_loss, 50.0)) if val_loss is not None else None)
    rows = [
        ("run", str(folder)),
        ("status", state.status(now)),
        ("step", progress),
        ("train loss", _number(last_train.get("train/loss"), ".4f")),
        ("val loss", _number(val_loss, ".4f") + (f"  (step {last_val['step']})" if last_val else "")),
        *per_source(last_val, "val/loss/", "  val loss {}", ".4f"),
        ("perplexity", _number(ppl, ".2f")),
        *([("bits per byte", _number(last_val["val/bpb"], ".4f"))] if "val/bpb" in last_val else []),
        ("learning rate", _number(last_train.get("lr"), ".3e")),
        ("tokens/s", _number(last_train.get("train/tokens_per_s"), ",.0f")),
    ]
    rows += eval_rows(state.evals[-1] if state.evals else {})
    if last_train.get("train/mfu") is not None:
        rows.append(("MFU", f"{100 * last_train['train/mfu']:.1f}%"))
    rows += per_source(last_train, "train/epochs/", "epochs of {}", ".2f")
    rows += [("elapsed", _duration(state.elapsed)), ("ETA", eta_text)]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    lines.append("")
    found = checkpoints(folder)
    if not found:
        lines.append("checkpoints: none yet")
        return "\n".join(lines)
    name_width = max(len(name) for name, _, _ in found)
    lines.append(f"{'checkpoint':<{name_width}}  {'size':>9}  saved")
    for name, size, mtime in found:
        saved = datetime.datetime.fromtimestamp(mtime).strftime("%Y-%m-%d %H:%M:%S")
        lines.append(f"{name:<{name_width}}  {_size(size):>9}  {saved}")
    return "\n".join(lines)


def plot(state: RunState, output: Path) -> None:
    """Loss (train and val) and learning rate against optimizer step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    panels = 3 if state.evals else 2  # task accuracy gets a panel of its own when the fit has it
    fig, axes = plt.subplots(
        panels, 1, figsize=(8, 3 * panels), sharex=True, height_ratios=(2, 1, 1)[:panels]
    )
    loss_ax, lr_ax = axes[0], axes[1]
    train = [r for r in state.train if r.get("train/loss") is not None]
    loss_ax.plot([r["step"] for r in train], [r["train/loss"] for r in train], label="train loss", lw=1)
    loss_ax.plot([r["step"] for r in state.val], [r["val/loss"] for r in state.val], "o-", label="val loss")
    for key in sorted({k for r in state.val for k in r if k.startswith("val/loss/")}):  # a mixture's sources
        points = [(r["step"], r[key]) for r in state.val if key in r]
        loss_ax.plot(
            *zip(*points, strict=True), ".--", lw=1, label=f"val loss {key.removeprefix('val/loss/')}"
        )
    loss_ax.set_ylabel("loss (nats / token)")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend()
    lr = [r for r in state.train if r.get("lr") is not None]
    lr_ax.plot([r["step"] for r in lr], [r["lr"] for r in lr], color="tab:green")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("optimizer step")
    lr_ax.grid(alpha=0.3)
    if state.evals:
        plot_evals(axes[2], state.evals)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)


def plot_evals(ax, evals: list[dict]) -> None:
    """eval/<task>/acc (solid) and acc_norm (dashed) against optimizer step."""
    keys = sorted(
        {k for r in evals for k in r if k.startswith("eval/") and k.endswith(("/acc", "/acc_norm"))}
    )
    for key in keys:
        points = [(r["step"], r[key]) for r in evals if key in r]
        ax.plot(*zip(*points, strict=True), "o-" if key.endswith("/acc") else "o--", lw=1, label=key[5:])
    ax.set_ylabel("task accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def load_state(folder: Path) -> RunState:
    if not folder.is_dir():
        raise UserError(f"--checkpoint_dir {folder}: no such folder (give the fit's --checkpoint.dirpath)")
    path = folder / METRICS_FILE
    if not path.is_file():
        raise UserError(
            f"--checkpoint_dir {folder}: no {METRICS_FILE} yet (has `llm-lightning fit` started here?)"
        )
    return run_state(read_records(path))


def show(folder: Path, plot_path: Path | None, clear: bool = False) -> RunState:
    state = load_state(folder)
    if clear:
        sys.stdout.write("\033[H\033[J")  # home + clear screen: a refreshing display
    print(render(folder, state), flush=True)
    if plot_path is not None:
        plot(state, plot_path)
        print(f"\nplot written to {plot_path}", flush=True)
    return state


def follow(folder: Path, plot_path: Path | None, interval: float) -> None:
    """Refresh until the run ends; waits for the run to start if needed."""
    clear = sys.stdout.isatty()
    if not (folder / METRICS_FILE).is_file():
        print(f"waiting for {folder / METRICS_FILE} (Ctrl-C to stop) ...", flush=True)
    while not (folder / METRICS_FILE).is_file():
        time.sleep(interval)
    while True:
        state = show(folder, plot_path, clear)
        if state.status(time.time()) != "running":
            return
        time.sleep(interval)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="llm-lightning monitor",
        description="Show the latest state of a training run from its checkpoint folder.",
    )
    parser.add_argument("--checkpoint_dir", required=True, help="the fit's --checkpoint.dirpath")
    parser.add_argument("--follow", action="store_true", help="refresh until the run ends (Ctrl-C to stop)")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between refreshes (default 10)")
    parser.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="also draw loss, learning rate (and task accuracy) to this PNG",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.interval <= 0:
        raise UserError(f"--interval {args.interval}: must be positive")
    folder = Path(args.checkpoint_dir)
    if args.plot is not None and args.plot.suffix.lower() != ".png":
        raise UserError(f"--plot {args.plot}: give a .png file name")
    if not args.follow:
        show(folder, args.plot)
        return 0
    try:
        follow(folder, args.plot, args.interval)
    except KeyboardInterrupt:
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
