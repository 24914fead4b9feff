"""`llm-lightning merge-shards --output_dir OUT`: the N shards of a sharded prepare as one data folder.

`prepare --num_shards N --shard_index I` writes OUT/shard-I-of-N (a job array runs the N of
them anywhere). Once all are there, this checks that each is complete and that all share one
tokenizer (the fingerprint of its files) and the same settings, then writes OUT/metadata.json
describing their union (data/format.py, "merged folder"): the shard folders in order and the
totals. No token is copied; training memory-maps each shard's files. The shards' tokenizer
files (a few MB at most) are copied to OUT, so OUT is also a tokenizer folder (`--tokenizer
OUT`, and the tokenizer fingerprint training checks). Running it again rewrites the same files.
"""

from __future__ import annotations

import sys
from pathlib import Path

from llm_lightning.data.format import (
    MERGED_VERSION,
    METADATA_FILE,
    SHARD_NAME,
    merged_metadata,
    read_metadata,
    shard_name,
    write_metadata,
)
from llm_lightning.data.tokenizers import fingerprint, tokenizer_files
from llm_lightning.data.tokenizers.base import TOKENIZER_FILES
from llm_lightning.errors import ArgumentParser, UserError
from llm_lightning.io.atomic import write_text


def find_shards(output_dir: Path, num_shards: int | None = None) -> list[str]:
    """The names of all N shard folders, in order; a UserError naming the first missing one."""
    if not output_dir.is_dir():
        raise UserError(
            f"--output_dir {output_dir}: no such folder; run the shards' `llm-lightning prepare` first"
        )
    found = {p.name: SHARD_NAME.fullmatch(p.name) for p in output_dir.iterdir() if p.is_dir()}
    counts = sorted({int(match[2]) for match in found.values() if match})
    if num_shards is None:
        if not counts:
            raise UserError(
                f"--output_dir {output_dir} holds no shard-I-of-N folders; run `llm-lightning prepare "
                f"--num_shards N --shard_index I --output_dir {output_dir}` for I = 0..N-1 first"
            )
        if len(counts) > 1:
            raise UserError(
                f"--output_dir {output_dir} holds shards of {' and of '.join(map(str, counts))} shards; "
                "remove the stale ones or pass --num_shards"
            )
        num_shards = counts[0]
    names = [shard_name(index, num_shards) for index in range(num_shards)]
    for index, name in enumerate(names):
        folder = output_dir / name
        if not (folder / METADATA_FILE).is_file():
            running = sorted(output_dir.glob(f"{name}.tmp-*"))
            state = "incomplete (no metadata.json)" if folder.is_dir() else "missing"
            if running:
                state += f", and {running[0].name} is there: its prepare may still be running or was killed"
            raise UserError(
                f"{folder} is {state}; run `llm-lightning prepare --num_shards {num_shards} --shard_index {index} "
                f"--output_dir {output_dir} ...` (again), then merge-shards"
            )
    return names


def merge(output_dir: str | Path, num_shards: int | None = None) -> dict:
    """Check the shards of `output_dir` and write its merged metadata.json; return that metadata."""
    output_dir = Path(output_dir)
    names = find_shards(output_dir, num_shards)
    shards = [(name, read_metadata(output_dir / name, flag="shard")) for name in names]
    files = tokenizer_files(output_dir / names[0])
    mark = fingerprint(files)
    for name in names[1:]:
        theirs = fingerprint(tokenizer_files(output_dir / name))
        if theirs != mark:
            raise UserError(
                f"{output_dir / name} has another tokenizer ({theirs}) than {names[0]} ({mark}); prepare every "
                "shard with the same --tokenizer (from `prepare --tokenizer_only`)"
            )
    metadata = {**merged_metadata(shards), "tokenizer_fingerprint": mark}
    # Not complete while its parts change: the old metadata goes first, the new one comes last.
    (output_dir / METADATA_FILE).unlink(missing_ok=True)
    for name in TOKENIZER_FILES:
        if name not in files:
            (output_dir / name).unlink(missing_ok=True)  # left by an earlier merge of another kind
    for name, text in files.items():
        write_text(output_dir / name, text)
    write_metadata(output_dir, metadata, MERGED_VERSION)
    return metadata


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="llm-lightning merge-shards",
        description="Check the shards a sharded `prepare --num_shards N` wrote into OUT and describe them as one "
        "data folder (OUT/metadata.json; no data is copied), for --data.data_dir OUT.",
    )
    parser.add_argument(
        "--output_dir", required=True, metavar="OUT", help="the shards' --output_dir (required)"
    )
    parser.add_argument(
        "--num_shards",
        type=int,
        metavar="N",
        help="expect exactly N shards (default: the N in the folder names)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_shards is not None and args.num_shards < 1:
        raise UserError(f"--num_shards must be at least 1, not {args.num_shards}")
    metadata = merge(args.output_dir, args.num_shards)
    tokens, docs = metadata["num_tokens"], metadata["num_documents"]
    print(
        f"merged {len(metadata['shards'])} shards into {args.output_dir}: {metadata['num_files']} files, "
        f"{docs['train']:,} train + {docs['val']:,} val documents, {tokens['train']:,} train + {tokens['val']:,} "
        f"val tokens; train on it with --data.data_dir {args.output_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
