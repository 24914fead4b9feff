"""The Parquet and gzip/zstd compressed readers: same documents as plain files, bad input, discovery."""

from __future__ import annotations

import gzip
import io
import json
import random
import struct
import sys
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_lightning.data.sources import (
    DEFAULT_EXTENSIONS,
    find_files,
    iter_pieces,
    parquet,
    read_documents,
    streams,
    text,
)
from llm_lightning.errors import UserError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")

BLOCK = 100  # block_chars in these tests: several documents are longer


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def zst(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_checksum=True).compress(data)


COMPRESS = {".gz": gzip.compress, ".zst": zst}


def write_parquet(path: Path, columns: dict, row_group_size: int = 3, schema=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=schema), path, row_group_size=row_group_size)
    return path


def read(root: Path, files: list[str] | None = None, **kwargs) -> list[tuple]:
    """What the pieces say, less the progress bytes."""
    files = find_files(root) if files is None else files
    return [(p.text, p.doc, p.part, p.last) for p in iter_pieces(root, files, block_chars=BLOCK, **kwargs)]


def skip_all(root: Path, files: list[str] | None = None) -> tuple[list[str], list[dict]]:
    skipped: list[dict] = []
    files = find_files(root) if files is None else files
    texts = [
        p.text for p in iter_pieces(root, files, on_bad_input="skip", skipped=skipped, block_chars=BLOCK)
    ]
    return texts, skipped


LONG = "".join(f"line {i}: caf\u00e9 \u4e2d\u6587 and some words\n" for i in range(40))  # > BLOCK
TEXT = "\ufeff# Title\r\n\r\nCRLF kept, " + LONG + "no newline at the end"
DOCS = ["first", LONG, "", "third \u00e9", "x" * 250]  # "" makes no pieces; "x" * 250 is cut hard
JSONL = (
    "\n".join(
        [json.dumps({"text": DOCS[0], "id": 1}), "", json.dumps(DOCS[1])]
        + [json.dumps({"text": d}) for d in DOCS[2:]]
    )
    + "\n"
)
JSON = json.dumps([{"text": d} for d in DOCS])
CONTENT = {".txt": TEXT, ".md": TEXT, ".json": JSON, ".jsonl": JSONL}


# --- compressed text formats ----------------------------------------------------------------------


@pytest.mark.parametrize("suffix", list(COMPRESS))
@pytest.mark.parametrize("fmt", list(CONTENT))
@pytest.mark.parametrize("keep", [True, False], ids=["read-once", "checked-then-streamed"])
def test_compressed_files_give_the_pieces_of_the_plain_file(tmp_path, monkeypatch, fmt, suffix, keep):
    if not keep:  # a large file: checked in one pass, streamed in a second, in small chunks
        monkeypatch.setattr(text, "_KEEP_DECOMPRESSED", 0)
        monkeypatch.setattr(text, "_READ_CHUNK", 7)
        monkeypatch.setattr(text, "_CHECK_CHUNK", 5)
    raw = CONTENT[fmt].encode()
    write(tmp_path / "plain" / f"a{fmt}", raw)
    packed = write(tmp_path / "packed" / f"a{fmt}{suffix}", COMPRESS[suffix](raw))
    plain = read(tmp_path / "plain")
    assert read(tmp_path / "packed") == plain
    assert any(not last for *_, last in plain)  # a document was cut into blocks
    pieces = list(iter_pieces(tmp_path / "packed", [packed.name], block_chars=BLOCK))
    assert sum(p.nbytes for p in pieces) == packed.stat().st_size  # compressed bytes on disk
    assert all(p.nbytes >= 0 for p in pieces)


def test_compressed_documents_match_the_plain_ones_exactly(tmp_path):
    for fmt, content in CONTENT.items():
        plain = write(tmp_path / f"a{fmt}", content)
        for suffix, compress in COMPRESS.items():
            packed = write(tmp_path / f"a{fmt}{suffix}", compress(content.encode()))
            assert read_documents(packed) == read_documents(plain)
    assert read_documents(tmp_path / "a.txt.zst") == [TEXT.removeprefix("\ufeff")]


