"""A model and its tokenizer for evaluation, from any checkpoint form this project writes."""

from __future__ import annotations

import json
from pathlib import Path

from llm_lightning.data.tokenizers import Tokenizer, load_tokenizer_from_files, tokenizer_files
from llm_lightning.errors import UserError
from llm_lightning.io.checkpoint import load_checkpoint, load_model, load_tokenizer
from llm_lightning.model import Transformer
from llm_lightning.model.hf import CONFIG_FILE, config_from_hf, load_hf_weights


def is_exported(path: Path) -> bool:
    """A folder written by `llm-lightning export` (a Hugging Face Llama folder)."""
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def load_for_eval(path: str | Path, flag: str = "--ckpt_path") -> tuple[Transformer, Tokenizer]:
    """(model in eval mode on the CPU, tokenizer) from a .ckpt file, a sharded checkpoint folder
    (consolidated in memory) or an exported folder; UserError naming `flag` otherwise."""
    path = Path(path)
    if is_exported(path):
        return _load_exported(path, flag)
    checkpoint = load_checkpoint(path, flag)  # a file, or a sharded folder consolidated
    tokenizer = load_tokenizer(checkpoint, f"{flag} {path}")
    return load_model(checkpoint, f"{flag} {path}"), tokenizer


def _load_exported(folder: Path, flag: str) -> tuple[Transformer, Tokenizer]:
    try:
        config = config_from_hf(json.loads((folder / CONFIG_FILE).read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise UserError(f"{flag} {folder}/{CONFIG_FILE}: not a Llama config ({error})") from None
    try:
        files = tokenizer_files(folder)
    except UserError:
        raise UserError(f"{flag} {folder}: the folder carries no tokenizer files; export it again") from None
    model = Transformer(config)
    load_hf_weights(model, folder, flag)
    return model.eval(), load_tokenizer_from_files(files)
