"""`llm-lightning eval` against lm-evaluation-harness's own `hf` model on the exported folder:
the same per-document log-likelihoods and accuracies, fp32 on CPU (the adapter's check)."""

from __future__ import annotations

import json

import pytest

from llm_lightning.evaluation.run import EXAMPLE_TASKS
from llm_lightning.evaluation.tasks import read_task
from tests.conftest import run_cli

LIMIT = 24  # documents of the example task (4 choices each)


def harness_hf(exported, limit: int) -> dict:
    """The harness's `hf` model on the exported folder, in this process (offline, as eval runs)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model = HFLM(pretrained=str(exported), dtype="float32", device="cpu", batch_size=8)
    manager = TaskManager(include_path=str(EXAMPLE_TASKS), include_defaults=False)
    return simple_evaluate(
        model=model,
        tasks=["readme_qa"],
        limit=limit,
        task_manager=manager,
        bootstrap_iters=0,
        log_samples=True,
    )


def test_eval_of_a_checkpoint_matches_the_harness_hf_model_on_its_export(
    run_dir, exported, tmp_path, monkeypatch
):
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    output = tmp_path / "eval.json"
    result = run_cli(
        "eval", "--ckpt_path", run_dir / "last.ckpt", "--tasks", "readme_qa", "--limit", LIMIT,
        "--device", "cpu", "--batch_size", "5", "--output", output,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "readme_qa" in result.stdout and "acc_norm" in result.stdout  # the table
    ours = json.loads(output.read_text())
    theirs = harness_hf(exported, LIMIT)

    docs = {s["doc_id"]: s for s in ours["samples"]["readme_qa"]}
    assert len(docs) == LIMIT
    for sample in theirs["samples"]["readme_qa"]:
        their_lls = [resp[0][0] for resp in sample["resps"]]
        assert docs[sample["doc_id"]]["responses"] == pytest.approx(their_lls, abs=2e-4, rel=1e-5)
        assert docs[sample["doc_id"]]["acc"] == sample["acc"]
        assert docs[sample["doc_id"]]["acc_norm"] == sample["acc_norm"]
    for metric in ("acc", "acc_norm"):
        assert ours["results"]["readme_qa"][metric] == theirs["results"]["readme_qa"][f"{metric},none"]
    # not a degenerate comparison: choices differ in likelihood
    assert len({round(x, 3) for s in docs.values() for x in s["responses"]}) > LIMIT


def test_the_example_task_has_a_few_dozen_well_formed_questions():
    task = read_task(EXAMPLE_TASKS / "readme_qa" / "readme_qa.jsonl")
    assert len(task.examples) >= 30
    assert {e.gold for e in task.examples} != {0}  # answers are not always the first choice


def test_rolling_loglikelihood_and_generate_until_agree_with_the_model(trained):
    """Rolling log-likelihood over several windows equals the model's own per-token loss summed
    window by window; generate_until is greedy decoding (tools/generate.py) cut at the stop string."""
    import torch
    from lm_eval.api.instance import Instance

    from llm_lightning.evaluation.harness import LightningLM
    from llm_lightning.tools.generate import generate

    model, tokenizer = trained
    lm = LightningLM("unused", model=model, tokenizer=tokenizer)
    text = "The cat sees the moon. A dog follows the long road at night. " * 3
    ids = tokenizer.encode(text)
    assert len(ids) > model.config.max_seq_len  # more than one window
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    expected, window = 0.0, model.config.max_seq_len
    with torch.no_grad():
        for start in range(0, len(ids), window):  # disjoint windows, each with all earlier context it fits
            targets = ids[start : start + window]
            context = ([tokenizer.eos_id] + ids)[max(0, start + len(targets) - window) : start + len(targets)]
            logits = model(torch.tensor([context])).log_softmax(-1)[0, -len(targets) :]
            expected += float(logits.gather(1, torch.tensor(targets)[:, None]).sum())
    assert rolling == pytest.approx(expected, abs=1e-3)

    prompt = "The old king"
    greedy = generate(model, torch.tensor([tokenizer.encode(prompt)]), 12, temperature=0)
    full = tokenizer.decode(greedy[0, len(tokenizer.encode(prompt)) :].tolist())
    stop = full.strip()[:3]  # a stop string the greedy text contains
    (out,) = lm.generate_until(
        [Instance("generate_until", {}, (prompt, {"until": [stop], "max_gen_toks": 12}), 0)]
    )
    assert out == full[: full.index(stop)]


def test_an_exported_folder_loads_as_its_checkpoint(run_dir, exported):
    """eval reads an exported folder: the same weights and the same tokenizer as the checkpoint."""
    import torch

    from llm_lightning.evaluation.loading import load_for_eval

    (model_a, tok_a), (model_b, tok_b) = load_for_eval(run_dir / "last.ckpt"), load_for_eval(exported)
    a, b = model_a.state_dict(), model_b.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    text = "The river finds a song in the rain."
    assert tok_a.encode(text) == tok_b.encode(text) and tok_a.eos_id == tok_b.eos_id
