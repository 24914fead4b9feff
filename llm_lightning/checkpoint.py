"""Reading our checkpoints outside Lightning's own resume: safely, with clear errors.

Files are loaded with `weights_only=True` (no arbitrary unpickling). A checkpoint carries the
model's hyperparameters and, saved by TextDataModule, the tokenizer files and data metadata,
so generate and export need nothing but the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llm_lightning.errors import UserError
from llm_lightning.model import ModelConfig, Transformer

DATAMODULE_KEY = "TextDataModule"


def load_checkpoint(path: str | Path, flag: str = "--ckpt_path", mmap: bool = False) -> dict:
    """The checkpoint's dictionary; UserError for a missing, truncated, corrupt or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # noqa: BLE001 - garbage bytes fail deep inside the unpickler, in any way
        reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        raise UserError(
            f"{flag} {path}: not a readable checkpoint (truncated or corrupt?): {reason}"
        ) from None
    if (
        not isinstance(checkpoint, dict)
        or "state_dict" not in checkpoint
        or "hyper_parameters" not in checkpoint
    ):
        raise UserError(f"{flag} {path}: not an llm-lightning checkpoint (no state_dict / hyper_parameters)")
    if not any(key.startswith("model.") for key in checkpoint["state_dict"]):
        raise UserError(f"{flag} {path}: not an llm-lightning checkpoint (no transformer weights)")
    return checkpoint


def model_config(checkpoint: dict) -> ModelConfig:
    from llm_lightning.training.module import config_from_hparams

    return config_from_hparams(checkpoint["hyper_parameters"])


def load_model(checkpoint: dict, flag: str = "--ckpt_path") -> Transformer:
    """The trained Transformer (plain torch.nn, eval mode, on CPU) from a checkpoint dict."""
    config = model_config(checkpoint)
    model = Transformer(config)
    weights = {
        key.removeprefix("model.").replace("_orig_mod.", ""): value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith("model.")
    }
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise UserError(
            f"{flag}: weights do not fit the saved model config: {str(error).splitlines()[0]}"
        ) from None
    return model.eval()


def load_tokenizer(checkpoint: dict, flag: str = "--ckpt_path"):
    """The tokenizer the checkpoint was trained with (embedded by TextDataModule)."""
    from llm_lightning.data.tokenizer import load_tokenizer_from_files

    files = checkpoint.get(DATAMODULE_KEY, {}).get("tokenizer_files")
    if not files:
        raise UserError(f"{flag}: the checkpoint carries no tokenizer (not trained with TextDataModule)")
    return load_tokenizer_from_files(files)
