"""The prepared-data format: what `prepare` and `merge-shards` write and training reads, in one place.

A prepared folder (format 1), from `prepare`, and also each shard of a sharded prepare:

    OUT/
      tokenizer.json, tokenizer_meta.json (+ tokenizer.tiktoken)   the tokenizer (tokenizers/)
      dataset/train.bin, dataset/val.bin                           flat token ids, uint16 or uint32
      metadata.json                                                written last: "complete"

A merged folder (format 2), from `merge-shards` over the N outputs of `prepare --num_shards N`:

    OUT/
      shard-0-of-N/ ... shard-<N-1>-of-N/      prepared folders, 1/N of the corpus each
      tokenizer.json, ...                      the shards' (identical) tokenizer, copied: OUT is a
                                               tokenizer folder too (`prepare --tokenizer OUT`)
      metadata.json                            `shards` (the folders, in order), the totals

Token files hold the ids of whole documents, each followed by the end-of-text id, in the
narrowest unsigned dtype that holds the vocabulary (`token_dtype`). metadata.json records how
the folder was made (`REQUIRED_KEYS` at least) and is written last and atomically, so its
presence means the folder is complete. A merged folder copies no token data: `split_files`
gives a split as its list of token files, one per shard, and training reads them as one split
whose windows never cross from one file into the next. `read_metadata` reads both kinds and
checks that a merged folder's shards are still complete and the size they were when merged;
`merged_metadata` holds the rule of what shards must share (`SHARD_SETTINGS`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from llm_lightning.errors import UserError
from llm_lightning.io.atomic import write_json

PREPARED_VERSION = 1  # a prepared folder
MERGED_VERSION = 2  # a merged folder (older readers refuse it: "written by a newer llm-lightning")
FORMAT_VERSION = MERGED_VERSION  # the newest this reader reads
METADATA_FILE = "metadata.json"
DATASET_DIR = "dataset"
SPLITS = ("train", "val")
REQUIRED_KEYS = ("vocab_size", "max_length", "stride", "dtype", "eos_id")
# What every shard of one merged folder must share: the same tokenizer and the same settings,
# so that the union is what one prepare of the whole corpus makes.
SHARD_SETTINGS = (
    "tokenizer_fingerprint", "tokenizer_type", "vocab_size", "eos_id", "dtype", "max_length", "stride",
    "val_fraction", "seed", "block_chars", "extensions", "text_field",
)  # fmt: skip
SHARD_NAME = re.compile(r"shard-(\d+)-of-(\d+)")
_COUNTS = ("num_documents", "num_tokens", "num_bytes")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def split_file(split: str) -> str:
    """The token file of a split, relative to the prepared folder."""
    return f"{DATASET_DIR}/{split}.bin"


def split_path(data_dir: str | Path, split: str) -> Path:
    return Path(data_dir) / split_file(split)


def shard_name(index: int, count: int) -> str:
    """`shard-I-of-N`: the folder `prepare --num_shards N --shard_index I` writes inside OUT."""
    return f"shard-{index}-of-{count}"


def is_merged(metadata: dict) -> bool:
    return "shards" in metadata


def split_files(data_dir: str | Path, metadata: dict, split: str) -> list[Path]:
    """The token files of a split, in order: one, or one per shard of a merged folder."""
    if is_merged(metadata):
        return [split_path(Path(data_dir) / shard, split) for shard in metadata["shards"]]
    return [split_path(data_dir, split)]


def write_metadata(folder: str | Path, metadata: dict, version: int = PREPARED_VERSION) -> None:
    """metadata.json, atomically; call it last."""
    write_json(Path(folder) / METADATA_FILE, {"format_version": version, **metadata})


def read_metadata(data_dir: str | Path, flag: str = "--data.data_dir") -> dict:
    """metadata.json of a complete prepared or merged folder; UserError naming `flag` otherwise."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"{flag} {data_dir}: no such folder; run `llm-lightning prepare` first")
    path = data_dir / METADATA_FILE
    if not path.is_file():
        shards = (
            " (it holds shards: run `llm-lightning merge-shards --output_dir` on it)"
            if _has_shards(data_dir)
            else ""
        )
        raise UserError(
            f"{flag} {data_dir}: no {METADATA_FILE}, so this is not a complete `llm-lightning prepare` "
            f"output (or preparing was interrupted){shards}; run prepare again"
        )
    metadata = _load(path, "run prepare again")
    if is_merged(metadata):
        _check_shards(data_dir, metadata)
        return metadata
    for split in SPLITS:
        if not split_path(data_dir, split).is_file():
            raise UserError(f"{split_path(data_dir, split)} is missing; run prepare again")
    return metadata


