"""Time to loss: our `llm-lightning fit` with its default recipe against litgpt's plain loop.

On each corpus (tinyshakespeare, and the demo's corpus of Python documentation: real text we
did not tune on), prepared as the quality bar does (byte-level BPE 8192, windows of 256 tokens,
10% held out), for each seed:
- litgpt's GPT in a plain PyTorch loop (benchmarks/quality.py) at lr 1e-3 and 2e-3, 300 steps:
  the target is the better of its two final val losses, its time the wall time of that run;
- ours, `llm-lightning fit --config configs/tiny.yaml` (the new default recipe), 300 steps;
- ours with the previous recipe (AdamW 1e-3, cosine, no QK-norm or z-loss): `--ours_old`;
- with `--ablate`, the new recipe with one ingredient switched off at a time.
Every run sees the same batches (8 x 256 tokens) in the same order, and every side's clock
counts training only (batches and the wait for them, not validation). Reported: val loss at
each eval point, and the steps and training seconds each of ours needs to reach litgpt's best
final loss (linear between eval points), as a ratio of litgpt's wall time.

    bash scripts/bench.sh recipe                      # both corpora, 3 seeds, the ablation
    python -m benchmarks.recipe --peer_python .venv-bench/bin/python --corpus tinyshakespeare.txt --seeds 0
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchmarks.compare import machine_description, wait_for_quiet
from benchmarks.quality import prepare, run, seconds_to, steps_to, train_peer

REPO = Path(__file__).resolve().parents[1]
# The previous recipe: AdamW 1e-3 everywhere, cosine to 0.1 x, no QK-norm or z-loss.
OLD = ["--model.optimizer", "adamw", "--model.learning_rate", "1e-3", "--model.lr_schedule", "cosine",
       "--model.min_lr_ratio", "0.1", "--model.qk_norm", "false", "--model.z_loss", "0"]  # fmt: skip
# Each ingredient of the recipe switched alone (flags after the config win). Without Muon the
# hidden matrices need AdamW's own lr: 1e-3, the best single AdamW lr found (2e-3 is worse).
ABLATIONS = {
    "no Muon (AdamW 1e-3 for every weight)": ["--model.optimizer", "adamw", "--model.learning_rate", "1e-3"],
    "cosine instead of WSD": ["--model.lr_schedule", "cosine"],
    "no z-loss": ["--model.z_loss", "0"],
    "no QK-norm": ["--model.qk_norm", "false"],
    "compile on": ["--model.compile", "true"],
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer_python", required=True)
    parser.add_argument(
        "--corpus", action="append", default=[], help="a text file (repeat); default: see --demo"
    )
    parser.add_argument("--demo", action="store_true", help="also the demo's corpus (Python documentation)")
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval_interval", type=int, default=20)
    parser.add_argument("--ours_old", action="store_true", help="also the previous recipe")
    parser.add_argument("--ablate", action="store_true", help="also the ablation (first seed only)")
    parser.add_argument("--precision", default=None, help="default: what `llm-lightning fit` picks here")
    parser.add_argument("--ours_args", default="", help="extra flags for our runs (experiments)")
    return parser.parse_args(argv)


def corpora(args: argparse.Namespace, out: Path) -> dict[str, Path]:
    found = {Path(path).stem: Path(path) for path in args.corpus}
    if args.demo:
        from llm_lightning.tools.demo import build_corpus

        raw = out / "demo_raw"
        if not raw.exists():
            build_corpus(raw, 3.0)
        joined = out / "python_docs.txt"  # one file, as the quality bar's prepare takes
        if not joined.exists():
            joined.write_text(
                "\n\n".join(p.read_text(errors="replace") for p in sorted(raw.rglob("*")) if p.is_file())
            )
        found["python_docs"] = joined
    return found


def train_ours(
    args, data: Path, out: Path, name: str, seed: int, flags: list[str], precision: str
) -> list[dict]:
    """`llm-lightning fit --config configs/tiny.yaml` on our side, with a TrainClock writing the curve."""
    curve = out / f"{name}.jsonl"
    curve.unlink(missing_ok=True)
    run(
        [sys.executable, "-m", "llm_lightning", "fit", "--config", str(REPO / "configs" / "tiny.yaml")]
        + [
            "--trainer.callbacks+=llm_lightning.tools.train_clock.TrainClock",
            "--trainer.callbacks.path",
            str(curve),
        ]
        + ["--data.data_dir", str(data), "--data.batch_size", "8", "--data.micro_batch_size", "8"]
        + ["--model.warmup_steps", str(args.steps // 10)]  # litgpt's warmup (the config's is for 10k steps)
        + [
            "--data.num_workers",
            "1",
            "--trainer.max_steps",
            str(args.steps),
            "--eval_interval",
            str(args.eval_interval),
        ]
        + [
            "--trainer.precision",
            precision,
            "--trainer.enable_progress_bar",
            "false",
            "--seed_everything",
            str(seed),
        ]
        + [
            "--checkpoint.dirpath",
            str(out / name / "checkpoints"),
            "--checkpoint.every_n_train_steps",
            "100000",
        ]
        + ["--trainer.default_root_dir", str(out / name)]
        + flags
        + args.ours_args.split(),
        cwd=out,
    )
    return [json.loads(line) for line in curve.read_text().splitlines()]


def peer(args, data: Path, out: Path, lr: float, seed: int, precision: str) -> list[dict]:
    options = argparse.Namespace(
        peer_python=args.peer_python, steps=args.steps, eval_interval=args.eval_interval, learning_rate=lr,
        warmup_steps=args.steps // 10, batch_size=8, init_seed=seed,
    )  # fmt: skip
    folder = out / f"litgpt_{lr:g}_{seed}"
    folder.mkdir(exist_ok=True)
    return train_peer(options, "litgpt", data, folder, precision)


def summary(curves: dict[str, list[dict]]) -> dict:
    """Against litgpt's better lr: its final loss is the target, its wall time the yardstick."""
    litgpt = min(
        (name for name in curves if name.startswith("litgpt")), key=lambda n: curves[n][-1]["val_loss"]
    )
    target, wall = curves[litgpt][-1]["val_loss"], curves[litgpt][-1]["train_seconds"]
    rows = {"litgpt_best": litgpt, "target_loss": target, "litgpt_seconds": wall}
    for name, curve in curves.items():
        if name.startswith("litgpt"):
            continue
        steps = steps_to(curve, target)
        seconds = seconds_to(curve, target)[1] if steps is not None else None
        rows[name] = {
            "final_loss": curve[-1]["val_loss"],
            "steps_to_target": steps,
            "seconds_to_target": seconds,
            "ratio_to_litgpt": seconds / wall if seconds is not None else None,
            "median_step_s": curve[-1]["median_step_s"],
        }
    return rows


