"""Tokenizers: each kind trained, saved, loaded and round-tripped; tiktoken ids == HF BPE ids."""

from __future__ import annotations

import json
import random

import pytest
import tiktoken.load
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizerModel

from llm_lightning.data.tokenizers import (
    EOS_TOKEN,
    KINDS,
    TiktokenTokenizer,
    check_vocab_size,
    load_tiktoken_encoding,
    load_tokenizer,
    load_tokenizer_from_files,
    tokenizer_files,
    train_tokenizer,
)
from llm_lightning.data.tokenizers.base import META_JSON, TIKTOKEN_FILE, TOKENIZER_JSON
from llm_lightning.data.tokenizers.tiktoken_bpe import derive_merges
from llm_lightning.errors import UserError

WORD_LIST = (
    "the of and to in is was that for on with as by at from it this be are or an have not but "
    "river stone light winter garden window market letter silver morning quiet ancient village "
    "they said I'm don't we've 42 2024 3.14 café naïve Über 東京 😀 — ( ) , . ; : ! ? \" '"
)
WORDS = WORD_LIST.split()


def corpus(n_docs: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        lines = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) for _ in range(rng.randint(1, 5))
        ]
        docs.append(("\n" if rng.random() < 0.7 else "\n\n").join(lines) + rng.choice(["", "\n", "  \n\t"]))
    return docs


SAMPLES = [
    "The river was quiet, and the stone was ancient.",
    "  leading and trailing spaces  \n\n\ttabs\r\nCRLF\n",
    "I'm sure we've don't THEY'LL 12345 3.14159 1234567890 café Über 東京 😀",
    "end with spaces   \n  \n   ",
    f"a literal {EOS_TOKEN} inside a document",
    "",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One small tokenizer of each kind, saved to and loaded back from a folder."""
    result = {}
    for kind in KINDS:
        folder = tmp_path_factory.mktemp(kind)
        train_tokenizer(kind, iter(corpus()), vocab_size=400).save(folder)
        result[kind] = (load_tokenizer(folder), folder)
    return result


@pytest.mark.parametrize("kind", KINDS)
def test_trained_saved_loaded_round_trip(trained, kind):
    tok, folder = trained[kind]
    assert tok.kind == kind
    assert tok.decode([tok.eos_id]) == EOS_TOKEN
    assert (100 if kind == "wordpiece" else 257) < tok.vocab_size <= 400
    expected_files = {TOKENIZER_JSON, META_JSON} | ({TIKTOKEN_FILE} if kind == "tiktoken" else set())
    assert set(tokenizer_files(folder)) == expected_files
    meta = json.loads((folder / META_JSON).read_text())
    assert (meta["kind"], meta["eos_id"], meta["vocab_size"]) == (kind, tok.eos_id, tok.vocab_size)
    for text in SAMPLES + corpus(20, seed=1):
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.eos_id not in ids  # a literal "<|endoftext|>" is plain text
        if kind == "wordpiece":  # up to normalization: whitespace, and [UNK] for unseen characters
            if set(text) <= set("".join(corpus())) | set(" \t\r\n"):
                assert "".join(tok.decode(ids).split()) == "".join(text.split())
        else:
            assert tok.decode(ids) == text
    assert tok.encode_batch(SAMPLES) == [tok.encode(t) for t in SAMPLES]


@pytest.mark.parametrize("kind", KINDS)
def test_rebuilt_from_file_contents_and_hf_files_agree(trained, kind):
    tok, folder = trained[kind]
    again = load_tokenizer_from_files(tokenizer_files(folder))
    hf = HFTokenizerModel.from_file(str(folder / TOKENIZER_JSON))
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_file=str(folder / TOKENIZER_JSON))
    for text in SAMPLES[:-2] + corpus(20, seed=2):  # without the literal end-of-text token
        ids = tok.encode(text)
        assert again.encode(text) == ids
        assert hf.encode(text, add_special_tokens=False).ids == ids
        assert fast(text, add_special_tokens=False)["input_ids"] == ids
    assert hf.token_to_id(EOS_TOKEN) == tok.eos_id == fast.convert_tokens_to_ids(EOS_TOKEN)


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=80) | st.text(alphabet=" \t\r\n'sdmtlvre0123456789aZ!.-😀", max_size=60))
def test_byte_level_kinds_round_trip_any_text_and_tiktoken_matches_hf(trained, text):
    bpe, tik = trained["bpe"][0], trained["tiktoken"][0]
    assert bpe.decode(bpe.encode(text)) == text
    ids = tik.encode(text)
    assert tik.decode(ids) == text
    assert tik.hf_tokenizer().encode(text, add_special_tokens=False).ids == ids


def test_tiktoken_ranks_are_in_tiktoken_file_format(trained):
    tok, folder = trained["tiktoken"]
    ranks = tiktoken.load.load_tiktoken_bpe(str(folder / TIKTOKEN_FILE))
    assert ranks == tok.ranks
    assert all(ranks[bytes([b])] == b for b in range(256))
    assert sorted(ranks.values()) == list(range(len(ranks)))
    assert tok.eos_id == len(ranks) == tok.vocab_size - 1


def test_merges_derived_from_ranks_give_the_same_ids(trained):
    """The path used for named encodings (cl100k_base...): ranks only, merges derived."""
    tok = trained["tiktoken"][0]
    derived = TiktokenTokenizer("copy", tok.ranks, tok.special_tokens, tok.pat_str)
    assert len(derive_merges(tok.ranks)) == len(tok.ranks) - 256
    files = derived.files()
    assert (
        json.loads(files[TOKENIZER_JSON])["model"]["merges"]
        == json.loads(tok.files()[TOKENIZER_JSON])["model"]["merges"]
    )
    for text in SAMPLES + corpus(10, seed=3):
        assert derived.hf_tokenizer().encode(text).ids == tok.encode(text)


def test_named_tiktoken_encoding_is_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(UserError, match="not in the tiktoken cache") as error:
        load_tiktoken_encoding("cl100k_base")
    assert str(tmp_path) in str(error.value) and list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="not a tiktoken encoding"):
        load_tiktoken_encoding("no_such_encoding")


@pytest.mark.parametrize(
    "kind, size, message",
    [
        ("bpe", 257, "too small"),
        ("tiktoken", 100, "too small"),
        ("wordpiece", 10, "too small"),
        ("bpe", 10**7, "absurdly"),
    ],
)
def test_vocab_size_limits(kind, size, message):
    with pytest.raises(UserError, match=message):
        check_vocab_size(kind, size)


def test_unknown_kind_and_bad_folders(tmp_path):
    with pytest.raises(UserError, match="--tokenizer_type"):
        check_vocab_size("sentencepiece", 1000)
    with pytest.raises(UserError, match=f"has no {META_JSON}"):
        load_tokenizer(tmp_path)
    (tmp_path / META_JSON).write_text(json.dumps({"kind": "tiktoken"}))
    with pytest.raises(UserError, match="lacks tokenizer.json, tokenizer.tiktoken"):
        load_tokenizer(tmp_path)