def _load(path: Path, fix: str) -> dict:
    try:
        metadata = json.loads(path.read_text())
        missing = [key for key in REQUIRED_KEYS if key not in metadata]
    except (OSError, json.JSONDecodeError, TypeError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: unreadable metadata ({error}); {fix}") from None
    if missing:
        raise UserError(f"{path}: incomplete metadata (no {', '.join(missing)}); {fix}")
    if metadata.get("format_version", PREPARED_VERSION) > FORMAT_VERSION:
        raise UserError(
            f"{path}: written by a newer llm-lightning (format {metadata['format_version']}); upgrade"
        )
    return metadata


def _has_shards(folder: Path) -> bool:
    return any(SHARD_NAME.fullmatch(p.name) for p in folder.iterdir() if p.is_dir())


def _check_shards(data_dir: Path, metadata: dict) -> None:
    """A merged folder's shards are complete and hold what they held when merged."""
    fix = f"run `llm-lightning merge-shards --output_dir {data_dir}` again"
    shards, counts = metadata.get("shards"), metadata.get("shard_tokens")
    if (
        not isinstance(shards, list)
        or not shards
        or not isinstance(counts, list)
        or len(counts) != len(shards)
    ):
        raise UserError(f"{data_dir / METADATA_FILE}: a merged folder without a valid list of shards; {fix}")
    itemsize = np.dtype(metadata["dtype"]).itemsize
    for name, tokens in zip(shards, counts, strict=True):
        if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
            raise UserError(f"{data_dir / METADATA_FILE}: {name!r} is not a shard folder name; {fix}")
        shard = data_dir / name
        if not (shard / METADATA_FILE).is_file():
            raise UserError(
                f"{shard} is missing or incomplete (no {METADATA_FILE}); prepare it again, then {fix}"
            )
        for split in SPLITS:
            path = split_path(shard, split)
            size = path.stat().st_size if path.is_file() else -1
            if size != tokens[split] * itemsize:
                raise UserError(f"{path} is missing or has changed since the merge; {fix}")


def merged_metadata(shards: list[tuple[str, dict]]) -> dict:
    """The metadata of a merged folder over `(folder name, its metadata)` of every shard, in order.

    Raises a UserError naming the first shard whose tokenizer or settings differ from shard 0's.
    """
    (first_name, first), count = shards[0], len(shards)
    for name, metadata in shards:
        shard = metadata.get("shard") or {}
        if shard.get("count") != count or shard_name(shard.get("index", -1), count) != name:
            raise UserError(
                f"{name}: its metadata says it is not shard {name} (it records {shard or 'no shard'}); "
                f"prepare it again with --num_shards {count}"
            )
        if shard.get("corpus") != first["shard"].get("corpus"):
            raise UserError(
                f"{name} was prepared from other input files than {first_name} (names or sizes changed between "
                "their runs); prepare every shard again from the same, unchanging --input_dir"
            )
        for key in SHARD_SETTINGS:
            if metadata.get(key) != first.get(key):
                raise UserError(
                    f"{name} differs from {first_name} in {key} ({metadata.get(key)!r} vs {first.get(key)!r}): every "
                    "shard must be prepared with the same flags and --tokenizer; prepare it again"
                )
    totals = {
        key: {split: sum(m.get(key, {}).get(split, 0) for _, m in shards) for split in SPLITS}
        for key in _COUNTS
    }
    return {
        "kind": "merged",
        "shards": [name for name, _ in shards],
        "shard_tokens": [m["num_tokens"] for _, m in shards],
        **{key: first.get(key) for key in SHARD_SETTINGS},
        **totals,
        "val_documents_moved_from_train": 0,  # a sharded prepare never tops val up (see prepare)
        "tokenizer": first.get("tokenizer"),
        "input_dir": first.get("input_dir"),
        "num_files": first["shard"].get("corpus_files"),
        "sharded_by": first["shard"].get("by"),
        # Shards cut by document all read every file, so each lists the same bad lines: once.
        "skipped": list(
            {
                json.dumps(item, sort_keys=True): item for _, m in shards for item in m.get("skipped", [])
            }.values()
        ),
    }
