"""Runs the fault matrix in tests/bad_inputs.yaml: each bad input gets one line and exit 2."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from llm_lightning.cli import main
from tests.conftest import TINY_FIT

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
    if "truncate" in row:
        data = Path(fill(row["truncate"]["from"], places)).read_bytes()
        Path(fill(row["truncate"]["to"], places)).write_bytes(data[: len(data) // 2])
    if "foreign" in row:
        torch.save(
            {"state_dict": {"encoder.weight": torch.zeros(2)}, "epoch": 3}, fill(row["foreign"], places)
        )


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
    code, stderr = run_in_process(args, capsys)  # an unexpected exception fails the test here
    lines = stderr.strip().splitlines()
    assert code == 2, stderr[-3000:]
    assert lines and lines[-1].startswith("llm-lightning: error:"), stderr[-3000:]
    assert sum(line.startswith("llm-lightning: error:") for line in lines) == 1
    for fragment in row["expect"]:
        assert fill(fragment, places) in lines[-1], lines[-1]
    assert not (tmp_path / "out").exists(), "a failed prepare must leave nothing behind"