def test_zstd_frames_skippable_frames_and_streams_without_a_size(tmp_path, monkeypatch):
    monkeypatch.setattr(streams, "_ZSTD_INPUT", 3)  # frame and block boundaries inside reads
    data = JSONL.encode()
    half = len(data) // 2
    skippable = struct.pack("<II", 0x184D2A50, 4) + b"meta"
    streamed = io.BytesIO()
    with zstandard.ZstdCompressor().stream_writer(streamed, closefd=False) as writer:  # no content size
        writer.write(data)
    write(tmp_path / "plain" / "a.jsonl", data)
    write(tmp_path / "frames" / "a.jsonl.zst", zst(data[:half]) + skippable + zst(data[half:]))
    write(tmp_path / "stream" / "a.jsonl.zst", streamed.getvalue())
    assert read(tmp_path / "frames") == read(tmp_path / "stream") == read(tmp_path / "plain")


def test_gzip_of_several_members_and_empty_compressed_files(tmp_path):
    data = TEXT.encode()
    write(tmp_path / "plain" / "a.txt", data)
    write(tmp_path / "members" / "a.txt.gz", gzip.compress(data[:50]) + gzip.compress(data[50:]))
    assert read(tmp_path / "members") == read(tmp_path / "plain")
    for name, content in {
        "e.txt.gz": gzip.compress(b""),
        "e.jsonl.zst": zst(b""),
        "e.md.zst": b"",
        "e.jsonl.gz": b"",
    }.items():
        write(tmp_path / "empty" / name, content)
    assert read(tmp_path / "empty") == []


def test_compressed_jsonl_shares_its_compressed_bytes(tmp_path):
    lines = "".join(json.dumps({"text": f"document {i} " + "word " * (i % 50)}) + "\n" for i in range(3000))
    path = write(tmp_path / "a.jsonl.gz", gzip.compress(lines.encode()))
    pieces = list(iter_pieces(tmp_path, ["a.jsonl.gz"]))
    assert len(pieces) == 3000
    total = sum(p.nbytes for p in pieces)
    assert 0 < total <= path.stat().st_size and total > path.stat().st_size * 0.9


# --- Parquet -------------------------------------------------------------------------------------


def test_parquet_rows_give_the_pieces_of_the_same_jsonl(tmp_path):
    rows = [d for d in DOCS] + ["last \u00e9"]
    path = write_parquet(
        tmp_path / "pq" / "a.parquet", {"id": list(range(len(rows))), "text": rows}, row_group_size=2
    )
    write(tmp_path / "plain" / "a.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in rows))
    assert pq.ParquetFile(path).num_row_groups == 3
    assert read(tmp_path / "pq") == read(tmp_path / "plain")
    pieces = list(iter_pieces(tmp_path / "pq", ["a.parquet"], block_chars=BLOCK))
    assert sum(p.nbytes for p in pieces) == path.stat().st_size
    assert read_documents(path) == rows


def test_parquet_text_field_large_string_and_binary_columns(tmp_path):
    write_parquet(tmp_path / "a.parquet", {"body": ["x", "y"], "text": [1, 2]})
    write_parquet(
        tmp_path / "b.parquet",
        {"body": ["z"]},
        schema=pa.schema([("body", pa.large_string())]),
    )
    write_parquet(
        tmp_path / "c.parquet", {"body": ["caf\u00e9".encode()]}, schema=pa.schema([("body", pa.binary())])
    )
    cats = pa.table({"body": pa.array(["d1", "d2", "d1"]).dictionary_encode()})
    pq.write_table(cats, tmp_path / "d.parquet")
    assert [t for t, *_ in read(tmp_path, text_field="body")] == [
        "x",
        "y",
        "z",
        "caf\u00e9",
        "d1",
        "d2",
        "d1",
    ]


def test_parquet_is_read_one_row_group_at_a_time(tmp_path, monkeypatch):
    rows = [f"row {i} " + "w " * (i % 7) for i in range(1000)]
    write_parquet(tmp_path / "a.parquet", {"text": rows, "other": ["x" * 100] * 1000}, row_group_size=300)
    calls, batches = [], []
    original = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        for batch in original(self, *args, **kwargs):
            batches.append(batch.num_rows)
            yield batch

    def whole(*args, **kwargs):
        raise AssertionError("the whole file was read")

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    for name in ("read", "read_row_groups", "read_row_group"):
        monkeypatch.setattr(pq.ParquetFile, name, whole)
    monkeypatch.setattr(pq, "read_table", whole)
    stream = iter_pieces(tmp_path, ["a.parquet"])
    assert next(stream).text == rows[0]
    assert len(calls) == 1 and batches == [parquet._PARQUET_BATCH_ROWS]  # only what was needed so far
    assert [p.text for p in stream] == rows[1:]
    assert [c["row_groups"] for c in calls] == [[0], [1], [2], [3]]
    assert all(c["columns"] == ["text"] for c in calls)  # the text column only
    assert max(batches) <= parquet._PARQUET_BATCH_ROWS and sum(batches) == 1000


# --- memory --------------------------------------------------------------------------------------


def peak_while_reading(root: Path, files: list[str]) -> tuple[int, int]:
    tracemalloc.start()
    try:
        chars = sum(len(p.text) for p in iter_pieces(root, files))
        return chars, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_large_compressed_files_stream_in_flat_memory(tmp_path):
    rng = random.Random(0)
    words = [f"w{i}" for i in range(3000)]
    line = " ".join(rng.choice(words) for _ in range(2000))  # ~10 kB, compresses about 3x
    lines = [json.dumps({"text": f"{i} {line}"}) for i in range(1500)]  # ~16 MB
    data = ("\n".join(lines) + "\n").encode()
    write(tmp_path / "a.jsonl.zst", zst(data))
    write(tmp_path / "b.txt.gz", gzip.compress(data, compresslevel=1))  # > _KEEP_DECOMPRESSED: two passes
    write(tmp_path / "c.txt.zst", zst(b"\n".join([b"same line"] * 2_000_000)))  # 20 MB, 4000x smaller
    for name in ("a.jsonl.zst", "b.txt.gz", "c.txt.zst"):
        chars, peak = peak_while_reading(tmp_path, [name])
        assert chars > 15_000_000
        assert peak < 10_000_000, (name, peak)  # the files are 16-20 MB decompressed


# --- bad input ------------------------------------------------------------------------------------


def jsonl(n: int) -> bytes:
    return "".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(n)).encode()


