"""`llm-lightning prepare` end to end on tiny corpora made in the test."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from llm_lightning import cli
from llm_lightning.data.format import token_dtype
from llm_lightning.data.prepare import encode as prepare_encode
from llm_lightning.data.prepare import prepare
from llm_lightning.data.prepare import write as prepare_write
from llm_lightning.data.prepare.encode import encode_pieces
from llm_lightning.data.sources import find_files, iter_pieces
from llm_lightning.data.tokenizers import EOS_TOKEN, load_tokenizer
from llm_lightning.errors import UserError

WORD_LIST = (
    "the of and to in is was that for on with as by at from it this be are or an have not but "
    "river stone light winter garden window market letter silver morning quiet ancient village "
    "they said I'm don't we've 42 2024 café naïve , . ; ! ?"
)
WORDS = WORD_LIST.split()
SMALL = {"vocab_size": 300, "max_length": 32, "stride": 16, "num_workers": 0, "progress": False}


def make_corpus(root: Path, n_docs: int = 60, seed: int = 0) -> list[str]:
    """Documents in every format and a few folder levels; document i starts with "doc{i}"."""
    rng = random.Random(seed)
    docs = [
        f"doc{i:03d} "
        + " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))
        + rng.choice(["", "\n"])
        for i in range(n_docs)
    ]
    docs[7] += f" a literal {EOS_TOKEN} in the text"
    json_docs, jsonl_docs = [], []
    for i, doc in enumerate(docs):
        if i % 4 == 0:
            write(root / f"txt/part{i % 3}/doc{i:03d}.txt", doc)
        elif i % 4 == 1:
            write(root / f"md/doc{i:03d}.md", doc)
        elif i % 4 == 2:
            json_docs.append({"text": doc, "id": i})
        else:
            jsonl_docs.append(json.dumps({"text": doc}))
    write(root / "json/a/b/list.json", json.dumps(json_docs))
    write(root / "json/lines.jsonl", "\n".join(jsonl_docs) + "\n")
    return docs


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def tokens(out: Path, split: str) -> np.ndarray:
    metadata = json.loads((out / "metadata.json").read_text())
    return np.fromfile(out / "dataset" / f"{split}.bin", dtype=metadata["dtype"])


def documents(out: Path, split: str) -> list[str]:
    """The split's text, cut at end-of-text ids."""
    tok, ids = load_tokenizer(out), tokens(out, split)
    ends = np.flatnonzero(ids == tok.eos_id)
    assert len(ends) and ends[-1] == len(ids) - 1, "every split ends with end-of-text"
    return [tok.decode(part[:-1]) for part in np.split(ids, ends + 1)[:-1]]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


@pytest.fixture
def raw(tmp_path) -> Path:
    make_corpus(tmp_path / "raw")
    return tmp_path / "raw"


# --- the output ---------------------------------------------------------------------------------


def test_layout_metadata_and_every_document_once(tmp_path, raw, capsys):
    docs = make_corpus(raw)
    out = prepare(raw, tmp_path / "out", val_fraction=0.2, **SMALL)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "dataset/train.bin",
        "dataset/val.bin",
        "metadata.json",
        "tokenizer.json",
        "tokenizer_meta.json",
    ]
    meta = json.loads((out / "metadata.json").read_text())
    tok = load_tokenizer(out)
    assert meta["format_version"] == 1 and meta["tokenizer_type"] == "bpe"
    assert (meta["vocab_size"], meta["eos_id"], meta["dtype"]) == (tok.vocab_size, tok.eos_id, "uint16")
    assert (meta["max_length"], meta["stride"], meta["val_fraction"], meta["seed"]) == (32, 16, 0.2, 1337)
    for split in ("train", "val"):
        assert meta["num_tokens"][split] == len(tokens(out, split)) > 33
        assert meta["num_documents"][split] == len(documents(out, split))
    assert meta["sources"] == ["json/a/b/list.json", "json/lines.jsonl"] + sorted(
        f"md/doc{i:03d}.md" for i in range(1, 60, 4)
    ) + sorted(f"txt/part{i % 3}/doc{i:03d}.txt" for i in range(0, 60, 4))
    assert meta["skipped"] == [] and meta["num_files"] == len(meta["sources"])
    # Each document exactly once, whole, in one split; a literal "<|endoftext|>" stays text.
    assert sorted(documents(out, "train") + documents(out, "val")) == sorted(docs)
    assert leftovers(tmp_path) == []
    assert f"prepared {out}" in capsys.readouterr().out


