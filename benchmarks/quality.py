"""Time to loss and the quality bar: our `llm-lightning fit` against peers' plain PyTorch loops.

Ours and each peer (litgpt's GPT; optionally Hugging Face's LlamaForCausalLM) train the tiny
preset's dimensions on the same prepared corpus (byte-level BPE, vocab 8192, windows of 256
tokens), on the same batches in the same order (our window dataset and shuffling sampler,
seed 1337), with the same AdamW settings, warmup + cosine schedule, batch and gradient
clipping, each with its own library's initialisation, and are scored on the same validation
tokens (every token of the val split once) at the same steps. Each side's clock counts
training only (batches and the wait for them), not validation or checkpoint writes.

Reported: the val-loss curves side by side; against each peer, the training seconds each
side needs to reach the loss both reach (the higher of the two final losses), interpolated
between eval points, and whether our final loss is at least as low (the quality bar).

    python -m benchmarks.quality --peer_python .venv-bench/bin/python --corpus tinyshakespeare.txt
The peer side runs as `python -m benchmarks.quality peer ...` in the benchmark environment.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEED = 1337  # the CLI's seed_everything default and TextDataModule's shuffling seed


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """The corpus, output folder and training run every quality comparison shares (bench_init.py too)."""
    parser.add_argument("--corpus", required=True, help="a text file, e.g. tinyshakespeare.txt")
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--eval_interval", type=int, default=40)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--warmup_steps", type=int, default=24)
    parser.add_argument("--batch_size", type=int, default=8)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer_python", required=True)
    add_run_args(parser)
    parser.add_argument("--precision", default=None, help="default: what `llm-lightning fit` picks here")
    parser.add_argument("--peers", default="litgpt,hf", help="comma-separated: litgpt, hf")
    parser.add_argument("--ours_args", default="", help="extra `llm-lightning fit` flags, for experiments")
    parser.add_argument(
        "--init_seed", type=int, default=SEED, help="seed of the initial weights (the data order stays)"
    )
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- orchestration (.venv)
def run(cmd: list[str], **kwargs) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")


def prepare(corpus: Path, out: Path) -> Path:
    """bpe 8192, windows of 256 tokens, 10% held out; reused while the corpus is unchanged."""
    data, stamp = out / "data", f"{corpus.resolve()} {corpus.stat().st_size} {corpus.stat().st_mtime}"
    stamp_file = out / "corpus.stamp"
    if (data / "metadata.json").is_file() and stamp_file.is_file() and stamp_file.read_text() == stamp:
        return data
    raw = out / "raw"
    shutil.rmtree(raw, ignore_errors=True)
    raw.mkdir(parents=True)
    shutil.copy(corpus, raw / corpus.name)
    print(f"preparing {corpus} (bpe 8192, max_length 256) ...", flush=True)
    run(
        [sys.executable, "-m", "llm_lightning", "prepare", "--input_dir", str(raw), "--output_dir", str(data)]
        + ["--tokenizer_type", "bpe", "--vocab_size", "8192", "--max_length", "256", "--stride", "256"]
        + ["--val_fraction", "0.1", "--num_workers", "1", "--overwrite"]
    )
    (out / "corpus.stamp").write_text(stamp)
    return data


def train_ours(args: argparse.Namespace, data: Path, out: Path, precision: str) -> list[dict]:
    """`llm-lightning fit` of the tiny preset, with a TrainClock callback writing the curve."""
    curve = out / "ours_curve.jsonl"
    curve.unlink(missing_ok=True)
    shutil.rmtree(out / "ours", ignore_errors=True)
    run(
        [sys.executable, "-m", "llm_lightning", "fit"]
        + [
            "--trainer.callbacks+=llm_lightning.tools.train_clock.TrainClock",
            "--trainer.callbacks.path",
            str(curve),
        ]
        + ["--model.preset", "tiny", "--data.data_dir", str(data)]
        + ["--data.batch_size", str(args.batch_size), "--data.micro_batch_size", str(args.batch_size)]
        + ["--trainer.max_steps", str(args.steps), "--eval_interval", str(args.eval_interval)]
        + ["--model.learning_rate", str(args.learning_rate), "--model.warmup_steps", str(args.warmup_steps)]
        + ["--trainer.precision", precision, "--trainer.enable_progress_bar", "false"]
        + ["--checkpoint.dirpath", str(out / "ours" / "checkpoints")]
        + ["--checkpoint.every_n_train_steps", str(10 * args.steps)]
        + ["--trainer.default_root_dir", str(out / "ours"), "--seed_everything", str(args.init_seed)]
        + shlex.split(args.ours_args),
        cwd=out,
    )
    return [json.loads(line) for line in curve.read_text().splitlines()]


def train_peer(args: argparse.Namespace, impl: str, data: Path, out: Path, precision: str) -> list[dict]:
    curve = out / f"{impl}_curve.json"
    run(
        [
            args.peer_python,
            "-m",
            "benchmarks.quality",
            "peer",
            "--impl",
            impl,
            "--data",
            str(data),
            "--json",
            str(curve),
        ]
        + ["--steps", str(args.steps), "--eval_interval", str(args.eval_interval)]
        + ["--learning_rate", str(args.learning_rate), "--warmup_steps", str(args.warmup_steps)]
        + ["--batch_size", str(args.batch_size), "--precision", precision, "--init_seed", str(args.init_seed)]
    )
    return json.loads(curve.read_text())


def steps_to(curve: list[dict], target: float) -> float | None:
    """Steps after which the val loss first reaches `target`, linear between eval points."""
    previous = None
    for point in curve:
        if point["val_loss"] <= target:
            if previous is None:
                return point["step"]
            share = (previous["val_loss"] - target) / (previous["val_loss"] - point["val_loss"])
            return previous["step"] + share * (point["step"] - previous["step"])
        previous = point
    return None


def seconds_to(curve: list[dict], target: float) -> tuple[float, float]:
    """(steps to target x the run's median step time, the wall seconds of training until then).

    The first is the figure to compare on a shared machine: one busy minute does not move a
    median. The second is the raw clock, interpolated between eval points like the steps.
    """
    steps = steps_to(curve, target)
    median = curve[-1]["median_step_s"]
    clock = [(0, 0.0)] + [(p["step"], p["train_seconds"]) for p in curve]
    for (s0, t0), (s1, t1) in zip(clock, clock[1:], strict=False):
        if s0 <= steps <= s1:
            return steps * median, t0 + (steps - s0) / (s1 - s0) * (t1 - t0)
    return steps * median, clock[-1][1]


NAMES = {"ours": "ours (llm-lightning fit)", "litgpt": "litgpt GPT loop", "hf": "HF Llama loop"}


def report(curves: dict[str, list[dict]], precision: str, machine: str) -> tuple[str, dict]:
    """Both curves side by side, then time to loss and the quality bar against each peer."""
    names = list(curves)
    header = " | ".join(f"{NAMES[n]}: val loss | train s" for n in names)
    lines = [f"Machine: {machine}; precision {precision}", "", f"| step | {header} |"]
    lines.append("|---:|" + "---:|---:|" * len(names))
    for points in zip(*curves.values(), strict=True):
        cells = " | ".join(f"{p['val_loss']:.4f} | {p['train_seconds']:.1f}" for p in points)
        lines.append(f"| {points[0]['step']} | {cells} |")
    summary = {"precision": precision, "curves": curves, "peers": {}}
    ours = curves["ours"]
    for peer in names[1:]:
        theirs = curves[peer]
        target = max(ours[-1]["val_loss"], theirs[-1]["val_loss"])
        (ours_s, ours_wall), (peer_s, peer_wall) = seconds_to(ours, target), seconds_to(theirs, target)
        met = ours[-1]["val_loss"] <= theirs[-1]["val_loss"]
        lines += [
            "",
            f"vs {NAMES[peer]}: time to val loss {target:.4f} (the higher final loss), as steps x median "
            f"step time: ours {ours_s:.1f} s ({steps_to(ours, target):.0f} steps x {ours[-1]['median_step_s']:.3f} s), "
            f"{peer} {peer_s:.1f} s ({steps_to(theirs, target):.0f} x {theirs[-1]['median_step_s']:.3f} s): "
            f"{peer_s / ours_s:.2f}x ours; raw training clock: ours {ours_wall:.1f} s, {peer} {peer_wall:.1f} s.",
            f"Quality bar (ours final <= {peer} final): {ours[-1]['val_loss']:.4f} vs "
            f"{theirs[-1]['val_loss']:.4f}: {'met' if met else 'NOT met'}.",
        ]
        summary["peers"][peer] = {
            "target_loss": target,
            "ours_seconds_to_target": ours_s,
            "peer_seconds_to_target": peer_s,
            "ours_clock_to_target": ours_wall,
            "peer_clock_to_target": peer_wall,
            "quality_bar_met": met,
        }
    return "\n".join(lines), summary


def orchestrate(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from benchmarks.compare import machine_description, wait_for_quiet
    from llm_lightning.training.cli import default_precision

    out = Path(args.out).resolve() / "quality"
    out.mkdir(parents=True, exist_ok=True)
    precision = args.precision or default_precision()
    data = prepare(Path(args.corpus), out)
    started = time.time()
    print(f"training ours (llm-lightning fit), {args.steps} steps, {precision} ...", flush=True)
    wait_for_quiet(0.2, 120)
    curves = {"ours": train_ours(args, data, out, precision)}
    for peer in args.peers.split(","):
        print(f"  {time.time() - started:.0f}s; training {NAMES[peer]} ...", flush=True)
        wait_for_quiet(0.2, 120)
        curves[peer] = train_peer(args, peer, data, out, precision)
    table, summary = report(curves, precision, machine_description())
    if args.init_seed != SEED:
        table = f"Initial weights from seed {args.init_seed} (data order: seed {SEED})\n\n" + table
    (out.parent / "quality.json").write_text(json.dumps(summary, indent=2))
    (out.parent / "quality.md").write_text(table + "\n")
    print()
    print(table)
    return 0


# ----------------------------------------------------------------------------- the plain loop (peers, benchmarks/init.py)
def train_curve(model, loss_fn, logits_fn, data: Path, args) -> list[dict]:
    """Train `model` in a plain PyTorch loop on our batches; val loss every `eval_interval` steps.

    loss_fn(model, inputs, targets) -> mean loss; logits_fn(model, inputs) -> logits.
    The batches, their order, the optimizer and the schedule are those of our `fit`.
    """
    import torch

    from benchmarks.peers import peer_optimizer, train_step
    from llm_lightning.data.format import read_metadata, split_path
    from llm_lightning.data.sampler import StreamSampler, WindowOrder
    from llm_lightning.data.windows import ScoredWindows, TokenWindows
    from llm_lightning.tools.timing import autocast
    from llm_lightning.training.optim import warmup_cosine

    meta = read_metadata(data)
    train = TokenWindows(split_path(data, "train"), meta["dtype"], meta["max_length"], meta["stride"])
    val = ScoredWindows(split_path(data, "val"), meta["dtype"], meta["max_length"], meta["stride"])
    sampler = StreamSampler(WindowOrder(len(train), SEED), start=0, micro_batch_size=args.batch_size)
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, sampler=sampler)
    device = torch.device("cpu")
    optimizer = peer_optimizer(model, args.learning_rate, device)
    schedule = partial(warmup_cosine, warmup_steps=args.warmup_steps, max_steps=args.steps, min_ratio=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    def evaluate() -> float:
        model.eval()
        total = count = 0.0
        with torch.no_grad(), autocast(device, args.precision):
            for inputs, targets, scored in torch.utils.data.DataLoader(val, batch_size=args.batch_size):
                logits = logits_fn(model, inputs).float()
                losses = torch.nn.functional.cross_entropy(
                    logits.flatten(0, 1), targets.flatten(), reduction="none"
                )
                total += float((losses * scored.flatten()).sum())
                count += float(scored.sum())
        model.train()
        return total / count

    curve, step, train_seconds, step_times = [], 0, 0.0, []
    batches = iter(loader)  # the stream of windows our fit reads, in the same order
    while step < args.steps:
        start = time.perf_counter()
        train_step(model, optimizer, scheduler, loss_fn, *next(batches), device, args.precision)
        step += 1
        step_times.append(time.perf_counter() - start)
        train_seconds += step_times[-1]
        if step % args.eval_interval == 0:
            median = statistics.median(step_times)
            point = {"step": step, "train_seconds": train_seconds, "median_step_s": median}
            curve.append({**point, "val_loss": evaluate()})
    return curve


def peer_main(argv: list[str]) -> int:
    """The peer side, run in the benchmark environment (.venv-bench)."""
    import torch

    from benchmarks.peers import build_peer, loss_function
    from llm_lightning.model import ModelConfig

    parser = argparse.ArgumentParser()
    parser.add_argument("--impl", choices=["litgpt", "hf"], required=True)
    for name, kind in [("data", str), ("json", str), ("steps", int), ("eval_interval", int)]:
        parser.add_argument(f"--{name}", type=kind, required=True)
    for name, kind in [("learning_rate", float), ("warmup_steps", int), ("batch_size", int)]:
        parser.add_argument(f"--{name}", type=kind, required=True)
    parser.add_argument("--precision", required=True)
    parser.add_argument("--init_seed", type=int, default=SEED)
    args = parser.parse_args(argv)

    data = Path(args.data)
    meta = json.loads((data / "metadata.json").read_text())
    torch.manual_seed(args.init_seed)
    config = ModelConfig.from_preset("tiny", vocab_size=meta["vocab_size"], max_seq_len=meta["max_length"])
    model = build_peer(args.impl, config, torch.device("cpu"))  # each library's own initialisation
    litgpt = args.impl == "litgpt"
    curve = train_curve(
        model,
        loss_function(args.impl),
        lambda model, inputs: model(inputs) if litgpt else model(input_ids=inputs).logits,
        data,
        args,
    )
    Path(args.json).write_text(json.dumps(curve))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "peer":
        sys.exit(peer_main(sys.argv[2:]))
    sys.exit(orchestrate())