def flipped(data: bytes, at: float = 0.5, n: int = 16) -> bytes:
    out = bytearray(data)
    start = int(len(data) * at)
    for i in range(start, start + n):
        out[i] ^= 0xFF
    return bytes(out)


def corrupt_second_row_group(path: Path) -> None:
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(0)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data = bytearray(path.read_bytes())
    data[start : start + chunk.total_compressed_size] = b"\xff" * chunk.total_compressed_size
    path.write_bytes(bytes(data))


TEXT_BYTES = b"".join(b"line %d of a long text file\n" % i for i in range(20000))  # ~560 kB
LATIN1 = "first line\nsecond\ncaf\xe9\n".encode("latin-1")


def parquet_bytes(tmp_path: Path, columns: dict, schema=None, row_group_size: int = 3) -> bytes:
    return write_parquet(tmp_path / "tmp.parquet", columns, row_group_size, schema).read_bytes()


def bad_cases(tmp: Path) -> dict[str, tuple[bytes, str, int | None]]:
    """name -> (content, what the error says, line in the skip record)."""
    null_rows = parquet_bytes(tmp, {"text": ["a", "b", None, "d"]})
    latin_row = parquet_bytes(tmp, {"text": [b"ok", b"caf\xe9"]}, schema=pa.schema([("text", pa.binary())]))
    raw = pa.array([b"fine", b"ok", b"caf\xe9"])  # a string column with bytes that are not UTF-8
    damaged = parquet_bytes(tmp, {"text": pa.Array.from_buffers(pa.string(), 3, raw.buffers()[:3])})
    no_column = parquet_bytes(tmp, {"body": ["a"], "id": [1]})
    numbers = parquet_bytes(tmp, {"text": [1, 2]})
    twice = pa.Table.from_arrays([pa.array(["a"]), pa.array(["b"])], names=["text", "text"])
    pq.write_table(twice, tmp / "twice.parquet")
    good = write_parquet(tmp / "rg.parquet", {"text": [f"r{i}" for i in range(9)]}, row_group_size=3)
    corrupt_second_row_group(good)
    return {
        "cut.txt.gz": (gzip.compress(TEXT_BYTES)[:-200], r"cut\.txt\.gz:\d+: gzip stream is truncated", None),
        "cut.md.zst": (zst(TEXT_BYTES)[:-200], r"cut\.md\.zst:\d+: zstd stream is truncated", None),
        "cut.jsonl.gz": (
            gzip.compress(jsonl(3000))[:-100],
            r"cut\.jsonl\.gz:\d+: gzip stream is truncated",
            None,
        ),
        "cut.jsonl.zst": (zst(jsonl(3000))[:-100], r"cut\.jsonl\.zst:\d+: zstd stream is truncated", None),
        "cut.json.gz": (
            gzip.compress(json.dumps(["a"] * 100).encode())[:-5],
            r"cut\.json\.gz:\d+: gzip .* truncated",
            1,
        ),
        "flip.txt.gz": (
            flipped(gzip.compress(TEXT_BYTES)),
            r"flip\.txt\.gz:\d+: gzip stream is corrupt",
            None,
        ),
        "flip.txt.zst": (flipped(zst(TEXT_BYTES)), r"flip\.txt\.zst:\d+: zstd stream is corrupt", None),
        "notgzip.jsonl.gz": (b"plain text, not gzip\n", r"notgzip\.jsonl\.gz:1: gzip stream is corrupt", 1),
        "notzstd.txt.zst": (b"plain text, not zstd\n", r"notzstd\.txt\.zst:1: zstd stream is corrupt", 1),
        "latin1.txt.gz": (gzip.compress(LATIN1), r"latin1\.txt\.gz:3: not UTF-8 text", 3),
        "latin1.md.zst": (zst(LATIN1), r"latin1\.md\.zst:3: not UTF-8 text", 3),
        "latin1.jsonl.zst": (
            zst(b'{"text": "a"}\n{"text": "caf\xe9"}\n'),
            r"latin1\.jsonl\.zst:2: not UTF-8",
            2,
        ),
        "latin1.json.gz": (gzip.compress(b'{"text":\n "caf\xe9"}'), r"latin1\.json\.gz:2: not UTF-8", 2),
        "line.jsonl.gz": (
            gzip.compress(b'{"text": "a"}\n{"text": 5}\n'),
            r"line\.jsonl\.gz:2: field 'text' is int",
            2,
        ),
        "notparquet.parquet": (
            b"PAR1 but not really",
            r"notparquet\.parquet: not a readable Parquet file",
            None,
        ),
        "half.parquet": (
            null_rows[: len(null_rows) // 2],
            r"half\.parquet: not a readable Parquet file",
            None,
        ),
        "nocolumn.parquet": (
            no_column,
            r"nocolumn\.parquet: Parquet file has no 'text' column \(its columns: 'body', 'id'\); "
            r"name the text column with --text_field",
            None,
        ),
        "twice.parquet": (
            (tmp / "twice.parquet").read_bytes(),
            r"twice\.parquet: Parquet file has 2 columns named 'text'",
            None,
        ),
        "numbers.parquet": (numbers, r"numbers\.parquet: column 'text' holds int64, not strings", None),
        "null.parquet": (null_rows, r"null\.parquet: row 2: 'text' is null", None),
        "latin1.parquet": (latin_row, r"latin1\.parquet: row 1: 'text' is not UTF-8 text", None),
        "damaged.parquet": (damaged, r"damaged\.parquet: row 2: 'text' is not UTF-8 text", None),
        "rowgroup.parquet": (good.read_bytes(), r"rowgroup\.parquet: row 3: corrupt Parquet data", None),
        "packed.parquet.gz": (
            gzip.compress(null_rows),
            r"packed\.parquet\.gz: a gzip-compressed Parquet file",
            None,
        ),
    }


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, tuple[bytes, str, int | None]]:
    return bad_cases(tmp_path_factory.mktemp("bad"))