def test_same_output_for_any_worker_count(tmp_path, raw, monkeypatch):
    monkeypatch.setattr(prepare_encode, "BATCH_CHARS", 700)  # many batches, so order matters
    outs = [prepare(raw, tmp_path / f"w{n}", **{**SMALL, "num_workers": n}) for n in (0, 1, 2)]
    for out in outs[1:]:
        for name in ("dataset/train.bin", "dataset/val.bin", "tokenizer.json", "metadata.json"):
            assert (out / name).read_bytes() == (outs[0] / name).read_bytes(), name


def test_no_val_document_in_train(tmp_path, raw):
    out = prepare(raw, tmp_path / "out", val_fraction=0.3, seed=5, **SMALL)
    train = {doc.split()[0] for doc in documents(out, "train")}
    val = {doc.split()[0] for doc in documents(out, "val")}
    assert len(val) >= 5 and train.isdisjoint(val) and len(train | val) == 60


def test_one_big_file_is_cut_into_blocks_that_tile_it(tmp_path):
    rng = random.Random(1)
    text = "".join(" ".join(rng.choice(WORDS) for _ in range(12)) + f" line{n}\n" for n in range(800))
    write(tmp_path / "raw/book.txt", text)
    out = prepare(tmp_path / "raw", tmp_path / "out", val_fraction=0.2, block_chars=2000, **SMALL)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["num_documents"]["val"] > 1 and meta["num_documents"]["train"] > 1
    # Runs of consecutive blocks in one split are separated by end-of-text; together the runs
    # of both splits tile the book exactly, so no text is in both.
    runs = documents(out, "train") + documents(out, "val")
    starts = sorted((text.index(run), len(run)) for run in runs)
    assert [start for start, _ in starts] == list(np.cumsum([0] + [n for _, n in starts[:-1]]))
    assert sum(n for _, n in starts) == len(text)


def test_val_is_topped_up_to_one_window(tmp_path, raw):
    out = prepare(raw, tmp_path / "out", val_fraction=1e-6, **SMALL)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["val_documents_moved_from_train"] >= 1
    assert meta["num_tokens"]["val"] >= 33 and meta["num_documents"]["val"] == len(documents(out, "val"))
    assert meta["num_documents"]["train"] == len(documents(out, "train"))  # train still ends with eos
    assert sum(meta["num_documents"].values()) == 60


@pytest.mark.parametrize("kind", ["wordpiece", "tiktoken"])
def test_other_tokenizer_kinds(tmp_path, raw, kind):
    docs = make_corpus(raw)
    out = prepare(raw, tmp_path / "out", tokenizer_type=kind, val_fraction=0.2, **SMALL)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["tokenizer_type"] == kind == load_tokenizer(out).kind
    assert (out / "tokenizer.tiktoken").exists() == (kind == "tiktoken")
    if kind == "tiktoken":
        assert sorted(documents(out, "train") + documents(out, "val")) == sorted(docs)


def test_reusing_a_tokenizer_gives_the_same_tokens(tmp_path, raw):
    first = prepare(raw, tmp_path / "first", **SMALL)
    again = prepare(raw, tmp_path / "again", tokenizer=first, **SMALL)
    for name in ("tokenizer.json", "dataset/train.bin", "dataset/val.bin"):
        assert (first / name).read_bytes() == (again / name).read_bytes()
    assert json.loads((again / "metadata.json").read_text())["tokenizer"]["source"] == "loaded"
    with pytest.raises(UserError, match="is a bpe tokenizer, not wordpiece"):
        prepare(raw, tmp_path / "third", tokenizer=first, tokenizer_type="wordpiece", **SMALL)


def test_worker_failures_become_user_errors(tmp_path, raw):
    out = prepare(raw, tmp_path / "out", **SMALL)
    tok = load_tokenizer(out)
    pieces = list(iter_pieces(raw, find_files(raw)))
    # A text the tokenizer rejects (a lone surrogate) fails inside the worker.
    with pytest.raises(UserError, match="encoding failed in a worker process"):
        list(encode_pieces(tok, [*pieces[:3], dataclasses.replace(pieces[3], text="\ud800")], num_workers=1))
    # A worker that cannot even start breaks the pool: an error, not a hang.
    tok.files = lambda: {"tokenizer_meta.json": "{}"}
    with pytest.raises(UserError, match="worker process died"):
        list(encode_pieces(tok, pieces, num_workers=1))


