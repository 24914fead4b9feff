"""In-loop task accuracy during a fit (`--eval.*`): logged, exact across ranks, and invisible to
the training itself (a fit with it resumes exactly, and trains exactly as one without)."""

from __future__ import annotations

import pytest

from llm_lightning.evaluation.loading import load_for_eval
from llm_lightning.evaluation.run import EXAMPLE_TASKS
from llm_lightning.evaluation.tasks import count_correct, read_task
from tests.conftest import assert_same_weights, fit, records

TASK = EXAMPLE_TASKS / "readme_qa" / "readme_qa.jsonl"


def eval_flags(every: int, limit: int) -> list:
    return ["--eval.tasks", f"[{TASK}]", "--eval.every_n_steps", every, "--eval.limit", limit]


def counted_here(ckpt, limit: int) -> tuple[float, float]:
    """acc and acc_norm of a checkpoint on the first `limit` examples, in this one process."""
    model, tokenizer = load_for_eval(ckpt)
    examples = read_task(TASK).examples[:limit]
    acc, acc_norm, n = count_correct(model, tokenizer, examples, model.config.max_seq_len)
    return acc / n, acc_norm / n


def test_fit_with_eval_logs_accuracy_and_resumes_exactly(prepared_dir, run_dir, tmp_path):
    """Stopped at 10 and resumed to 20 with evals at 5, 10, 15, 20: the same weights as the shared
    run, which had no eval (the eval moved neither the data position nor the random state)."""
    ckpts = tmp_path / "ckpts"
    # The schedule's horizon is the shared run's 20 steps, as in a run interrupted at step 10.
    flags = [*eval_flags(5, 8), "--model.max_steps", 20]
    first = fit(prepared_dir, ckpts, *flags, steps=10)
    assert first.returncode == 0, first.stderr[-3000:]
    second = fit(prepared_dir, ckpts, *flags, "--ckpt_path", "last", steps=20)
    assert second.returncode == 0, second.stderr[-3000:]
    assert_same_weights(ckpts / "last.ckpt", run_dir / "last.ckpt")

    evals = records(ckpts, "eval")
    assert [r["step"] for r in evals] == [5, 10, 15, 20]
    assert all(r["eval/time_s"] > 0 for r in evals)
    acc, acc_norm = counted_here(ckpts / "last.ckpt", 8)
    assert evals[-1]["eval/readme_qa/acc"] == pytest.approx(acc, abs=1e-12)
    assert evals[-1]["eval/readme_qa/acc_norm"] == pytest.approx(acc_norm, abs=1e-12)
    tags = tensorboard_tags(tmp_path / "logs")
    assert {"eval/readme_qa/acc", "eval/readme_qa/acc_norm", "eval/time_s"} <= tags


def tensorboard_tags(root) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in root.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    return tags


@pytest.mark.slow  # a 2-process fit (~25 s); test_sharded_eval checks the same sum under FSDP2 (slow too)
def test_two_ddp_processes_count_the_same_as_one(prepared_dir, tmp_path):
    """9 examples over 2 ranks (5 + 4, the short share padded): the summed counts equal one
    process's on the same checkpoint, exactly."""
    ckpts = tmp_path / "ckpts"
    flags = ["--trainer.strategy", "ddp", "--trainer.devices", 2, "--trainer.accelerator", "cpu"]
    result = fit(prepared_dir, ckpts, *flags, *eval_flags(10, 9), steps=10)
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = records(ckpts, "eval")
    acc, acc_norm = counted_here(ckpts / "last.ckpt", 9)
    assert record["eval/readme_qa/acc"] == pytest.approx(acc, abs=1e-12)
    assert record["eval/readme_qa/acc_norm"] == pytest.approx(acc_norm, abs=1e-12)