BAD_NAMES = [
    "cut.txt.gz", "cut.md.zst", "cut.jsonl.gz", "cut.jsonl.zst", "cut.json.gz",
    "flip.txt.gz", "flip.txt.zst", "notgzip.jsonl.gz", "notzstd.txt.zst",
    "latin1.txt.gz", "latin1.md.zst", "latin1.jsonl.zst", "latin1.json.gz", "line.jsonl.gz",
    "notparquet.parquet", "half.parquet", "nocolumn.parquet", "twice.parquet", "numbers.parquet",
    "null.parquet", "latin1.parquet", "damaged.parquet", "rowgroup.parquet", "packed.parquet.gz",
]  # fmt: skip


def test_every_bad_case_is_listed(cases):
    assert sorted(cases) == sorted(BAD_NAMES)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_input_names_file_and_line_or_row(tmp_path, cases, name):
    content, message, _ = cases[name]
    write(tmp_path / name, content)
    files = find_files(tmp_path, [".gz", ".zst", ".parquet"])
    with pytest.raises(UserError, match=message) as error:
        list(iter_pieces(tmp_path, files))
    assert "--on_bad_input skip" in str(error.value) and "\n" not in str(error.value)
    assert str(error.value).isprintable()


def test_skip_mode_skips_and_records_each_bad_file_or_row(tmp_path, cases):
    for name, (content, _, _) in cases.items():
        write(tmp_path / name, content)
    write(tmp_path / "zz_good.txt.gz", gzip.compress(b"good"))
    got, skipped = skip_all(tmp_path, find_files(tmp_path, [".gz", ".zst", ".parquet"]))
    by_file = {Path(s["file"]).name: s for s in skipped}
    assert sorted(by_file) == sorted(cases) and len(skipped) == len(cases)
    for name, (_, _, line) in cases.items():
        if line is not None:
            assert by_file[name]["line"] == line, name
    assert by_file["null.parquet"]["reason"] == "row 2: 'text' is null"
    # Whole documents of bad text files are never given out in part; the lines and rows before
    # a bad one in JSONL and Parquet stay.
    assert not any(t.startswith("line ") for t in got)
    assert got[-1] == "good"
    assert [t for t in got if t.startswith("r")] == ["r0", "r1", "r2"]
    assert {"a", "d", "ok", "fine"} <= set(got)
    assert sum(t.startswith("document ") for t in got) > 0


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_a_text_file_bad_near_its_end_gives_out_nothing_when_skipped(tmp_path, monkeypatch, suffix):
    monkeypatch.setattr(text, "_KEEP_DECOMPRESSED", 0)
    data = TEXT_BYTES + b"caf\xe9\n"
    write(tmp_path / f"late{suffix[:-1]}.txt{suffix}", COMPRESS[suffix](data))
    write(tmp_path / f"cut.txt{suffix}", COMPRESS[suffix](TEXT_BYTES)[:-50])
    got, skipped = skip_all(tmp_path)
    assert got == [] and len(skipped) == 2
    late = next(s for s in skipped if "late" in s["file"])
    assert late["line"] == 20001 and late["reason"] == "not UTF-8 text"


