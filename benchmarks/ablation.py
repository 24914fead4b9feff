"""What each optimization is worth: our training step with one of them undone at a time.

Variants, built in one process and stepped in turn (ABCD, then DCBA, ...), so a slow moment of
a shared machine hits them alike; each is compared with `all on` step by step (the median of
the per-step ratios):
- all on: the library as it is;
- plain loss: the full (tokens x vocab) logits, then F.cross_entropy, instead of the chunked loss;
- plain rotary: the textbook rotate-half formula instead of the fused rotary function;
- foreach AdamW: PyTorch's foreach AdamW instead of the fused kernel;
- none: all three undone (the step as it was before them).

    python -m benchmarks.ablation --steps 16 --json bench_out/ablation.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llm_lightning.model import ModelConfig, Transformer
from llm_lightning.tools.timing import random_batches
from llm_lightning.training.optim import build_optimizer, parameter_groups

VARIANTS = {
    "all on": set(),
    "plain loss": {"loss"},
    "plain rotary": {"rotary"},
    "foreach AdamW": {"adamw"},
    "none": {"loss", "rotary", "adamw"},
}


def plain_rotary(x, cos, sin):
    first, second = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-second, first), dim=-1) * sin).type_as(x)


def make_step(undone: set[str], batches, precision: str):
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", vocab_size=8192, max_seq_len=batches[0][0].shape[1])
    model = Transformer(config)
    if "rotary" in undone:  # this model's attention layers use the textbook formula
        for block in model.layers:
            block.attn.rotary = plain_rotary
    cpu = torch.device("cpu")
    if "adamw" in undone:
        groups = parameter_groups(model, 0.1)
        optimizer = torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), foreach=True)
    else:
        optimizer = build_optimizer(model, 3e-4, 0.1, (0.9, 0.95), cpu)
    position = iter(range(10**9))

    def step() -> None:
        inputs, targets = batches[next(position) % len(batches)]
        with torch.autocast("cpu", enabled=precision == "bf16-mixed"):
            if "loss" in undone:
                loss = F.cross_entropy(model(inputs).flatten(0, 1).float(), targets.flatten())
            else:
                loss = model(inputs, targets=targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = random_batches(4, 8, 256, 8192, torch.device("cpu"), seed=0)
    steps = {name: make_step(undone, batches, args.precision) for name, undone in VARIANTS.items()}
    times = {name: [] for name in VARIANTS}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    for i in range(args.steps):
        order = list(steps) if i % 2 == 0 else list(steps)[::-1]
        for name in order:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    rows = {}
    print(
        f"tiny dims, 8 x 256 tokens, {args.precision}, {torch.get_num_threads()} threads, {args.steps} steps each"
    )
    print(f"{'variant':<14} {'median step':>12} {'tokens/s':>9}  all-on speedup over it")
    for name, values in times.items():
        speedup = statistics.median(a / b for a, b in zip(values, times["all on"], strict=True))
        median = statistics.median(values)
        rows[name] = {"median_step_s": median, "tokens_per_s": 2048 / median, "all_on_speedup": speedup}
        print(f"{name:<14} {median:>11.3f}s {2048 / median:>9,.0f}  {speedup:.3f}x")
    if args.json_path:
        Path(args.json_path).write_text(
            json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
