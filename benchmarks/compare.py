"""Throughput side by side: our fit path, our plain loop, litgpt and Hugging Face, same config.

Every measurement is a fresh process (`llm-lightning bench` for ours, benchmarks/peers.py
in the benchmark environment for the peers). A round runs each implementation once per
precision, in an order that rotates from round to round, so slow drifts of a shared machine
hit every implementation alike; the ratios are medians of the per-round ratios.

    python -m benchmarks.compare --peer_python .venv-bench/bin/python --out bench_out
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMPLS = ("fit", "loop", "litgpt", "hf")
LABELS = {
    "fit": "ours, Lightning fit",
    "loop": "ours, plain loop",
    "litgpt": "litgpt GPT, plain loop",
    "hf": "HF LlamaForCausalLM (sdpa), plain loop",
}
DIMS = ["--hidden_size", "256", "--num_layers", "6", "--num_heads", "8", "--vocab_size", "8192"]
DIMS += ["--seq_len", "256", "--micro_batch_size", "8"]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer_python", required=True, help="python of the env with litgpt and transformers")
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precisions", default="32-true,bf16-mixed")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument(
        "--quiet_below", type=float, default=0.2, help="start a run once other work uses less of the cores"
    )
    parser.add_argument("--max_wait", type=float, default=120, help="seconds to wait for quiet, per run")
    return parser.parse_args(argv)


def command(impl: str, precision: str, args: argparse.Namespace, json_path: Path) -> list[str]:
    common = [*DIMS, "--precision", precision, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    common += ["--json", str(json_path)]
    if impl in ("fit", "loop"):
        return [sys.executable, "-m", "llm_lightning", "bench", "--mode", impl, "--device", "cpu", *common]
    return [args.peer_python, "-m", "benchmarks.peers", "--impl", impl, *common]


def busy_share(seconds: float = 1.0) -> float:
    """Share of all cores busy over `seconds` (from /proc/stat; 0.0 where it cannot be read)."""

    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return values[3] + values[4], sum(values)  # idle + iowait, total

    try:
        idle_a, total_a = sample()
        time.sleep(seconds)
        idle_b, total_b = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    return 1.0 - (idle_b - idle_a) / max(1, total_b - total_a)


def wait_for_quiet(threshold: float, max_wait: float) -> float:
    """On a shared machine, wait (up to max_wait s) until other work leaves the cores nearly idle."""
    deadline, busy = time.time() + max_wait, busy_share()
    while busy > threshold and time.time() < deadline:
        print(f"    waiting: cores {busy:.0%} busy with other work", flush=True)
        time.sleep(5)
        busy = busy_share()
    return busy


def measure(impl: str, precision: str, args: argparse.Namespace, json_path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    busy = wait_for_quiet(args.quiet_below, args.max_wait)
    started = time.time()
    done = subprocess.run(command(impl, precision, args, json_path), env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench of {impl} ({precision}) failed:\n{done.stderr[-3000:]}")
    result = json.loads(json_path.read_text())
    result["busy_before"] = busy
    json_path.write_text(json.dumps(result, indent=2))
    print(
        f"  {impl:<7} {precision:<10} {result['tokens_per_s']:>8,.0f} tok/s"
        f"  step {result['step_time_s']['median']:.3f}s  ({time.time() - started:.0f}s wall, cores {busy:.0%} busy before)",
        flush=True,
    )
    return result


def run_rounds(args: argparse.Namespace, out: Path) -> dict:
    """{precision: {impl: [result per round]}}, the order of impls rotating every round."""
    impls, precisions = args.impls.split(","), args.precisions.split(",")
    results = {p: {i: [] for i in impls} for p in precisions}
    for round_index in range(args.rounds):
        print(f"round {round_index + 1}/{args.rounds}  (load average {os.getloadavg()[0]:.1f})", flush=True)
        shift = round_index % len(impls)
        order = impls[shift:] + impls[:shift]
        for precision in precisions:
            for impl in order:
                path = out / "runs" / f"{impl}_{precision}_{round_index}.json"
                results[precision][impl].append(measure(impl, precision, args, path))
    return results


def median_of(runs: list[dict], key: str):
    values = [run[key] for run in runs if run.get(key) is not None]
    return statistics.median(values) if values else None


def paired_ratio(runs_a: list[dict], runs_b: list[dict]) -> float:
    """Median over rounds of tokens/s of a over b (runs of one round are neighbours in time)."""
    return statistics.median(
        a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs_a, runs_b, strict=True)
    )


def summarize(results: dict) -> dict:
    summary = {}
    for precision, by_impl in results.items():
        rows = {
            impl: {
                "tokens_per_s": median_of(runs, "tokens_per_s"),
                "step_time_s": statistics.median(r["step_time_s"]["median"] for r in runs),
                "mfu": median_of(runs, "mfu"),
                "achieved_tflops": median_of(runs, "achieved_tflops"),
                "peak_memory_mib": median_of(runs, "peak_memory_bytes") / 2**20,
                "data_wait_share": median_of(runs, "data_wait_share"),
                "runs_tokens_per_s": [r["tokens_per_s"] for r in runs],
            }
            for impl, runs in by_impl.items()
        }
        ratios = {}
        pairs = [("fit", "litgpt"), ("fit", "hf"), ("loop", "litgpt"), ("loop", "hf"), ("fit", "loop")]
        for a, b in pairs:
            if a in by_impl and b in by_impl:
                ratios[f"{a}/{b}"] = paired_ratio(by_impl[a], by_impl[b])
        summary[precision] = {"rows": rows, "ratios": ratios}
    return summary


def markdown(summary: dict, machine: str) -> str:
    lines = [f"Machine: {machine}", ""]
    lines.append("| precision | implementation | tokens/s | step (s) | MFU | peak RSS (MiB) | data wait |")
    lines.append("|---|---|---:|---:|---:|---:|---:|")
    for precision, block in summary.items():
        for impl, row in block["rows"].items():
            mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
            wait = f"{row['data_wait_share']:.2%}" if row["data_wait_share"] is not None else ""
            lines.append(
                f"| {precision} | {LABELS[impl]} | {row['tokens_per_s']:,.0f} | {row['step_time_s']:.3f} "
                f"| {mfu} | {row['peak_memory_mib']:,.0f} | {wait} |"
            )
    lines += ["", "| precision | ratio | value |", "|---|---|---:|"]
    for precision, block in summary.items():
        for name, value in block["ratios"].items():
            lines.append(f"| {precision} | {ratio_label(name)} | {value:.3f} |")
    return "\n".join(lines)


def ratio_label(name: str) -> str:
    a, b = name.split("/")
    if name == "fit/loop":
        return "our fit / our loop (Lightning overhead; target >= 0.97)"
    return f"{LABELS[a]} / {LABELS[b]}"


def machine_description() -> str:
    import torch

    from llm_lightning.tools.timing import cpu_model_name

    return (
        f"{cpu_model_name()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {time.strftime('%Y-%m-%d')}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    results = run_rounds(args, out)
    summary = summarize(results)
    table = markdown(summary, machine_description())
    (out / "throughput.json").write_text(json.dumps({"summary": summary, "runs": results}, indent=2))
    (out / "throughput.md").write_text(table + "\n")
    print()
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
