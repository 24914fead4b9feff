"""Reading our checkpoints outside Lightning's own resume: safely, with clear errors.

Files are loaded with `weights_only=True` (no arbitrary unpickling). A checkpoint carries the
model's resolved config (`model_config`) and hyperparameters and, saved by TextDataModule,
the tokenizer files and data metadata, so generate and export need nothing but the checkpoint.

Checkpoint format 2 (this version) fuses q/k/v by key/value group and interleaves gate/up
(model/layers.py); format 1 files (llm-lightning 0.1.0) had them stacked, and their weights are
converted when read here (`upgrade_weights`).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import torch

from llm_lightning.data.tokenizers import Tokenizer, load_tokenizer_from_files
from llm_lightning.errors import UserError
from llm_lightning.model import ModelConfig, Transformer
from llm_lightning.model.config import DATA_FIELDS
from llm_lightning.model.layers import fuse_gate_up, fuse_qkv

FORMAT = 2
FORMAT_KEY = "llm_lightning_format"
CONFIG_KEY = "model_config"  # the resolved ModelConfig, as a dict
DATAMODULE_KEY = "TextDataModule"
MODEL_PREFIX = "model."
LAST = "last.ckpt"
BEST = "best.ckpt"
SHARD_METADATA = ".metadata"  # what torch.distributed.checkpoint writes beside the shards
SHARD_META = "meta.pt"  # Lightning's: everything but weights and optimizer states


def load_checkpoint(path: str | Path, flag: str = "--ckpt_path", mmap: bool = False) -> dict:
    """The checkpoint's dictionary (a sharded folder consolidated in memory); UserError for a
    missing, truncated, corrupt or foreign file or folder."""
    path = Path(path)
    if path.is_dir():
        checkpoint = consolidate(path, flag)
    elif not path.is_file():
        raise UserError(f"{flag} {path}: no such file")
    else:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as error:  # noqa: BLE001 - garbage bytes fail deep inside the unpickler, in any way
            raise UserError(
                f"{flag} {path}: not a readable checkpoint (truncated or corrupt?): {_reason(error)}"
            ) from None
    check_is_ours(checkpoint, f"{flag} {path}")
    return checkpoint


def _reason(error: Exception) -> str:
    return str(error).splitlines()[0][:160] if str(error) else type(error).__name__


def read_config(path: str | Path, flag: str = "--ckpt_path") -> ModelConfig:
    """The model config of a checkpoint file or folder, without reading its weights."""
    return model_config(read_header(path, flag))


def read_header(path: str | Path, flag: str = "--ckpt_path") -> dict:
    """A checkpoint's dictionary without its weights (a folder: its checked meta.pt; a file: mmapped)."""
    path = Path(path)
    if not is_sharded(path):
        return load_checkpoint(path, flag, mmap=True)
    check_shards(path, flag)
    meta = torch.load(path / SHARD_META, map_location="cpu", weights_only=True)
    if not isinstance(meta, dict) or "hyper_parameters" not in meta:
        raise UserError(f"{flag} {path}: not an llm-lightning checkpoint (no hyper_parameters)")
    return meta


def is_sharded(path: str | Path) -> bool:
    """A folder written by the sharded strategy (per-rank shards and their metadata)."""
    path = Path(path)
    return path.is_dir() and (path / SHARD_METADATA).is_file()


def consolidate(folder: str | Path, flag: str = "--ckpt_path") -> dict:
    """A sharded checkpoint folder as the dictionary of one ordinary checkpoint, in CPU memory.

    No process group is needed: one process reads every rank's shards. The optimizer states
    (keyed by parameter name in the folder) get torch's positional ids, in the order of their
    parameter groups, so that one device or DDP resumes from the result as from any checkpoint.
    """
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    folder = Path(folder)
    if not is_sharded(folder):
        raise UserError(f"{flag} {folder}: a folder, but not a sharded checkpoint (no {SHARD_METADATA})")
    check_shards(folder, flag)
    try:
        checkpoint = _load_distributed_checkpoint(folder)
    except Exception as error:  # noqa: BLE001 - a damaged shard fails inside torch.distributed.checkpoint
        raise UserError(
            f"{flag} {folder}: not a readable sharded checkpoint (incomplete?): {_reason(error)}"
        ) from None
    names = sorted(
        (k for k in checkpoint if k.startswith("optimizer_") and k[10:].isdigit()), key=lambda k: int(k[10:])
    )
    checkpoint["optimizer_states"] = [optimizer_state_by_position(checkpoint.pop(name)) for name in names]
    return checkpoint


