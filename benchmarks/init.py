"""Which weight initialisation trains best: our Transformer under several init schemes.

The quality part of `make bench` (benchmarks/quality.py) compares our `fit` with other libraries,
each with its own initialisation. This isolates the initialisation: the same model (ours),
the same tinyshakespeare tokens, order, schedule and batch, in the same plain loop as the
peers, only the initial weights differ. It is the evidence for the library's default
(normal with sqrt(2 / (5 x hidden)), residual output projections at zero).

    python -m benchmarks.init --corpus tinyshakespeare.txt          # or: bash scripts/bench.sh init
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch import nn

from benchmarks.quality import SEED, add_run_args, prepare, train_curve
from llm_lightning.model import ModelConfig, Transformer  # noqa: E402

RESIDUAL = ("o_proj.weight", "down_proj.weight")  # the projections that write into the stream


def initialise(model: Transformer, std: float, residual_std: float) -> None:
    for name, param in model.named_parameters():
        if param.dim() == 1:
            nn.init.ones_(param)
        elif name.endswith(RESIDUAL):
            nn.init.normal_(param, std=residual_std) if residual_std else nn.init.zeros_(param)
        else:
            nn.init.normal_(param, std=std)


def schemes(config: ModelConfig) -> dict:
    """name -> (std, residual std); None: the library's default, untouched."""
    width, depth = config.hidden_size, config.num_layers
    small = math.sqrt(2 / (5 * width))
    return {
        "library default: small init, residual projections at zero": None,
        "GPT-2: 0.02, residual 0.02 / sqrt(2 x layers)": (0.02, 0.02 / math.sqrt(2 * depth)),
        "litgpt pretrain (GPT-NeoX): small init, residual 1 / (sqrt(hidden) x layers)": (
            small,
            1 / math.sqrt(width) / depth,
        ),
        "small init, residual small / sqrt(2 x layers)": (small, small / math.sqrt(2 * depth)),
        "0.02, residual projections at zero": (0.02, 0.0),
        "1 / sqrt(hidden), residual projections at zero": (1 / math.sqrt(width), 0.0),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(parser)
    parser.add_argument("--precision", default="32-true")
    args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    data = prepare(Path(args.corpus), out / "quality")
    meta = json.loads((data / "metadata.json").read_text())
    config = ModelConfig.from_preset("tiny", vocab_size=meta["vocab_size"], max_seq_len=meta["max_length"])
    curves = {}
    for name, scheme in schemes(config).items():
        torch.manual_seed(SEED)
        model = Transformer(config)
        if scheme is not None:
            initialise(model, *scheme)
        print(f"training: {name} ...", flush=True)
        curves[name] = train_curve(
            model,
            lambda model, inputs, targets: model(inputs, targets=targets),
            lambda model, inputs: model(inputs),
            data,
            args,
        )
    steps = [point["step"] for point in next(iter(curves.values()))]
    lines = [
        f"tiny preset, tinyshakespeare (bpe {meta['vocab_size']}, {meta['max_length']} tokens), "
        f"batch {args.batch_size}, {args.steps} steps, lr {args.learning_rate}: val loss",
        "",
        "| init | " + " | ".join(f"step {s}" for s in steps) + " |",
        "|---|" + "---:|" * len(steps),
    ]
    for name, curve in curves.items():
        lines.append(f"| {name} | " + " | ".join(f"{p['val_loss']:.4f}" for p in curve) + " |")
    table = "\n".join(lines)
    (out / "init.md").write_text(table + "\n")
    (out / "init.json").write_text(json.dumps(curves, indent=2))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
