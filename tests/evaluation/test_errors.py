"""Each bad input of eval and of the in-loop eval: one line naming it, exit 2, nothing written."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import llm_lightning
from tests.conftest import fit_flags, run_cli


def assert_one_line(result, *fragments: str) -> None:
    # Lightning's own "Seed set to N" comes first in a fit's output, as for every fit error
    lines = [line for line in result.stderr.strip().splitlines() if "Seed set to" not in line]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[0].startswith("llm-lightning: error:"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_malformed_task_line_is_named_before_training(prepared_dir, tmp_path, capsys, monkeypatch):
    task = tmp_path / "quiz.jsonl"
    task.write_text(
        '{"context": "Q?", "choices": ["a", "b"], "gold": 0}\n{"context": "Q?", "choices": ["a"]\n'
    )
    monkeypatch.chdir(tmp_path)
    argv = ["fit", *fit_flags(prepared_dir, tmp_path / "ckpts"), "--eval.tasks", f"[{task}]"]
    assert_one_line(run_in_process(argv, capsys, monkeypatch), "--eval.tasks", str(task), "line 2")
    assert not (tmp_path / "ckpts").exists()


def run_in_process(argv: list, capsys, monkeypatch):
    """`llm-lightning ARGV` in this process (lm_eval imported once for the module's tests)."""
    from llm_lightning.cli import main

    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):  # eval sets them; keep them to this test
        monkeypatch.setenv(name, "1")
    with pytest.raises(SystemExit) as stop:
        main([str(arg) for arg in argv])
    return SimpleNamespace(returncode=stop.value.code, stderr=capsys.readouterr().err)


def test_checkpoint_without_a_tokenizer(run_dir, tmp_path, capsys, monkeypatch):
    checkpoint = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)
    checkpoint.pop("TextDataModule")
    bare = tmp_path / "bare.ckpt"
    torch.save(checkpoint, bare)
    output = tmp_path / "out.json"
    argv = ["eval", "--ckpt_path", bare, "--tasks", "readme_qa", "--output", output]
    assert_one_line(run_in_process(argv, capsys, monkeypatch), "--ckpt_path", str(bare), "tokenizer")
    assert not output.exists()


def test_task_whose_data_needs_the_network(run_dir, tmp_path, capsys, monkeypatch):
    """A task YAML whose data set is on the hub: named at once, without waiting on the network."""
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "hub_quiz.yaml").write_text(
        "task: hub_quiz\ndataset_path: some-org/some-dataset-not-here\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{c}}'\ndoc_to_target: 0\n"
    )
    output = tmp_path / "out.json"
    argv = [
        "eval", "--ckpt_path", run_dir / "last.ckpt", "--tasks", "hub_quiz", "--include_path", tmp_path / "tasks",
        "--output", output,
    ]  # fmt: skip
    assert_one_line(run_in_process(argv, capsys, monkeypatch), "--tasks hub_quiz", "offline")
    assert not output.exists()


@pytest.mark.slow  # indexing lm-eval's whole task catalogue takes ~20 s on this machine
def test_missing_task(run_dir, tmp_path):
    result = run_cli("eval", "--ckpt_path", run_dir / "last.ckpt", "--tasks", "no_such_task_here")
    assert_one_line(result, "--tasks no_such_task_here", "no such task")


def test_eval_without_lm_eval_says_how_to_install(monkeypatch):
    import importlib.util

    from llm_lightning.errors import UserError
    from llm_lightning.evaluation import run

    real = importlib.util.find_spec
    monkeypatch.setattr(
        run.importlib.util, "find_spec", lambda name: None if name == "lm_eval" else real(name)
    )
    with pytest.raises(UserError, match=r"pip install 'llm-lightning\[eval\]'"):
        run.require_lm_eval()


def test_the_core_imports_without_lm_eval():
    """lm-eval is an optional extra: only evaluation/harness.py imports it at module level, and
    that module (like every other use of lm_eval) is imported inside a function, by `eval` only."""
    package = Path(llm_lightning.__file__).parent
    top_level, lazy_harness = set(), set()
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if any(name == "lm_eval" or name.startswith("lm_eval.") for name in imported(node)):
                top_level.add(path.relative_to(package).as_posix())
            if "llm_lightning.evaluation.harness" in imported(node):
                lazy_harness.add(path.relative_to(package).as_posix())
    assert top_level == {"evaluation/harness.py"}
    assert lazy_harness == set()


def imported(node) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module:
        return [node.module]
    return []
