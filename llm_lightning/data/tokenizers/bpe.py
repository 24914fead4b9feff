"""`bpe`: byte-level BPE (GPT-2 style) trained with the `tokenizers` library.

Any text encodes, there is no unknown token, and `decode(encode(x)) == x` exactly. The
byte-level helpers here (GPT-2's byte-to-character table, the pre-tokenizer pair) are shared
with the tiktoken kind, which is the same algorithm under another split pattern.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizerModel

from llm_lightning.data.tokenizers.base import EOS_TOKEN


def train_byte_level_bpe(
    texts: Iterable[str], vocab_size: int, split_pattern: str | None = None
) -> HFTokenizerModel:
    """A byte-level BPE trained on a stream of texts (consumed once)."""
    hf = new_byte_level_bpe(split_pattern)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer)
    return hf


def new_byte_level_bpe(split_pattern: str | None, model=None) -> HFTokenizerModel:
    """A byte-level BPE; GPT-2's split regex, or `split_pattern` applied before the byte mapping."""
    hf = HFTokenizerModel(model or models.BPE())
    if split_pattern is None:
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split_pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    hf.decoder = decoders.ByteLevel()
    return hf


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE in `tokenizers`.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are mapped, in order, to
    the characters from U+0100 on.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table
