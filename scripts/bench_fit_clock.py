"""`llm-lightning fit ARGS` with a TrainClock callback writing its curve to PATH.

    python scripts/bench_fit_clock.py PATH fit --model.preset tiny ...

The callback is added where LLMCLI builds the trainer, beside the project's own callbacks;
everything else is the `llm-lightning fit` a user runs.
"""

from __future__ import annotations

import sys

from llm_lightning.cli import fail
from llm_lightning.errors import UserError
from llm_lightning.tools.bench import TrainClock
from llm_lightning.training import cli


def main() -> None:
    path, argv = sys.argv[1], sys.argv[2:]
    build_trainer = cli.LLMCLI.instantiate_trainer

    def with_clock(self, **kwargs):
        kwargs.setdefault("callbacks", []).append(TrainClock(path))
        return build_trainer(self, **kwargs)

    cli.LLMCLI.instantiate_trainer = with_clock
    try:
        cli.run_lightning_cli(argv)
    except UserError as error:
        fail(str(error))


if __name__ == "__main__":
    main()
