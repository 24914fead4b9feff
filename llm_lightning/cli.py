"""The `llm-lightning` command.

`fit`, `validate`, `test` and `predict` are LightningCLI subcommands (trainer, model and data
from YAML configs and flags). The other subcommands are plain argparse programs, each a
module with a `main(argv) -> int`, listed in `TOOLS`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

from llm_lightning.errors import UserError

# subcommand -> module with `main(argv: list[str]) -> int`
TOOLS = {
    "prepare": "llm_lightning.data.prepare",
    "merge-shards": "llm_lightning.tools.merge_shards",
    "generate": "llm_lightning.tools.generate",
    "export": "llm_lightning.tools.export",
    "consolidate": "llm_lightning.tools.consolidate",
    "monitor": "llm_lightning.tools.monitor",
    "setup": "llm_lightning.tools.setup",
    "bench": "llm_lightning.tools.bench",
    "bench-prepare": "llm_lightning.tools.bench_prepare",
    "eval": "llm_lightning.tools.eval",
}


USAGE = """usage: llm-lightning COMMAND [options]   (llm-lightning COMMAND --help for its options)

Training (LightningCLI: YAML configs with --config, any Trainer/model/data flag):
  fit         train a model, or resume one with --ckpt_path last
  validate    exact per-token validation loss of a checkpoint
  test        the same on the test split (the validation split)
  predict     per-window loss and greedy accuracy on the validation split, to a file

Data and tools:
  prepare        raw text folder -> tokenizer + token files (the seed's data_prep_tool.py)
  merge-shards   the shards of `prepare --num_shards N` (a job array) as one data folder
  generate       sample text from a checkpoint
  export         a checkpoint as a Hugging Face Llama folder
  consolidate    a sharded checkpoint folder as one .ckpt file
  monitor        table and plots of a run (the seed's utils.py monitor)
  setup          check the installation and devices (the seed's utils.py setup)
  bench          time training steps: tokens/s, MFU, memory
  bench-prepare  time the prepare pipeline
  eval           accuracy of a checkpoint on lm-evaluation-harness tasks (the [eval] extra)
"""


def run_tool(name: str, argv: list[str]) -> int:
    module = importlib.import_module(TOOLS[name])
    return module.main(argv)


def fail(message: str, training: bool = False) -> None:
    """Print a user error as one line and exit 2 (a training command: on its first process only)."""
    if not training or is_rank_zero():
        print(f"llm-lightning: error: {message}", file=sys.stderr)
    sys.exit(UserError.exit_code)


def is_rank_zero() -> bool:
    """Every process of a multi-process fit meets the same error or signal: one of them says it.

    Lightning sets the rank once the strategy starts; before that, its launcher's environment
    (LOCAL_RANK, NODE_RANK; RANK under torchrun or SLURM) says which copy this is.
    """
    ranks = [os.environ.get(name, "0") for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")]
    if any(rank != "0" for rank in ranks):
        return False
    if "lightning" in sys.modules or "lightning.fabric" in sys.modules:
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        return getattr(rank_zero_only, "rank", 0) == 0
    return True


def main(args: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="", file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    if argv[0] in TOOLS:  # without importing Lightning: `prepare` starts in a blink
        try:
            sys.exit(run_tool(argv[0], argv[1:]))
        except UserError as error:
            fail(str(error))
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from llm_lightning.training.callbacks import Interrupted
    from llm_lightning.training.cli import run_lightning_cli

    try:
        run_lightning_cli(args)  # None: LightningCLI reads sys.argv itself
    except UserError as error:
        fail(str(error), training=True)
    except Interrupted as stop:  # SIGTERM / SIGINT: the state is saved; say where
        if is_rank_zero():
            print(f"llm-lightning: {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)
    except MisconfigurationException as error:  # Lightning's word on accelerator/devices/strategy
        fail(f"--trainer.accelerator/devices/strategy do not fit this machine: {one_line(str(error))}", True)
    except argparse.ArgumentError as error:  # jsonargparse's, raised by the LightningCLI parsers
        configs = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in ("--config", "-c")]
        where = f" in --config {' '.join(configs)} or the flags" if configs else ""
        fail(f"{one_line(str(error))}{where} (see `llm-lightning {argv[0]} --help`)", training=True)


def one_line(message: str, limit: int = 400) -> str:
    text = re.sub(r"\s+", " ", message).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."
