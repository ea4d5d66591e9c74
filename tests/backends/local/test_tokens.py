"""The token table on byte-level BPE, sentencepiece (byte fallback, Metaspace) and other vocabularies."""

from __future__ import annotations

import re
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from airlock.backends.local.tokens import TokenTable

TEXTS = ["hello world", "the café is naïve", "日本語のテキスト 🎉", "ok\n\ttabs  and  spaces"]
PARTIAL = re.compile(r"bytes:(\\x[0-9a-f]{2})+")


def _byte_level() -> Any:
    """A GPT-2 style vocabulary (SmolLM2, Llama 3, Qwen): every byte is a printable character."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    tok.train_from_iterator(TEXTS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _sentencepiece(decoder: Any) -> Any:
    """A Llama 2 style vocabulary: ``▁`` marks a space, characters outside it fall back to ``<0xNN>``."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in ["▁", "h", "e", "l", "o", "w", "r", "d", "c", "a", "f", "é", "▁h", "ll", "▁w", "or", "ld"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "h"), ("l", "l"), ("▁", "w"), ("o", "r"), ("l", "d")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoder
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def byte_level() -> Any:
    return _byte_level()


def ids_of(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_tokens_hold_their_exact_bytes(byte_level: Any, text: str) -> None:
    table = TokenTable(byte_level, len(byte_level))
    ids = ids_of(byte_level, text)
    assert b"".join(table.bytes[i] for i in ids) == text.encode()
    assert table.decode(ids) == byte_level.decode(ids) == text


def test_partial_characters_render_as_bytes(byte_level: Any) -> None:
    table = TokenTable(byte_level, len(byte_level))
    ids = ids_of(byte_level, "日本語のテキスト 🎉")
    partial = [i for i in ids if PARTIAL.fullmatch(table.text(i))]
    assert partial  # this vocabulary splits some of these characters across tokens
    for i in partial:
        assert table.text(i) == "bytes:" + "".join(f"\\x{b:02x}" for b in table.bytes[i])
    whole = [i for i in ids if i not in partial]
    assert all(table.text(i) == table.bytes[i].decode() for i in whole)


@pytest.mark.parametrize("text", TEXTS)
def test_offsets_point_at_each_tokens_text(byte_level: Any, text: str) -> None:
    table = TokenTable(byte_level, len(byte_level))
    ids = ids_of(byte_level, text)
    offsets = table.offsets(ids)
    assert offsets[0] == 0 and offsets == sorted(offsets)
    for i, offset in enumerate(offsets):
        # Characters completed by the tokens before this one (a split character counts once whole).
        head = b"".join(table.bytes[t] for t in ids[:i])
        assert offset == len(head.decode("utf-8", errors="ignore"))


def test_special_tokens_are_literal_and_padding_is_empty(byte_level: Any) -> None:
    table = TokenTable(byte_level, len(byte_level) + 3)  # a model's embedding may be wider than its vocabulary
    eos = byte_level.convert_tokens_to_ids("<|endoftext|>")
    assert table.bytes[eos] == b"<|endoftext|>"
    assert len(table.bytes) == len(byte_level) + 3
    assert table.bytes[len(byte_level) :] == [b"", b"", b""]
    assert table.text(len(byte_level)) == "" and table.text(10**6) == "" and table.text(-1) == ""


@pytest.mark.parametrize(
    "decoder",
    [
        decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        ),
        decoders.Metaspace(),
    ],
    ids=["byte-fallback", "metaspace"],
)
def test_sentencepiece_pieces_and_byte_fallback(decoder: Any) -> None:
    tok = _sentencepiece(decoder)
    table = TokenTable(tok, len(tok))
    for text in TEXTS:
        ids = ids_of(tok, text)
        # The normalizer's leading "▁" is a real space in a stream; only a whole-text decode drops it.
        assert table.decode(ids) == " " + text
    assert table.bytes[tok.convert_tokens_to_ids("<0xE6>")] == b"\xe6"
    assert table.bytes[tok.convert_tokens_to_ids("▁h")] == b" h"
    assert table.bytes[tok.convert_tokens_to_ids("</s>")] == b"</s>"
    assert table.text(tok.convert_tokens_to_ids("<0xE6>")) == "bytes:\\xe6"


def test_other_decoders_use_the_tokenizers_own_text() -> None:
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "##s": 3, "!": 4}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    table = TokenTable(fast, len(fast))
    assert table.bytes == [fast.decode([i]).encode() for i in range(len(fast))]
    assert table.bytes[vocab["hello"]] == b"hello" and table.bytes[vocab["!"]] == b"!"
