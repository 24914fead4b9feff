"""`llm-lightning export`: a checkpoint -> a Hugging Face Llama folder.

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

`transformers` is not needed to export. The folder is written beside its target and renamed
at the end (io.atomic), so an interrupted export never leaves a folder that looks complete;
`--overwrite` replaces only an earlier export, never a folder of other files.
`model/hf.py:load_hf_weights` reads such a folder back (`--model.init_from`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from llm_lightning.data.tokenizers import EOS_TOKEN, TOKENIZER_FILES, UNK_TOKEN
from llm_lightning.errors import ArgumentParser, UserError
from llm_lightning.io.atomic import AtomicFolder
from llm_lightning.io.checkpoint import DATAMODULE_KEY, load_checkpoint, load_model, load_tokenizer
from llm_lightning.model.hf import CONFIG_FILE, WEIGHTS_FILE, hf_config, to_hf_state_dict

GENERATION_CONFIG = "generation_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
EXPORT_FILES = {
    CONFIG_FILE,
    WEIGHTS_FILE,
    GENERATION_CONFIG,
    TOKENIZER_CONFIG,
    SPECIAL_TOKENS_MAP,
    *TOKENIZER_FILES,
}
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
            CONFIG_FILE: _json(model_config),
            GENERATION_CONFIG: _json(generation),
            TOKENIZER_CONFIG: _json(tok_config),
            SPECIAL_TOKENS_MAP: _json(special),
        }
    )
    # Clones: q/k/v (and gate/up) are views into one fused weight, and safetensors refuses
    # tensors that share memory.
    weights = {name: t.to(DTYPES[dtype]).clone().contiguous() for name, t in to_hf_state_dict(model).items()}
    return texts, weights


def _json(data: dict) -> str:
    return json.dumps(data, indent=2) + "\n"


def write_folder(output_dir: Path, texts: dict[str, str], weights: dict[str, torch.Tensor]) -> None:
    """Write the folder beside output_dir, then rename it into place (the old one goes only then)."""
    from safetensors.torch import save_file

    try:
        with AtomicFolder(output_dir) as folder:
            for name, text in texts.items():
                (folder.work / name).write_text(text, encoding="utf-8")
            save_file(weights, str(folder.work / WEIGHTS_FILE), metadata={"format": "pt"})
            folder.commit()
    except OSError as error:  # unwritable, read-only, no such device
        raise UserError(
            f"--output_dir {output_dir}: cannot write there ({error.strerror}); choose another folder"
        ) from None


def check_output(output_dir: Path, overwrite: bool, ckpt_path: Path) -> None:
    """Refuse to touch anything that is not an empty folder or, with --overwrite, an earlier export."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise UserError(f"--output_dir {output_dir}: exists and is not a folder")
    present = {path.name for path in output_dir.iterdir()}
    if not present:
        return
    if not overwrite:
        raise UserError(f"--output_dir {output_dir}: already exists; pass --overwrite to replace it")
    foreign = sorted(present - EXPORT_FILES)
    if foreign or CONFIG_FILE not in present or output_dir.resolve() == ckpt_path.resolve().parent:
        shown = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "") if foreign else "no config.json"
        raise UserError(
            f"--output_dir {output_dir}: not an earlier export ({shown}); --overwrite only replaces a folder "
            "written by `llm-lightning export`; choose another folder"
        )


def export(
    ckpt_path: str | Path, output_dir: str | Path, overwrite: bool = False, dtype: str = "float32"
) -> Path:
    """Export a checkpoint to a Hugging Face Llama folder; returns the folder."""
    output_dir, ckpt_path = Path(output_dir), Path(ckpt_path)
    check_output(output_dir, overwrite, ckpt_path)  # before the slow part: fail fast
    texts, weights = export_files(load_checkpoint(ckpt_path), dtype)
    write_folder(output_dir, texts, weights)
    return output_dir


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
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