def test_token_dtype():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


# --- bad input: one line, exit code 2, nothing written --------------------------------------------


def bad_corpus(name: str, content: str | bytes):
    return lambda raw: (make_corpus(raw), write(raw / name, content))


BAD = {
    "missing input": (lambda raw: None, [], "does not exist"),
    "empty input": (lambda raw: raw.mkdir(), [], "is empty"),
    "no matching files": (lambda raw: write(raw / "a.csv", "x"), [], "has no .txt .md .json .jsonl files"),
    "malformed json": (
        bad_corpus("z/bad.json", '[{"text": "a"},\n {"text": }]'),
        [],
        "bad.json:2: malformed JSON",
    ),
    "malformed jsonl": (
        bad_corpus("bad.jsonl", '{"text": "a"}\n{"text"\n'),
        [],
        "bad.jsonl:2: malformed JSON",
    ),
    "missing field": (
        bad_corpus("x.jsonl", '{"body": "a"}\n'),
        [],
        "x.jsonl:1: JSON object has no 'text' field",
    ),
    "not utf-8": (
        bad_corpus("latin.txt", "ok\nna\xefve".encode("latin-1")),
        [],
        "latin.txt:2: not UTF-8 text",
    ),
    "stride 0": (make_corpus, ["--stride", "0"], "--stride must be between 1 and --max_length"),
    "stride > max_length": (make_corpus, ["--stride", "33"], "--stride must be between 1 and --max_length"),
    "max_length 0": (make_corpus, ["--max_length", "0", "--stride", "1"], "--max_length must be at least 1"),
    "vocab too small": (make_corpus, ["--vocab_size", "100"], "--vocab_size 100 is too small for bpe"),
    "vocab too small wordpiece": (
        make_corpus,
        ["--vocab_size", "20", "--tokenizer_type", "wordpiece"],
        "too small for wordpiece",
    ),
    "vocab absurd": (make_corpus, ["--vocab_size", "5000000"], "--vocab_size 5000000 is absurdly large"),
    "val_fraction": (make_corpus, ["--val_fraction", "0"], "--val_fraction must be above 0"),
    "too little text": (make_corpus, ["--max_length", "100000", "--stride", "10"], "too little text"),
    "tiktoken not cached": (make_corpus, ["--tiktoken_encoding", "cl100k_base"], "not in the tiktoken cache"),
    "tokenizer folder": (make_corpus, ["--tokenizer", "."], "has no tokenizer_meta.json"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, case, capsys, monkeypatch):
    setup, extra, message = BAD[case]
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    setup(tmp_path / "raw")
    out = tmp_path / "new" / "out"
    argv = ["prepare", "--input_dir", str(tmp_path / "raw"), "--output_dir", str(out)]
    argv += ["--vocab_size", "300", "--max_length", "32", "--stride", "16", "--num_workers", "0", *extra]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("llm-lightning: error: ") and message in err, err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    "where, message",
    [
        ("raw/out", "is inside --input_dir"),
        ("raw", "is inside --input_dir"),
        ("existing", "pass --overwrite"),
    ],
)
def test_bad_output_folder(tmp_path, raw, where, message, capsys):
    write(tmp_path / "existing/notes.txt", "mine")
    argv = ["prepare", "--input_dir", str(raw), "--output_dir", str(tmp_path / where), "--vocab_size", "300"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (raw / "out").exists() and (tmp_path / "existing/notes.txt").read_text() == "mine"


ALL_FLAGS = (
    "--input_dir --output_dir --tokenizer_type --vocab_size --max_length --stride --num_workers --val_fraction "
    "--seed --extensions --text_field --json_text_field --tokenizer --tiktoken_encoding --on_bad_input --overwrite "
    "--tokenizer_train_chars"
)


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["prepare", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for flag in ALL_FLAGS.split():
        assert flag in out


def test_argparse_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["prepare", "--input_dir", "x", "--output_dir", "y", "--tokenizer_type", "unigram"])
    assert exit_info.value.code == 2 and "--tokenizer_type" in capsys.readouterr().err


def test_an_error_from_the_real_command_has_no_traceback(tmp_path, raw):
    write(raw / "broken.jsonl", '{"text": "fine"}\nnot json\n')
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    argv = ["prepare", "--input_dir", str(raw), "--output_dir", str(tmp_path / "out"), "--vocab_size", "300"]
    result = subprocess.run(
        [sys.executable, "-m", "llm_lightning", *argv], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "broken.jsonl:2: malformed JSON" in result.stderr
    assert not (tmp_path / "out").exists()


# --- skip mode, overwrite, interruption ---------------------------------------------------------


def test_skip_mode_skips_counts_and_reports(tmp_path, raw, capsys):
    docs = make_corpus(raw)
    write(raw / "bad/broken.json", "{not json")
    write(raw / "bad/lines.jsonl", '{"text": "kept line"}\n{"nope": 1}\n{"text": \n')
    write(raw / "bad/latin.md", b"caf\xe9")
    out = prepare(raw, tmp_path / "out", on_bad_input="skip", val_fraction=0.2, **SMALL)
    skipped = json.loads((out / "metadata.json").read_text())["skipped"]
    assert [(Path(s["file"]).name, s["line"]) for s in skipped] == [
        ("broken.json", 1),
        ("latin.md", 1),
        ("lines.jsonl", 2),
        ("lines.jsonl", 3),
    ]
    assert sorted(documents(out, "train") + documents(out, "val")) == sorted([*docs, "kept line"])
    assert "skipped 4 bad files or lines" in capsys.readouterr().err


def test_overwrite_replaces_only_a_prepare_output(tmp_path, raw):
    out = prepare(raw, tmp_path / "out", seed=1, **SMALL)
    with pytest.raises(UserError, match="pass --overwrite"):
        prepare(raw, out, **SMALL)
    prepare(raw, out, seed=2, overwrite=True, **SMALL)
    assert json.loads((out / "metadata.json").read_text())["seed"] == 2
    write(tmp_path / "mine/precious.txt", "keep me")
    with pytest.raises(UserError, match="not a prepare output"):
        prepare(raw, tmp_path / "mine", overwrite=True, **SMALL)
    (tmp_path / "empty").mkdir()
    prepare(raw, tmp_path / "empty", **SMALL)  # an empty folder is just filled
    assert leftovers(tmp_path) == []


def test_interrupted_run_keeps_the_old_output(tmp_path, raw, monkeypatch):
    out = prepare(raw, tmp_path / "out", seed=1, **SMALL)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_write.SplitWriter, "finish", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(raw, out, seed=2, overwrite=True, **SMALL)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert leftovers(tmp_path) == []


KILLED_RUN = """
import sys, time
from pathlib import Path
from llm_lightning.data import prepare as p
from llm_lightning.io.atomic import AtomicFolder

def stuck(folder):  # killed after metadata.json is written, before the rename
    Path(sys.argv[3]).write_text("ready")
    time.sleep(120)

AtomicFolder.commit = stuck
p.prepare(sys.argv[1], sys.argv[2], seed=2, overwrite=True, vocab_size=300, max_length=32, stride=16,
          num_workers=0, progress=False)
"""


def test_killed_run_leaves_no_metadata_and_old_output_intact(tmp_path, raw):
    out = prepare(raw, tmp_path / "out", seed=1, **SMALL)
    old_metadata = (out / "metadata.json").read_text()
    marker = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    script = textwrap.dedent(KILLED_RUN)
    proc = subprocess.Popen([sys.executable, "-c", script, str(raw), str(out), str(marker)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the run never got to the end"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (out / "metadata.json").read_text() == old_metadata
    stale = leftovers(tmp_path)
    assert len(stale) == 1 and (tmp_path / stale[0] / "metadata.json").exists()
    prepare(raw, tmp_path / "other", **SMALL)  # unrelated name: its stale folder stays
    assert leftovers(tmp_path) == stale
    prepare(raw, out, seed=3, overwrite=True, **SMALL)  # the next run on this output cleans up
    assert leftovers(tmp_path) == []
    assert json.loads((out / "metadata.json").read_text())["seed"] == 3
