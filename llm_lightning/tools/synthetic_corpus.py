"""Generated corpora for benchmarks: English-like synthetic text, or runs of a real file's lines.

`fmt` "plain": documents go, about 30% of them, one per .txt/.md file in nested folders and
the rest as 1 MB .jsonl files, so a benchmark reads the formats users bring. "jsonl.zst" and
"parquet": every document in ~1 MB (of text) files the way hubs ship corpora, zstd-compressed
JSON lines or Parquet with row groups of `PARQUET_ROWS` rows. The documents are the same in
every format (same seed, same part), so each format's figures measure the same text.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from llm_lightning.errors import UserError

FORMATS = ("plain", "jsonl.zst", "parquet")
PARQUET_ROWS = 256  # rows per row group (hub files use more; several groups per file here)
FILE_BYTES = 1 << 20  # text per .jsonl/.jsonl.zst/.parquet file

_COMMON = """the of and to a in is it you that he was for on are with as I his they be at one have this
from or had by hot word but what some we can out other were all there when up use your how said an each she
which do their time if will way about many then them write would like so these her long make thing see him two
has look more day could go come did number sound no most people my over know water than call first who may down
side been now find any new work part take get place made live where after back little only round man year came
show every good me give our under name very through just form sentence great think say help low line differ turn
cause much mean before move right boy old too same tell does set three want air well also play small end put home
read hand port large spell add even land here must big high such follow act why ask men change went light kind
off need house picture try us again animal point mother world near build self earth father head stand own page
should country found answer school grow study still learn plant cover food sun four between state keep eye never
last let thought city tree cross farm hard start might story saw far sea draw left late run don't while press
close night real life few north 1998 2024 42 3.5 100 12"""
COMMON_WORDS = _COMMON.split()


def synthetic_documents(rng: random.Random, vocabulary_seed: int) -> Callable[[], str]:
    """A function making one English-like document: common words and a long tail of made-up ones.

    The vocabulary depends only on `vocabulary_seed`, so corpora of different sizes (and
    documents drawn by different `rng`s) share it, as parts of one language would.
    """
    vocab_rng = random.Random(vocabulary_seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwyz" for v in ("a", "e", "i", "o", "u", "ai", "ou", "ee")]
    made_up = {
        "".join(vocab_rng.choice(syllables) for _ in range(vocab_rng.randint(1, 4))) for _ in range(30000)
    }
    words = COMMON_WORDS + sorted(made_up)
    words += [w.capitalize() for w in vocab_rng.sample(words, len(words) // 10)]  # names
    cumulative, total = [], 0.0
    for rank in range(len(words)):
        total += 1 / (rank + 10) ** 1.05  # Zipf-like frequencies
        cumulative.append(total)

    def sentence() -> str:
        chosen = rng.choices(words, cum_weights=cumulative, k=rng.randint(4, 22))
        chosen[0] = chosen[0].capitalize()
        if len(chosen) > 9:
            chosen[len(chosen) // 2] += ","
        return " ".join(chosen) + rng.choice(".....?!")

    def document() -> str:
        paragraphs = (
            " ".join(sentence() for _ in range(rng.randint(2, 9))) for _ in range(rng.randint(1, 8))
        )
        return "\n\n".join(paragraphs) + "\n"

    return document


def source_documents(rng: random.Random, text: str) -> Callable[[], str]:
    """A function making one document from `text`: a run of its lines, some with words shuffled."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise UserError("--source has no text; give a text file")

    def document() -> str:
        start = rng.randrange(len(lines))
        run = lines[start : start + rng.randint(10, 120)]
        out = []
        for line in run:
            if rng.random() < 0.3:
                words = line.split()
                rng.shuffle(words)
                line = " ".join(words)
            out.append(line)
        return "\n".join(out) + "\n"

    return document


def write_corpus(
    folder: Path, size_bytes: int, seed: int, source: Path | None = None, part: int = 0, fmt: str = "plain"
) -> None:
    """About `size_bytes` of documents in format `fmt` (see the module docstring).

    `part` picks other documents of the same language (same `seed`).
    """
    if fmt not in FORMATS:
        raise UserError(f"--formats: {fmt!r} is not one of {', '.join(FORMATS)}")
    rng = random.Random(f"{seed}-{part}")
    if source:
        make = source_documents(rng, source.read_text(encoding="utf-8"))
    else:
        make = synthetic_documents(rng, vocabulary_seed=seed)
    written, batch, batch_bytes, n = 0, [], 0, 0
    while written < size_bytes:
        doc = make()
        size = len(doc.encode("utf-8"))
        if rng.random() < 0.3 and fmt == "plain":  # drawn in every format: the same documents
            ext = ".md" if n % 5 == 0 else ".txt"
            path = folder / f"docs/{n % 7}/{n % 3}/doc{n:06d}{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(doc, encoding="utf-8")
        else:
            batch.append({"text": doc, "id": n})
            batch_bytes += size
            if batch_bytes >= FILE_BYTES:
                _write_file(folder, batch, fmt)
                batch, batch_bytes = [], 0
        written += size
        n += 1
    if batch:
        _write_file(folder, batch, fmt)


def _write_file(folder: Path, rows: list[dict], fmt: str) -> None:
    kind = "parquet" if fmt == "parquet" else "jsonl"
    (folder / kind).mkdir(parents=True, exist_ok=True)
    path = (
        folder / kind / f"part{len(list((folder / kind).iterdir())):05d}.{'jsonl' if fmt == 'plain' else fmt}"
    )
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=PARQUET_ROWS)
        return
    data = ("\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n").encode("utf-8")
    if fmt == "jsonl.zst":
        import zstandard

        data = zstandard.ZstdCompressor(level=3).compress(data)
    path.write_bytes(data)