def one_corpus(args, name: str, corpus: Path, out: Path, precision: str) -> dict:
    out = out / name
    out.mkdir(parents=True, exist_ok=True)
    data = prepare(corpus, out)
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {}
    for index, seed in enumerate(seeds):
        curves = {}
        for lr in (1e-3, 2e-3):
            wait_for_quiet(0.2, 120)
            print(f"[recipe] {name} seed {seed}: litgpt lr {lr:g}", flush=True)
            curves[f"litgpt lr {lr:g}"] = peer(args, data, out, lr, seed, precision)
        runs = {"ours": []}
        if args.ours_old:
            runs["ours, previous recipe"] = OLD
        if args.ablate and index == 0:
            runs.update({f"ours, {label}": flags for label, flags in ABLATIONS.items()})
        for label, flags in runs.items():
            wait_for_quiet(0.2, 120)
            print(f"[recipe] {name} seed {seed}: {label}", flush=True)
            key = label.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
            curves[label] = train_ours(args, data, out, f"{key}_{seed}", seed, flags, precision)
        results[seed] = {"curves": curves, "summary": summary(curves)}
        (out / "recipe.json").write_text(json.dumps(results, indent=2))
    return results


def markdown(all_results: dict, machine: str, precision: str) -> str:
    lines = [f"Machine: {machine}; precision {precision}; batch 8 x 256 tokens, tiny preset sizes", ""]
    for corpus, results in all_results.items():
        lines.append(f"### {corpus}")
        first = next(iter(results.values()))["curves"]
        names = list(first)
        lines += ["", "| step | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
        for i, point in enumerate(first[names[0]]):
            lines.append(
                f"| {point['step']} | " + " | ".join(f"{first[n][i]['val_loss']:.4f}" for n in names) + " |"
            )
        lines += ["", "| seed | target (litgpt's best final) | litgpt s | ours: steps, s to target | ratio |",
                  "|---:|---:|---:|---:|---:|"]  # fmt: skip
        ratios = []
        for seed, result in results.items():
            s = result["summary"]
            ours = s["ours"]
            ratio = ours["ratio_to_litgpt"]
            ratios.append(ratio if ratio is not None else float("inf"))
            shown = (
                f"{ours['steps_to_target']:.0f}, {ours['seconds_to_target']:.1f}" if ratio else "not reached"
            )
            lines.append(f"| {seed} | {s['target_loss']:.4f} ({s['litgpt_best']}) | {s['litgpt_seconds']:.1f} | {shown} | "
                         f"{ratio:.2f} |" if ratio else f"| {seed} | {s['target_loss']:.4f} | {s['litgpt_seconds']:.1f} | {shown} | - |")  # fmt: skip
        lines += ["", f"median ratio (ours / litgpt wall time to litgpt's best loss): {statistics.median(ratios):.2f} "
                  f"(target <= 0.60)", ""]  # fmt: skip
        ablation = next(iter(results.values()))["summary"]
        extra = [n for n in ablation if n.startswith("ours,")]
        if extra:
            lines += [
                "| run (first seed) | final loss | steps to target | s to target | ratio |",
                "|---|---:|---:|---:|---:|",
            ]
            for n in ["ours", *extra]:
                r = ablation[n]
                cells = (f"{r['steps_to_target']:.0f} | {r['seconds_to_target']:.1f} | {r['ratio_to_litgpt']:.2f}"
                         if r["steps_to_target"] is not None else "- | - | -")  # fmt: skip
                lines.append(f"| {n} | {r['final_loss']:.4f} | {cells} |")
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from llm_lightning.training.cli import default_precision

    precision = args.precision or default_precision()
    out = Path(args.out).resolve() / "recipe"
    out.mkdir(parents=True, exist_ok=True)
    started, results = time.time(), {}
    for name, corpus in corpora(args, out).items():
        results[name] = one_corpus(args, name, corpus, out, precision)
        (out.parent / "recipe.md").write_text(markdown(results, machine_description(), precision))
    print(markdown(results, machine_description(), precision))
    print(f"[recipe] {time.time() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
