"""Evaluating a model on lm-evaluation-harness tasks, offline, one task at a time.

The hub is switched off (HF_DATASETS_OFFLINE, HF_HUB_OFFLINE) before lm_eval and datasets are
imported, so a task whose data is neither local nor cached fails at once, and is named,
instead of hanging on the network. Each task is timed on its own.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from pathlib import Path

from llm_lightning.errors import UserError

INSTALL_HINT = "pip install 'llm-lightning[eval]'"
EXAMPLE_TASKS = Path(__file__).parent / "tasks"  # readme_qa: multiple-choice questions on the README


def go_offline() -> None:
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"


def require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError(f"lm-eval (lm-evaluation-harness) is not installed; install it with {INSTALL_HINT}")


def task_manager(tasks: list[str], include_path: str | None):
    """A TaskManager that knows `tasks`; lm-eval's own catalogue (slow to index) only when needed."""
    from lm_eval.tasks import TaskManager

    paths = [str(EXAMPLE_TASKS)] + ([include_path] if include_path else [])
    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"--include_path {include_path}: no such folder (of task YAML files)")
    local = TaskManager(include_path=paths, include_defaults=False)
    if all(task in local.all_tasks for task in tasks):
        return local
    manager = TaskManager(include_path=paths)
    for task in tasks:
        if task not in manager.all_tasks:
            where = (
                f" or in --include_path {include_path}"
                if include_path
                else " (local YAML: --include_path DIR)"
            )
            raise UserError(f"--tasks {task}: no such task in lm-eval{where}")
    return manager


def check_offline(task: str, manager) -> None:
    """Build the task once: its data set must be local or cached, since there is no network."""
    try:
        manager.load([task])
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - datasets fails in many ways without the hub
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise UserError(
            f"--tasks {task}: its data set cannot be had offline ({reason}); use a local task "
            "(a YAML whose data set is a local file, --include_path DIR)"
        ) from None


def evaluate(
    lm, tasks: list[str], include_path: str | None, num_fewshot: int | None, limit: int | None
) -> dict:
    """{"results": {task: metrics}, "seconds": {task: s}, "samples": {task: per-document scores}}."""
    from lm_eval import simple_evaluate

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task notices are not for our users
    manager = task_manager(tasks, include_path)
    for task in tasks:
        check_offline(task, manager)
    report = {"results": {}, "seconds": {}, "samples": {}}
    for task in tasks:
        start = time.perf_counter()
        output = simple_evaluate(
            model=lm, tasks=[task], num_fewshot=num_fewshot, limit=limit, task_manager=manager,
            bootstrap_iters=0, log_samples=True,
        )  # fmt: skip
        report["seconds"][task] = time.perf_counter() - start
        report["results"].update(_plain(output["results"]))
        report["samples"][task] = [_sample(s) for s in output["samples"].get(task, [])]
    return report


def _plain(results: dict) -> dict:
    """Metrics as numbers only ("acc,none" -> "acc"; the harness's stderr placeholders dropped)."""
    plain = {}
    for task, metrics in results.items():
        plain[task] = {
            key.removesuffix(",none"): value
            for key, value in metrics.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        }
    return plain


def _sample(sample: dict) -> dict:
    """One document: its id, what the model returned per request (log-likelihoods), its metrics."""
    responses = [r[0] if isinstance(r, list | tuple) else r for r in sample.get("filtered_resps", [])]
    responses = [r[0] if isinstance(r, list | tuple) else r for r in responses]
    metrics = {m: sample[m] for m in sample.get("metrics", []) if m in sample}
    return {"doc_id": sample["doc_id"], "responses": responses, **metrics}


def table(report: dict) -> str:
    """The results as a fixed-width table: task, documents, each metric, seconds."""
    rows = []
    for task, metrics in report["results"].items():
        shown = {k: v for k, v in metrics.items() if "stderr" not in k and k not in ("alias", "sample_len")}
        values = ", ".join(f"{k} {v:.4f}" for k, v in shown.items())
        documents = len(report["samples"].get(task, []))
        seconds = report["seconds"].get(task, float("nan"))
        rows.append(f"{task:<24} {documents:>6} {seconds:>9.1f}  {values}")
    header = f"{'task':<24} {'docs':>6} {'seconds':>9}  metrics"
    return "\n".join([header, *rows])
