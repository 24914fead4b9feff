"""`llm-lightning export`: a checkpoint -> a Hugging Face Llama folder, and the way back.

The folder holds what `transformers.AutoModelForCausalLM.from_pretrained` and
`transformers.AutoTokenizer.from_pretrained` read:

- config.json             LlamaForCausalLM config (model/hf.py), end-of-text as bos/eos
- model.safetensors       the weights in Llama names (q/k/v and gate/up split apart)
- generation_config.json  eos and the sampling defaults of `llm-lightning generate`
- tokenizer.json, tokenizer_config.json, special_tokens_map.json
                          a PreTrainedTokenizerFast for every tokenizer kind (each kind
                          saves a `tokenizers` file); our tokenizer_meta.json (and, for
                          tiktoken, tokenizer.tiktoken) ride along, so the folder is also a
                          tokenizer folder for `llm-lightning prepare --tokenizer`.

`transformers` is not needed to export. The folder is written under a temporary sibling name
and renamed at the end, so an interrupted export never leaves a folder that looks complete.
`load_hf_weights` reads such a folder back into our Transformer (`--model.init_from`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from llm_lightning.errors import UserError
from llm_lightning.model import Transformer
from llm_lightning.model.hf import config_from_hf, from_hf_state_dict, hf_config, to_hf_state_dict

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "[UNK]"
# Shape fields that must agree between an exported folder and the model it initialises.
SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "intermediate_size",
    "tie_embeddings",
    "rope_theta",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tokenizer_config(kind: str, max_length: int) -> tuple[dict, dict]:
    """tokenizer_config.json and special_tokens_map.json for our tokenizer.json."""
    special = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN}
    if kind == "wordpiece":
        special["unk_token"] = UNK_TOKEN
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        # Our decode keeps text as the model produced it; no BERT-style space clean-up.
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        **special,
    }
    return config, special


def export_files(checkpoint: dict, dtype: str = "float32") -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Everything the folder holds: file name -> text, and the safetensors weights."""
    from llm_lightning.checkpoint import DATAMODULE_KEY, load_model, load_tokenizer

    model = load_model(checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    config = model.config
    texts = dict(checkpoint[DATAMODULE_KEY]["tokenizer_files"])  # tokenizer.json, meta, tiktoken ranks
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(
            f"--ckpt_path: the tokenizer has {tokenizer.vocab_size} ids but the model only {config.vocab_size}"
        )

    model_config = hf_config(config, eos_id=tokenizer.eos_id)
    model_config["torch_dtype"] = dtype
    model_config["dtype"] = dtype  # the key's name in transformers 5
    generation = {
        "bos_token_id": tokenizer.eos_id,
        "eos_token_id": tokenizer.eos_id,
        "do_sample": True,
        "temperature": 0.8,
        "max_new_tokens": 100,
    }
    tok_config, special = tokenizer_config(tokenizer.kind, config.max_seq_len)
    texts.update(
        {
            CONFIG: _json(model_config),
            "generation_config.json": _json(generation),
            "tokenizer_config.json": _json(tok_config),
            "special_tokens_map.json": _json(special),
        }
    )
    # Clones: q/k/v (and gate/up) are views into one fused weight, and safetensors refuses
    # tensors that share memory.
    weights = {name: t.to(DTYPES[dtype]).clone().contiguous() for name, t in to_hf_state_dict(model).items()}
    return texts, weights


def _json(data: dict) -> str:
    return json.dumps(data, indent=2) + "\n"


def write_folder(
    output_dir: Path, texts: dict[str, str], weights: dict[str, torch.Tensor], overwrite: bool
) -> None:
    """Write into a temporary sibling folder, then rename it to output_dir (atomic)."""
    from safetensors.torch import save_file

    _check_output(output_dir, overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        for name, text in texts.items():
            (work / name).write_text(text, encoding="utf-8")
        save_file(weights, str(work / WEIGHTS), metadata={"format": "pt"})
        _make_readable(work)
        if output_dir.exists():  # --overwrite: the old folder stays until the new one is complete
            old = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
            output_dir.rename(old)
            work.rename(output_dir)
            shutil.rmtree(old)
        else:
            work.rename(output_dir)
    finally:
        if work.exists():
            shutil.rmtree(work)


def _make_readable(folder: Path) -> None:
    """Give the folder and its files the usual permissions (mkdtemp makes them private)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _check_output(output_dir: Path, overwrite: bool) -> None:
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise UserError(f"--output_dir {output_dir}: exists and is not a folder")
    if any(output_dir.iterdir()) and not overwrite:
        raise UserError(f"--output_dir {output_dir}: already exists; pass --overwrite to replace it")


def export(
    ckpt_path: str | Path, output_dir: str | Path, overwrite: bool = False, dtype: str = "float32"
) -> Path:
    """Export a checkpoint to a Hugging Face Llama folder; returns the folder."""
    from llm_lightning.checkpoint import load_checkpoint

    output_dir = Path(output_dir)
    _check_output(output_dir, overwrite)  # before the slow part: fail fast
    texts, weights = export_files(load_checkpoint(ckpt_path), dtype)
    write_folder(output_dir, texts, weights, overwrite)
    return output_dir


def load_hf_weights(model: Transformer, folder: str | Path, flag: str = "--model.init_from") -> None:
    """Copy the weights of an exported Llama folder into `model` (continued pretraining).

    The folder's config.json must describe the same shape as `model.config`; the context
    length may differ (rotary embeddings extend).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise UserError(
            f"{flag} {folder}: needs {CONFIG} and {WEIGHTS} (a folder written by `llm-lightning export`)"
        )
    try:
        theirs = config_from_hf(json.loads((folder / CONFIG).read_text()))
    except (json.JSONDecodeError, KeyError, TypeError, UserError) as error:
        raise UserError(f"{flag} {folder}/{CONFIG}: not a Llama config ({error})") from None
    ours = model.config
    differ = [name for name in SHAPE_FIELDS if getattr(theirs, name) != getattr(ours, name)]
    if differ:
        have = ", ".join(f"{n}={getattr(theirs, n)}" for n in differ)
        want = ", ".join(f"{n}={getattr(ours, n)}" for n in differ)
        raise UserError(
            f"{flag} {folder}: the exported model has {have} but this run's model has {want}; "
            "pass the same model sizes (and data prepared with the same tokenizer)"
        )
    try:
        state = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError) as error:
        raise UserError(f"{flag} {folder}/{WEIGHTS}: unreadable ({error})") from None
    try:
        model.load_state_dict(from_hf_state_dict(state, ours))
    except KeyError as error:
        raise UserError(f"{flag} {folder}/{WEIGHTS}: missing tensor {error}") from None
    except RuntimeError as error:
        raise UserError(f"{flag} {folder}/{WEIGHTS}: {str(error).splitlines()[-1].strip()}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-lightning export",
        description="Write a checkpoint as a Hugging Face Llama folder (transformers loads it).",
    )
    parser.add_argument("--ckpt_path", required=True, help="a .ckpt file written by `llm-lightning fit`")
    parser.add_argument("--output_dir", required=True, help="folder to create")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument(
        "--dtype", choices=tuple(DTYPES), default="float32", help="weights' dtype (default float32)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    folder = export(args.ckpt_path, args.output_dir, args.overwrite, args.dtype)
    files = sorted(p.name for p in folder.iterdir())
    print(f"exported {args.ckpt_path} -> {folder}/ ({', '.join(files)})")
    print(f"load it with: transformers.AutoModelForCausalLM.from_pretrained({str(folder)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
