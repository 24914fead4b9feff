"""prepare gives the same bytes run to run in separate processes, for every tokenizer kind;
its defaults fit any max_length; symbolic links are followed, dangling ones are bad inputs."""

from __future__ import annotations

import json

import pytest

from llm_lightning.data.prepare import prepare
from tests.conftest import run_cli


def folder_bytes(folder) -> dict[str, bytes]:
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    metadata = json.loads(files.pop("metadata.json"))
    metadata.pop("input_dir")  # the one field that names where it ran
    return {**files, "metadata.json": json.dumps(metadata, sort_keys=True).encode()}


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "tiktoken"])
def test_two_separate_prepares_write_the_same_bytes(kind, corpus_dir, tmp_path):
    outputs = []
    for run in ("a", "b"):
        out = tmp_path / run
        result = run_cli("prepare", "--input_dir", corpus_dir, "--output_dir", out, "--tokenizer_type", kind,
                         "--vocab_size", 300, "--max_length", 32, "--num_workers", 1)  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        outputs.append(folder_bytes(out))
    assert outputs[0].keys() == outputs[1].keys()
    different = [name for name in outputs[0] if outputs[0][name] != outputs[1][name]]
    assert different == []


def test_the_default_stride_fits_any_max_length(corpus_dir, tmp_path):
    out = prepare(corpus_dir, tmp_path / "out", vocab_size=300, max_length=64, num_workers=0)
    assert json.loads((out / "metadata.json").read_text())["stride"] == 64  # min(1024, max_length)


def test_symbolic_links_are_followed_and_a_dangling_one_is_skipped_when_asked(corpus_dir, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "linked_folder").symlink_to(corpus_dir, target_is_directory=True)
    (raw / "dead.txt").symlink_to(tmp_path / "nothing.txt")
    (raw / "loop").symlink_to(raw, target_is_directory=True)  # a folder reached twice is read once
    out = prepare(raw, tmp_path / "out", vocab_size=300, max_length=32, num_workers=0, on_bad_input="skip")
    metadata = json.loads((out / "metadata.json").read_text())
    assert any(name.startswith("linked_folder/") for name in metadata["sources"])
    assert not any(name.startswith("loop/") for name in metadata["sources"])
    assert [s["file"] for s in metadata["skipped"]] == [str(raw / "dead.txt")]
    assert "symbolic link to nothing" in metadata["skipped"][0]["reason"]
