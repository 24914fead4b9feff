"""TaskEval: in-loop accuracy on local multiple-choice tasks during a fit (`--eval.*`).

Every `every_n_steps` optimizer steps and at the end of the fit, the first `limit` examples of
each task are scored (tasks.py) and `eval/<task>/acc`, `eval/<task>/acc_norm` and
`eval/time_s` go to the trainer's loggers (TensorBoard) and to metrics.jsonl as an "eval"
record. Examples are dealt round-robin to the data-parallel ranks, each rank counts its right
answers, and the counts are summed: exact, whatever the number of ranks. Every rank runs the
same number of forward passes (a rank with fewer runs one-token passes that count nothing), so
the collectives of sharded models line up. The evaluation draws no random numbers
(model.eval(), and the RNG state forked as a guard) and never touches the data module, so a
fit with it resumes exactly as one without.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch

from llm_lightning.data.tokenizers import load_tokenizer_from_files
from llm_lightning.errors import UserError
from llm_lightning.evaluation.scoring import logits_of
from llm_lightning.evaluation.tasks import Task, count_correct, read_task
from llm_lightning.io.metrics import METRICS_FILE, append_record

BATCH = 16  # sequences (choices) per forward pass


class TaskEval(L.Callback):
    def __init__(self, tasks: list[str] | None = None, every_n_steps: int = 500, limit: int = 100) -> None:
        """
        Args:
            tasks: local multiple-choice task files (.jsonl, one {"context", "choices", "gold"} per line).
            every_n_steps: evaluate every this many optimizer steps (and at the end of the fit).
            limit: evaluate the first this many examples of each task.
        """
        if every_n_steps < 1:
            raise UserError(f"--eval.every_n_steps {every_n_steps}: must be at least 1")
        if limit < 1:
            raise UserError(f"--eval.limit {limit}: must be at least 1")
        self.paths = list(tasks or [])
        self.every_n_steps = every_n_steps
        self.limit = limit
        self.tasks: list[Task] = [read_task(path) for path in self.paths]  # malformed: fail before fitting
        self._last_step: int | None = None
        self._tokenizer = None

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if stage == "fit" and self.tasks:
            self._tokenizer = load_tokenizer_from_files(trainer.datamodule.tokenizer_files)

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        # A resumed fit was evaluated at its starting step already (before it stopped).
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # Called after every micro-batch: once per optimizer step, at the first that reaches it.
        step = trainer.global_step
        if self.tasks and step % self.every_n_steps == 0 and step != self._last_step:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if self.tasks and trainer.global_step != self._last_step:
            self.run(trainer, pl_module)

    def run(self, trainer: L.Trainer, pl_module) -> dict[str, float]:
        self._last_step = trainer.global_step
        start = time.perf_counter()
        model = pl_module.model
        was_training = model.training
        model.eval()
        metrics = {}
        try:
            with torch.random.fork_rng(devices=_rng_devices(pl_module.device)), torch.no_grad():
                for task in self.tasks:
                    metrics.update(self._evaluate(trainer, pl_module, task))
        finally:
            model.train(was_training)
        metrics["eval/time_s"] = time.perf_counter() - start
        self._log(trainer, metrics)
        return metrics

    def _evaluate(self, trainer: L.Trainer, pl_module, task: Task) -> dict[str, float]:
        rank, size = trainer.datamodule.data_parallel()
        mine = list(task.examples[: self.limit][rank::size])
        model, device = pl_module.model, pl_module.device
        # Every rank runs as many forward passes as the busiest one, so sharded models' collectives
        # pair up; the count is agreed on first, before any rank starts its passes.
        batches = -(-sum(len(example.choices) for example in mine) // BATCH)
        most = _most(batches, device)
        acc, acc_norm, count = count_correct(
            model, self._tokenizer, mine, pl_module.config.max_seq_len, BATCH
        )
        for _ in range(most - batches):
            logits_of(model, torch.zeros(1, 1, dtype=torch.long, device=device))
        totals = torch.tensor([acc, acc_norm, count], dtype=torch.float64, device=device)
        if trainer.world_size > 1:
            totals = trainer.strategy.reduce(totals, reduce_op="sum")
            totals = totals / (trainer.world_size // size)  # tensor-parallel ranks counted the same examples
        acc, acc_norm, count = (float(v) for v in totals.tolist())
        return {f"eval/{task.name}/acc": acc / count, f"eval/{task.name}/acc_norm": acc_norm / count}

    def _log(self, trainer: L.Trainer, metrics: dict[str, float]) -> None:
        if trainer.global_rank != 0:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        if dirpath:
            record = {"time": time.time(), "event": "eval", "step": trainer.global_step, **metrics}
            append_record(Path(dirpath) / METRICS_FILE, record)


def _most(value: int, device: torch.device) -> int:
    """The largest `value` over all ranks (the value itself without a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    tensor = torch.tensor([value], device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return int(tensor.item())


def _rng_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []
