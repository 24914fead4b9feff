"""`wordpiece`: BERT-style WordPiece, trained so that the same text always gives the same file.

Normalizer (case and accents kept) and pre-tokenizer are BERT's; the decoder is WordPiece's.
It round-trips up to that normalization: whitespace is collapsed, control characters dropped,
and characters never seen in training become `[UNK]`.

Why not `tokenizers`' own WordPieceTrainer: it numbers the `##` continuation pieces in the
order of a Rust hash map, which is seeded anew in every process, and breaks ties between
equally frequent merges by those numbers, so two runs on the same corpus gave different
vocabularies. Its byte-level BPE trainer has no such dependence. So the vocabulary is learned
by that BPE trainer on words marked at their start ("▁word", as SentencePiece does), and
converted: a piece that starts a word keeps its text without the mark, any other piece gets
the `##` prefix. Every character of the training text is in the vocabulary both ways, then
the merged pieces in the order they were learned (most frequent first).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Tokenizer as HFTokenizerModel
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from llm_lightning.data.tokenizers.base import EOS_TOKEN, UNK_TOKEN

WORD_START = "\u2581"  # marks the first piece of a word while learning the vocabulary
CONTINUATION = "##"


def _bert_text_pipeline(hf: HFTokenizerModel) -> HFTokenizerModel:
    hf.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False
    )
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return hf


def train_wordpiece(texts: Iterable[str], vocab_size: int) -> HFTokenizerModel:
    """A WordPiece tokenizer with at most `vocab_size` pieces, trained on a stream of texts."""
    learner = _bert_text_pipeline(HFTokenizerModel(models.BPE()))
    learner.pre_tokenizer = pre_tokenizers.Sequence(
        [learner.pre_tokenizer, pre_tokenizers.Metaspace(replacement=WORD_START, prepend_scheme="always")]
    )
    specials = [UNK_TOKEN, EOS_TOKEN]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + 1, special_tokens=specials, show_progress=False)
    learner.train_from_iterator(texts, trainer)
    learned = json.loads(learner.to_str())["model"]["vocab"]  # piece -> id, in the order learned
    pieces = [piece for piece, _ in sorted(learned.items(), key=lambda item: item[1])]
    vocab = wordpiece_vocabulary(pieces, specials, vocab_size)
    hf = HFTokenizerModel(
        models.WordPiece(vocab, unk_token=UNK_TOKEN, continuing_subword_prefix=CONTINUATION)
    )
    hf.decoder = decoders.WordPiece(prefix=CONTINUATION, cleanup=True)
    return _bert_text_pipeline(hf)


def wordpiece_vocabulary(pieces: list[str], specials: list[str], vocab_size: int) -> dict[str, int]:
    """WordPiece ids from BPE pieces learned on word-start-marked words (see the module docstring)."""
    chars = sorted({c for piece in pieces if piece not in specials for c in piece if c != WORD_START})
    ordered = [*specials, *chars, *(CONTINUATION + c for c in chars)]
    for piece in pieces:
        if piece in specials or len(piece.removeprefix(WORD_START)) < 2:
            continue  # single characters are all in already, and a lone word-start mark is no piece
        ordered.append(piece[1:] if piece.startswith(WORD_START) else CONTINUATION + piece)
    unique = list(dict.fromkeys(ordered))[:vocab_size]
    return {piece: i for i, piece in enumerate(unique)}
