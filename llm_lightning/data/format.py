"""The prepared-data format: what `prepare` writes and training reads, in one place.

    OUT/
      tokenizer.json, tokenizer_meta.json (+ tokenizer.tiktoken)   the tokenizer (tokenizers/)
      dataset/train.bin, dataset/val.bin                           flat token ids, uint16 or uint32
      metadata.json                                                written last: "complete"

Token files hold the ids of whole documents, each followed by the end-of-text id, in the
narrowest unsigned dtype that holds the vocabulary (`token_dtype`). metadata.json records how
the folder was made (`REQUIRED_KEYS` at least) and is written last and atomically, so its
presence means the folder is complete.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from llm_lightning.errors import UserError
from llm_lightning.io.atomic import write_json

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
DATASET_DIR = "dataset"
SPLITS = ("train", "val")
REQUIRED_KEYS = ("vocab_size", "max_length", "stride", "dtype", "eos_id")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def split_file(split: str) -> str:
    """The token file of a split, relative to the prepared folder."""
    return f"{DATASET_DIR}/{split}.bin"


def split_path(data_dir: str | Path, split: str) -> Path:
    return Path(data_dir) / split_file(split)


def write_metadata(folder: str | Path, metadata: dict) -> None:
    """metadata.json, atomically; call it last."""
    write_json(Path(folder) / METADATA_FILE, {"format_version": FORMAT_VERSION, **metadata})


def read_metadata(data_dir: str | Path, flag: str = "--data.data_dir") -> dict:
    """metadata.json of a complete prepared folder; UserError naming `flag` otherwise."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"{flag} {data_dir}: no such folder; run `llm-lightning prepare` first")
    path = data_dir / METADATA_FILE
    if not path.is_file():
        raise UserError(
            f"{flag} {data_dir}: no {METADATA_FILE}, so this is not a complete `llm-lightning prepare` "
            "output (or preparing was interrupted); run prepare again"
        )
    try:
        metadata = json.loads(path.read_text())
        missing = [key for key in REQUIRED_KEYS if key not in metadata]
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: unreadable metadata ({error}); run prepare again") from None
    if missing:
        raise UserError(f"{path}: incomplete metadata (no {', '.join(missing)}); run prepare again")
    if metadata.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise UserError(
            f"{path}: written by a newer llm-lightning (format {metadata['format_version']}); upgrade"
        )
    for split in SPLITS:
        if not split_path(data_dir, split).is_file():
            raise UserError(f"{split_path(data_dir, split)} is missing; run prepare again")
    return metadata
