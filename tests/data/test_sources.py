"""Reading raw text folders: file discovery, each format, block cutting and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_lightning.data.sources import cut_blocks, find_files, iter_pieces, read_documents
from llm_lightning.errors import UserError


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def texts(root: Path, **kwargs) -> list[str]:
    """Whole documents of a folder, joining the blocks of cut documents."""
    docs, current = [], ""
    for piece in iter_pieces(root, find_files(root), **kwargs):
        current += piece.text
        if piece.last:
            docs.append(current)
            current = ""
    return docs


# --- finding files ------------------------------------------------------------------------------


def test_files_are_found_recursively_in_sorted_order(tmp_path):
    for name in [
        "b.txt",
        "a/z.md",
        "a/b/c.json",
        "a/a.jsonl",
        "C.TXT",
        "skip.csv",
        ".hidden.txt",
        ".git/x.txt",
    ]:
        write(tmp_path / name, "x")
    assert find_files(tmp_path) == ["C.TXT", "a/a.jsonl", "a/b/c.json", "a/z.md", "b.txt"]
    assert find_files(tmp_path, ["md", ".JSON"]) == ["a/b/c.json", "a/z.md"]


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.mkdir(), "is empty"),
        (lambda root: write(root / "notes.csv", "a,b"), "has no .txt .md .json .jsonl files"),
        (lambda root: write(root, "I am a file"), "is not a folder"),
    ],
)
def test_missing_empty_or_unusable_input_folder(tmp_path, setup, message):
    root = tmp_path / "raw"
    setup(root)
    with pytest.raises(UserError, match=message):
        find_files(root)


def test_bad_extension_flag(tmp_path):
    write(tmp_path / "a.txt", "x")
    with pytest.raises(UserError, match="--extensions"):
        find_files(tmp_path, ["."])


# --- formats --------------------------------------------------------------------------------------


def test_each_format_and_nesting(tmp_path):
    write(tmp_path / "1.txt", "plain text\r\nwith CRLF kept\n")
    write(tmp_path / "2.md", "# Title\n\nbody")
    write(tmp_path / "3/object.json", json.dumps({"text": "one object", "id": 3}))
    write(tmp_path / "3/objects.json", json.dumps([{"text": "first"}, {"text": "second"}]))
    write(tmp_path / "3/strings.json", json.dumps(["s1", "s2"]))
    write(tmp_path / "4/deep/er/lines.jsonl", '{"text": "line one"}\n\n"line two"\n{"text": "l3", "x": 1}\n')
    assert texts(tmp_path) == [
        "plain text\r\nwith CRLF kept\n",
        "# Title\n\nbody",
        "one object",
        "first",
        "second",
        "s1",
        "s2",
        "line one",
        "line two",
        "l3",
    ]


def test_custom_text_field_bom_and_empty_documents(tmp_path):
    write(tmp_path / "a.jsonl", '{"body": "x"}\n{"body": ""}\n{"body": "y"}\n')
    write(tmp_path / "b.txt", "\ufeffafter a byte order mark")
    write(tmp_path / "c.txt", "")
    assert texts(tmp_path, text_field="body") == ["x", "y", "after a byte order mark"]
    pieces = list(iter_pieces(tmp_path, find_files(tmp_path), text_field="body"))
    assert [(p.source, p.doc) for p in pieces] == [("a.jsonl", 0), ("a.jsonl", 2), ("b.txt", 0)]


def test_read_documents_of_one_file(tmp_path):
    path = write(tmp_path / "a.json", json.dumps([{"text": "a"}, "b"]))
    assert read_documents(path) == ["a", "b"]


# --- cutting long documents into blocks ----------------------------------------------------------


def test_long_text_file_is_streamed_in_blocks_cut_at_line_breaks(tmp_path):
    text = "".join(f"line {i} of a long file\n" for i in range(2000))
    write(tmp_path / "big.txt", text)
    pieces = list(iter_pieces(tmp_path, find_files(tmp_path), block_chars=1000))
    assert "".join(p.text for p in pieces) == text
    assert [p.part for p in pieces] == list(range(len(pieces)))
    assert [p.last for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert all(500 <= len(p.text) <= 1000 and p.text.endswith("\n") for p in pieces[:-1])


@settings(max_examples=60, deadline=None)
@given(
    text=st.text(alphabet="ab \n", max_size=300),
    block=st.integers(min_value=1, max_value=40),
    chunk=st.integers(min_value=1, max_value=50),
)
def test_blocks_do_not_depend_on_how_text_arrives(text, block, chunk):
    whole = list(cut_blocks([text], block))
    chunked = list(cut_blocks([text[i : i + chunk] for i in range(0, len(text), chunk)], block))
    assert whole == chunked
    assert "".join(b for b, _ in whole) == text
    assert all(0 < len(b) <= block for b, _ in whole)
    assert [last for _, last in whole] == [False] * (len(whole) - 1) + [True] * bool(text)


# --- bad input ------------------------------------------------------------------------------------


BAD_FILES = {
    "bad.json": ('{"text": "fine",\n  "oops" }', "bad.json:2: malformed JSON"),
    "bad.jsonl": ('{"text": "ok"}\n{"text": "ok"}\n{"text": \n', "bad.jsonl:3: malformed JSON"),
    "nofield.json": ('{"body": "x"}', "nofield.json: JSON object has no 'text' field"),
    "nofield.jsonl": ('{"text": "a"}\n{"body": "x"}\n', "nofield.jsonl:2: JSON object has no 'text' field"),
    "number.json": ("[1]", "item 0: expected an object"),
    "notstring.jsonl": ('{"text": 5}\n', "field 'text' is int"),
    "latin1.txt": ("first line\ncaf\xe9\n".encode("latin-1"), "latin1.txt:2: not UTF-8 text"),
    "latin1.jsonl": ('{"text": "a"}\n{"text": "caf\xe9"}\n'.encode("latin-1"), "latin1.jsonl:2: not UTF-8"),
    "latin1.json": ('{"text": "caf\xe9"}'.encode("latin-1"), "latin1.json:1: not UTF-8"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_input_names_file_and_line(tmp_path, name):
    content, message = BAD_FILES[name]
    write(tmp_path / name, content)
    with pytest.raises(UserError, match=message) as error:
        list(iter_pieces(tmp_path, find_files(tmp_path)))
    assert "--on_bad_input skip" in str(error.value) and "\n" not in str(error.value)


def test_skip_mode_skips_and_records_bad_files_and_lines(tmp_path):
    for name, (content, _) in BAD_FILES.items():
        write(tmp_path / name, content)
    write(tmp_path / "good.txt", "good")
    skipped = []
    got = [p.text for p in iter_pieces(tmp_path, find_files(tmp_path), on_bad_input="skip", skipped=skipped)]
    # The good lines of partly bad JSONL files stay; whole bad files go.
    assert got == ["ok", "ok", "good", "a", "a"]
    assert len(skipped) == len(BAD_FILES)
    by_file = {Path(s["file"]).name: s for s in skipped}
    assert by_file["bad.jsonl"]["line"] == 3 and "malformed JSON" in by_file["bad.jsonl"]["reason"]
    assert by_file["latin1.txt"]["line"] == 2 and by_file["nofield.json"]["line"] is None
