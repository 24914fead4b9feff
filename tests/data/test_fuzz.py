"""Fuzzing the readers and the prepare pipeline: whatever the input, a UserError or a result.

Random bytes, random JSON shapes, huge single lines and empty files must never raise anything
but the project's UserError (one line, exit 2 at the CLI), and with on_bad_input="skip" must
not raise at all while reading.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_lightning.data.prepare import prepare
from llm_lightning.data.sources import cut_blocks, find_files, iter_pieces
from llm_lightning.errors import UserError

EXTENSIONS = [".txt", ".md", ".json", ".jsonl"]
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(["text", "t", ""]), children, max_size=3)
    ),
    max_leaves=12,
)


def read_all(folder: Path, on_bad_input: str) -> list:
    skipped: list[dict] = []
    pieces = list(
        iter_pieces(folder, find_files(folder), on_bad_input=on_bad_input, skipped=skipped, block_chars=64)
    )
    return pieces


def fresh(tmp_path: Path) -> Path:
    folder = tmp_path / "raw"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    return folder


@FUZZ
@given(content=st.binary(max_size=300), extension=st.sampled_from(EXTENSIONS))
def test_random_bytes_never_crash_the_readers(tmp_path, content, extension):
    folder = fresh(tmp_path)
    (folder / f"file{extension}").write_bytes(content)
    try:
        read_all(folder, "error")
    except UserError as error:
        assert "\n" not in str(error) and "file" in str(error)
    read_all(folder, "skip")  # skipping never raises


@FUZZ
@given(value=json_values, as_lines=st.booleans())
def test_random_json_shapes_never_crash_the_readers(tmp_path, value, as_lines):
    folder = fresh(tmp_path)
    if as_lines:
        (folder / "data.jsonl").write_text(json.dumps(value) + "\n" + json.dumps(value) + "\n")
    else:
        (folder / "data.json").write_text(json.dumps(value))
    try:
        pieces = read_all(folder, "error")
    except UserError as error:
        assert "data.json" in str(error)
    else:
        assert all(isinstance(piece.text, str) and piece.text for piece in pieces)
    read_all(folder, "skip")


@settings(max_examples=40, deadline=None)
@given(
    text=st.text(min_size=0, max_size=2000),
    block=st.integers(min_value=1, max_value=300),
    pieces=st.integers(min_value=1, max_value=7),
)
def test_blocks_rebuild_the_document_whatever_the_chunking(text, block, pieces):
    step = max(1, len(text) // pieces)
    chunks = [text[i : i + step] for i in range(0, len(text), step)]
    blocks = list(cut_blocks(chunks, block))
    assert "".join(b for b, _ in blocks) == text
    assert all(len(b) <= block for b, _ in blocks)
    assert blocks == list(cut_blocks([text], block))


def test_huge_single_line_and_empty_files(tmp_path):
    folder = fresh(tmp_path)
    line = "word " * 400_000  # 2 MB without a newline
    (folder / "huge.txt").write_text(line)
    (folder / "empty.txt").write_text("")
    (folder / "empty.jsonl").write_text("")
    pieces = list(iter_pieces(folder, find_files(folder), block_chars=32768))
    assert "".join(p.text for p in pieces) == line
    assert max(len(p.text) for p in pieces) <= 32768


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    documents=st.lists(st.text(max_size=400), max_size=12),
    kind=st.sampled_from(["bpe", "tiktoken", "wordpiece"]),
)
def test_prepare_on_random_corpora_succeeds_or_says_why(tmp_path, documents, kind):
    folder = fresh(tmp_path)
    output = tmp_path / "out"
    shutil.rmtree(output, ignore_errors=True)
    for i, doc in enumerate(documents):
        (folder / f"doc{i}.txt").write_text(doc)
    if not documents:
        (folder / "placeholder.md").write_text("")
    try:
        prepare(
            input_dir=folder,
            output_dir=output,
            tokenizer_type=kind,
            vocab_size=300,
            max_length=8,
            stride=8,
            num_workers=0,
            val_fraction=0.2,
            seed=0,
        )
    except UserError as error:
        assert "\n" not in str(error)
        assert not output.exists() or not (output / "metadata.json").exists()
    else:
        metadata = json.loads((output / "metadata.json").read_text())
        assert metadata["num_tokens"]["val"] >= 9 and metadata["num_tokens"]["train"] >= 9


@pytest.mark.parametrize("payload", ["[1, 2, 3]", '{"text": 5}', '[{"text": "ok"}, 7]', "nul\x00l"])
def test_odd_json_documents_are_user_errors(tmp_path, payload):
    folder = fresh(tmp_path)
    (folder / "odd.json").write_text(payload)
    with pytest.raises(UserError, match="odd.json"):
        read_all(folder, "error")