def test_a_zstd_window_over_128_mib_is_refused_with_a_reason(tmp_path):
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=28, enable_ldm=True)
    packed = io.BytesIO()
    with zstandard.ZstdCompressor(compression_params=params).stream_writer(packed, closefd=False) as writer:
        writer.write(b"hello\n" * 100)
    write(tmp_path / "long.txt.zst", packed.getvalue())
    with pytest.raises(UserError, match=r"long\.txt\.zst:1: zstd stream is too big to decode .*128 MiB"):
        list(iter_pieces(tmp_path, ["long.txt.zst"]))


def test_missing_packages_are_named(tmp_path, monkeypatch):
    write(tmp_path / "a.jsonl.zst", zst(b'"x"\n'))
    write_parquet(tmp_path / "b.parquet", {"text": ["x"]})
    monkeypatch.setitem(sys.modules, "zstandard", None)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    for name, package in [("a.jsonl.zst", "zstandard"), ("b.parquet", "pyarrow")]:
        with pytest.raises(UserError, match=f"{name}: reading .* needs the {package} package; pip install"):
            list(iter_pieces(tmp_path, [name], on_bad_input="skip"))


FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
NEW_EXTENSIONS = [e for e in DEFAULT_EXTENSIONS if e not in (".txt", ".md", ".json", ".jsonl")]