def check_shards(folder: str | Path, flag: str = "--ckpt_path") -> None:
    """UserError naming the damaged file of a sharded folder: an unreadable .metadata or meta.pt,
    or a shard missing or shorter than the metadata says (a copy or a save cut short).

    Checked before torch.distributed.checkpoint reads it, which fails deep inside (EOFError,
    AssertionError) or, on several ranks, on some ranks only.
    """
    from torch.distributed.checkpoint import FileSystemReader

    folder = Path(folder)
    try:
        metadata = FileSystemReader(folder).read_metadata()
        needed: dict[str, int] = {}
        for info in metadata.storage_data.values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    except Exception as error:  # noqa: BLE001 - a pickle of garbage fails in any way
        raise UserError(
            f"{flag} {folder / SHARD_METADATA}: not readable (damaged sharded checkpoint): {_reason(error)}"
        ) from None
    for name, size in sorted(needed.items()):
        shard = folder / name
        have = shard.stat().st_size if shard.is_file() else None
        if have is None or have < size:
            what = "missing" if have is None else f"truncated ({have} of {size} bytes)"
            raise UserError(f"{flag} {shard}: {what}; the sharded checkpoint is damaged")
    if (folder / SHARD_META).exists():
        try:
            torch.load(folder / SHARD_META, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001
            raise UserError(
                f"{flag} {folder / SHARD_META}: not readable (damaged sharded checkpoint): {_reason(error)}"
            ) from None


def optimizer_state_by_position(state: dict) -> dict:
    """An optimizer state keyed by parameter name -> torch's positional form (param-group order)."""
    order = [name for group in state["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    return {
        "state": {index[name]: value for name, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [index[n] for n in group["params"]]} for group in state["param_groups"]
        ],
    }


def check_is_ours(checkpoint, where: str) -> None:
    if (
        not isinstance(checkpoint, dict)
        or "state_dict" not in checkpoint
        or "hyper_parameters" not in checkpoint
    ):
        raise UserError(f"{where}: not an llm-lightning checkpoint (no state_dict / hyper_parameters)")
    if not any(key.startswith(MODEL_PREFIX) for key in checkpoint["state_dict"]):
        raise UserError(f"{where}: not an llm-lightning checkpoint (no transformer weights)")


def config_from_hparams(hparams) -> ModelConfig:
    """The ModelConfig that LanguageModel's hyperparameters describe (a preset plus overrides)."""
    overrides = {f.name: hparams.get(f.name) for f in fields(ModelConfig) if f.name not in DATA_FIELDS}
    return ModelConfig.from_preset(
        hparams.get("preset"),
        vocab_size=hparams["vocab_size"],
        max_seq_len=hparams["max_length"],
        **overrides,
    )


def model_config(checkpoint: dict) -> ModelConfig:
    """The config of the checkpoint's model (older files only have the hyperparameters)."""
    if CONFIG_KEY in checkpoint:
        return ModelConfig.from_dict(checkpoint[CONFIG_KEY])
    return config_from_hparams(checkpoint["hyper_parameters"])


def model_weights(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The Transformer's state dict (plain names, current layout) from a checkpoint."""
    weights = {
        key.removeprefix(MODEL_PREFIX).replace("_orig_mod.", ""): value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(MODEL_PREFIX)
    }
    return upgrade_weights(weights, model_config(checkpoint), checkpoint.get(FORMAT_KEY, 1))


def upgrade_weights(weights: dict[str, torch.Tensor], config: ModelConfig, version: int) -> dict:
    """Weights of an older checkpoint format in this version's layout."""
    if version >= FORMAT:
        return weights
    kv_dim = config.num_kv_heads * config.head_dim
    upgraded = dict(weights)
    for name, tensor in weights.items():
        if name.endswith("attn.qkv_proj.weight"):  # was [q | k | v]
            upgraded[name] = fuse_qkv(*tensor.split([config.hidden_size, kv_dim, kv_dim]), config)
        elif name.endswith("mlp.gate_up_proj.weight"):  # was [gate | up]
            upgraded[name] = fuse_gate_up(*tensor.chunk(2))
    return upgraded


def load_model(checkpoint: dict, flag: str = "--ckpt_path") -> Transformer:
    """The trained Transformer (plain torch.nn, eval mode, on CPU) from a checkpoint dict."""
    model = Transformer(model_config(checkpoint))
    try:
        model.load_state_dict(model_weights(checkpoint))
    except RuntimeError as error:
        raise UserError(
            f"{flag}: weights do not fit the saved model config: {str(error).splitlines()[0]}"
        ) from None
    return model.eval()


def load_tokenizer(checkpoint: dict, flag: str = "--ckpt_path") -> Tokenizer:
    """The tokenizer the checkpoint was trained with (embedded by TextDataModule)."""
    files = checkpoint.get(DATAMODULE_KEY, {}).get("tokenizer_files")
    if not files:
        raise UserError(f"{flag}: the checkpoint carries no tokenizer (not trained with TextDataModule)")
    return load_tokenizer_from_files(files)


def latest_checkpoint(folder: str | Path | None) -> Path | None:
    """last.ckpt, else the newest checkpoint_step_N of a folder; None when there is none."""
    if folder is None or not Path(folder).is_dir():
        return None
    folder = Path(folder)
    if (folder / LAST).exists():
        return folder / LAST
    steps = sorted(folder.glob("checkpoint_step_*.ckpt"), key=lambda p: _step_of(p.name))
    return steps[-1] if steps else None


def _step_of(name: str) -> int:
    digits = name.removeprefix("checkpoint_step_").removesuffix(".ckpt")
    return int(digits) if digits.isdigit() else -1
