"""The `llm-lightning` command.

`fit`, `validate`, `test` and `predict` are LightningCLI subcommands (trainer, model and data
from YAML configs and flags). The other subcommands are plain argparse programs, each a
module with a `main(argv) -> int`, listed in `TOOLS`.
"""

from __future__ import annotations

import importlib
import sys

from llm_lightning.errors import UserError

# subcommand -> module with `main(argv: list[str]) -> int`
TOOLS = {
    "prepare": "llm_lightning.data.prepare",
    "generate": "llm_lightning.tools.generate",
    "export": "llm_lightning.tools.export",
    "monitor": "llm_lightning.tools.monitor",
    "setup": "llm_lightning.tools.setup",
    "bench": "llm_lightning.tools.bench",
    "bench-prepare": "llm_lightning.tools.bench_prepare",
}


def run_tool(name: str, argv: list[str]) -> int:
    module = importlib.import_module(TOOLS[name])
    return module.main(argv)


def fail(message: str) -> None:
    """Print a user error as one line and exit 2."""
    print(f"llm-lightning: error: {message}", file=sys.stderr)
    sys.exit(UserError.exit_code)


def main(args: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if args is None else args)
    try:
        if argv and argv[0] in TOOLS:
            sys.exit(run_tool(argv[0], argv[1:]))
        from llm_lightning.training.cli import run_lightning_cli

        run_lightning_cli(args)  # None: LightningCLI reads sys.argv itself
    except UserError as error:
        fail(str(error))