@FUZZ
@given(
    content=st.binary(max_size=200),
    extension=st.sampled_from(NEW_EXTENSIONS),
    wrap=st.sampled_from(["raw", "compressed", "cut"]),
)
def test_random_bytes_never_crash_the_new_readers(tmp_path, content, extension, wrap):
    suffix = extension[extension.rindex(".") :]
    if wrap != "raw" and suffix in COMPRESS:
        content = COMPRESS[suffix](content)
        content = content[: len(content) // 2] if wrap == "cut" else content
    for old in tmp_path.glob("file*"):
        old.unlink()
    write(tmp_path / f"file{extension}", content)
    try:
        list(iter_pieces(tmp_path, find_files(tmp_path), block_chars=64))
    except UserError as error:
        assert "\n" not in str(error) and "file" in str(error)
    skipped: list[dict] = []
    list(iter_pieces(tmp_path, find_files(tmp_path), on_bad_input="skip", skipped=skipped, block_chars=64))


# --- finding files -------------------------------------------------------------------------------


NAMES = [
    "a.txt", "a.txt.gz", "a.md.zst", "a.json.GZ", "b.jsonl", "b.jsonl.gz", "b.jsonl.zst", "c.parquet",
    "d.csv", "d.csv.gz", "e.tar.gz", "f.jsonl.bz2", "g.txt.zst", "sub/h.JSONL.ZST",
]  # fmt: skip


@pytest.fixture
def mixed(tmp_path) -> Path:
    for name in NAMES:
        write(tmp_path / name, "x")
    return tmp_path


def test_default_extensions_take_every_format_and_compressed_form(mixed):
    assert DEFAULT_EXTENSIONS[:5] == (".txt", ".md", ".json", ".jsonl", ".parquet")
    assert {".txt.gz", ".md.gz", ".json.gz", ".jsonl.gz", ".txt.zst", ".jsonl.zst"} <= set(DEFAULT_EXTENSIONS)
    assert find_files(mixed) == sorted(
        ["a.txt", "a.txt.gz", "a.md.zst", "a.json.GZ", "b.jsonl", "b.jsonl.gz", "b.jsonl.zst", "c.parquet"]
        + ["g.txt.zst", "sub/h.JSONL.ZST"]
    )


@pytest.mark.parametrize(
    "extensions, expected",
    [
        ([".jsonl.zst"], ["b.jsonl.zst", "sub/h.JSONL.ZST"]),
        (["JSONL.gz"], ["b.jsonl.gz"]),
        ([".jsonl"], ["b.jsonl"]),  # not the compressed ones: a name ends with its last suffix
        ([".txt", ".parquet"], ["a.txt", "c.parquet"]),
        ([".gz"], ["a.json.GZ", "a.txt.gz", "b.jsonl.gz", "d.csv.gz", "e.tar.gz"]),
        ([".csv.gz", "csv"], ["d.csv", "d.csv.gz"]),
    ],
)
def test_multi_part_extensions_match_whole(mixed, extensions, expected):
    assert find_files(mixed, extensions) == expected


def test_other_compressed_extensions_are_plain_text(tmp_path):
    write(tmp_path / "notes.csv.gz", gzip.compress(b"a,b\n1,2\n"))
    write(tmp_path / "log.zst", zst(b"a log line\n"))
    assert read_documents(tmp_path / "notes.csv.gz") == ["a,b\n1,2\n"]
    assert [t for t, *_ in read(tmp_path, find_files(tmp_path, [".csv.gz", ".zst"]))] == [
        "a log line\n",
        "a,b\n1,2\n",
    ]


def test_no_match_and_bad_extension_messages(mixed, tmp_path):
    with pytest.raises(UserError, match=r"has no \.jsonl\.bz3 files; add some or change --extensions"):
        find_files(mixed, [".jsonl.bz3"])
    with pytest.raises(UserError, match=r"has no \.rst files \(plain or \.gz\) or \.log\.zst files;"):
        find_files(mixed, [".rst", ".rst.gz", ".log.zst"])
    with pytest.raises(UserError, match="--extensions"):
        find_files(mixed, ["jsonl..gz"])
    write(tmp_path / "logs" / "x.log", "x")
    with pytest.raises(
        UserError,
        match=r"has no \.txt \.md \.json \.jsonl files \(plain, \.gz or \.zst\) or \.parquet files;",
    ):
        find_files(tmp_path / "logs")


@pytest.mark.parametrize("name", ["cut.txt.gz", "cut.jsonl.gz"])
def test_a_truncated_stream_names_the_line_it_reached(tmp_path, name):
    lines = b"".join(json.dumps({"text": f"line {i}"}).encode() + b"\n" for i in range(3))
    write(tmp_path / name, gzip.compress(lines)[:-8])  # all the data, less the end marker
    got, skipped = skip_all(tmp_path)
    assert skipped == [{"file": str(tmp_path / name), "line": 4, "reason": skipped[0]["reason"]}] and skipped[
        0
    ]["reason"].startswith("gzip stream is truncated")
    assert got == ([] if name.endswith(".txt.gz") else ["line 0", "line 1", "line 2"])
