"""Callbacks the tests add to a real `llm-lightning` run with `--trainer.callbacks+=tests.probes.X`.

They only record what a run did (its validation numbers, the windows it trained on), so a test
can check it from outside; they change nothing. `run_cli` puts the repository on PYTHONPATH.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


class RecordMetrics(L.Callback):
    """Appends {"stage", "step", metrics} to `path` after every validation and test (rank 0)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def _record(self, trainer: L.Trainer, stage: str) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
        with self.path.open("a") as stream:
            stream.write(json.dumps({"stage": stage, "step": trainer.global_step, **metrics}) + "\n")

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        self._record(trainer, "validate")

    def on_test_end(self, trainer: L.Trainer, pl_module) -> None:
        self._record(trainer, "test")


def recorded(path: Path, stage: str = "validate") -> list[dict]:
    return [r for r in map(json.loads, Path(path).read_text().splitlines()) if r["stage"] == stage]


class RecordWindows(L.Callback):
    """Appends the input tokens of every training sample this rank reads to `path`, one JSON list per line."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        path = self.path.with_name(f"{self.path.name}.rank{trainer.global_rank}")
        with path.open("a") as stream:
            for row in batch[0].tolist():
                stream.write(json.dumps(row) + "\n")


class RecordSharding(L.Callback):
    """What a sharded run's ranks did: their initial weights and the collectives of each optimizer step.

    At the start of training rank 0 saves the whole model (gathered from the shards) to
    `path`.init.pt; each rank appends {"step", "units", "collectives": {op: count}} per optimizer
    step to `path`.rank<R>, counted by torch's CommDebugMode from the first micro-batch's forward
    to the last one's backward by `CountCollectives`.
    """

    def __init__(self, path: str) -> None:
        self.path, self.mode = Path(path), None

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        import torch
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(pl_module.model, options=options)  # every rank takes part
        if trainer.is_global_zero:
            clean = {
                k.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", ""): v
                for k, v in weights.items()
            }
            torch.save(clean, self.path.with_name(f"{self.path.name}.init.pt"))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        if self.mode is None:
            self.mode = CountCollectives()
            self.mode.__enter__()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module, optimizer) -> None:
        from llm_lightning.training.parallel.parallelize import fsdp_units

        self.mode.__exit__(None, None, None)
        counts, self.mode = dict(self.mode.counts), None
        line = {"step": trainer.global_step, "units": fsdp_units(pl_module.model), "collectives": counts}
        with self.path.with_name(f"{self.path.name}.rank{trainer.global_rank}").open("a") as stream:
            stream.write(json.dumps(line) + "\n")


def _count_collectives_mode():
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class CountCollectives(TorchDispatchMode):
        """Counts the collective ops (c10d namespaces) dispatched while it is active."""

        def __init__(self) -> None:
            super().__init__()
            self.counts = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace in ("c10d", "_c10d_functional"):
                self.counts[func.__name__] += 1
            return func(*args, **(kwargs or {}))

    return CountCollectives


def CountCollectives():  # noqa: N802 (built lazily: torch is not imported by the other probes)
    return _count_collectives_mode()()


class HoldBeforeTheEnd(L.Callback):
    """Holds the run at the end of `step` until the file `path` exists (at most `timeout` s).

    A test that signals or kills a run once it has reached some step must get there before the
    run ends on its own: on a loaded machine the test can lag many steps behind. With the test
    creating `path` only after its signal, the run cannot end first, however late the signal
    comes; when the signal comes in time (the usual case) the run stops before this step and
    the probe does nothing. Training itself is unchanged.
    """

    def __init__(self, path: str, step: int, timeout: float = 600) -> None:
        self.path, self.step, self.timeout = Path(path), step, timeout

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        import time

        if trainer.global_step != self.step:
            return
        deadline = time.monotonic() + self.timeout
        while not self.path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
