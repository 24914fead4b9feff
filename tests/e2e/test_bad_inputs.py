"""Runs the fault matrix in tests/bad_inputs.yaml: each bad input gets one line and exit 2."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from llm_lightning.cli import main
from llm_lightning.errors import UserError
from llm_lightning.tools.export import export
from tests.conftest import TINY_FIT, run_cli

MATRIX = yaml.safe_load((Path(__file__).parent / "bad_inputs.yaml").read_text())


@pytest.fixture(scope="module")
def trained_checkpoint(run_dir) -> Path:
    return run_dir / "last.ckpt"


def fill(value: str, places: dict[str, Path]) -> str:
    return value.format(**{key: str(path) for key, path in places.items()})


def build_row_inputs(row: dict, places: dict[str, Path]) -> None:
    for name, content in row.get("files", {}).items():
        path = places["raw"] / name
        if content.startswith("hex:"):
            path.write_bytes(bytes.fromhex(content[4:]))
        else:
            path.write_text(content)
    for folder in row.get("mkdir", []):
        Path(fill(folder, places)).mkdir(parents=True)
    for name, target in row.get("symlinks", {}).items():
        (places["raw"] / name).symlink_to(fill(target, places))
    for key, share in (("copy", 1), ("truncate", 2)):
        if key in row:
            data = Path(fill(row[key]["from"], places)).read_bytes()
            target = Path(fill(row[key]["to"], places))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data[: len(data) // share])
    if "foreign" in row:
        torch.save(
            {"state_dict": {"encoder.weight": torch.zeros(2)}, "epoch": 3}, fill(row["foreign"], places)
        )


def run_before(row: dict, places: dict[str, Path], capsys) -> None:
    """The row's `before:` command lines (each must succeed), then its `remove:` paths."""
    for command in row.get("before", []):
        code, stderr = run_in_process([fill(arg, places) for arg in command], capsys)
        assert code == 0, stderr[-3000:]
    for path in row.get("remove", []):
        shutil.rmtree(fill(path, places))


def run_in_process(args: list[str], capsys) -> tuple[int, str]:
    """The real entry point, in this process (a subprocess per row would cost minutes)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(args)
    return stop.value.code, capsys.readouterr().err


@pytest.mark.parametrize("row", MATRIX, ids=[row["name"] for row in MATRIX])
def test_bad_input_gets_one_clear_line(
    row, tmp_path, corpus_dir, prepared_dir, trained_checkpoint, capsys, monkeypatch
):
    places = {"tmp": tmp_path, "raw": tmp_path / "raw", "data": prepared_dir, "ckpt": trained_checkpoint}
    shutil.copytree(corpus_dir, places["raw"])
    build_row_inputs(row, places)
    args = [fill(arg, places) for arg in row["args"]]
    if args[0] in ("fit", "validate"):
        args[1:1] = TINY_FIT
    for key, value in row.get("env", {}).items():
        monkeypatch.setenv(key, fill(value, places))
    monkeypatch.chdir(tmp_path)
    run_before(row, places, capsys)
    code, stderr = run_in_process(args, capsys)  # an unexpected exception fails the test here
    lines = stderr.strip().splitlines()
    assert code == 2, stderr[-3000:]
    assert lines and lines[-1].startswith("llm-lightning: error:"), stderr[-3000:]
    assert sum(line.startswith("llm-lightning: error:") for line in lines) == 1
    for fragment in row["expect"]:
        assert fill(fragment, places) in lines[-1], lines[-1]
    assert not (tmp_path / "out").exists(), "a failed prepare must leave nothing behind"


def test_bad_checkpoints_exit_2_with_one_line(run_dir, tmp_path):
    truncated = tmp_path / "truncated.ckpt"
    data = (run_dir / "last.ckpt").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    for command, path in (("generate", truncated), ("export", foreign)):
        extra = ["--output_dir", tmp_path / "out"] if command == "export" else ["--prompt", "x"]
        result = run_cli(command, "--ckpt_path", path, *extra)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and str(path) in lines[0], result.stderr
    assert not (tmp_path / "out").exists()
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all" * 100)
    with pytest.raises(UserError, match="garbage.ckpt"):
        export(garbage, tmp_path / "out")
