"""Tests for word splitting (hat/text/splitter.py) and the byte tokenizer."""

from __future__ import annotations

import pickle
import time

from hypothesis import given, settings, strategies as st
import numpy as np
import pytest

from hat.text import codec
from hat.text import splitter as splitter_lib
from hat.text import tokenizers

_ATOMS = [
    "Hello", "world", " ", "  ", "\t", "\n", "\r\n", "\x0b", "\x0c", "\x00", ",", ".",
    "!", "'", "1,000.5", "camelCase", "ABCDef", "U.S.A.", "é", "e\u0301",
    "\u0301",
    "日本語", "のテキスト", "😀", "👩‍👩‍👧", "🇩🇪🇫🇷", "ß", "Ⅻ", "\u200b", "\u2581", "Straße",
    "naïve", "\ufeff", "\u00a0", "x\u0308\u0301", "\u2044", "1", "\u202f", ":", "a",
]
_BAD = [b"\xff", b"\xc3", b"\xe2\x82", b"\xf0\x9f\x98", b"\x80", b"\xed\xa0\x80",
        b"\xc0\xaf", b"\xf5"]

_text_atoms = st.sampled_from(_ATOMS).map(lambda s: s.encode("utf-8"))
_chunks = st.one_of(
    _text_atoms,
    _text_atoms,
    st.sampled_from(_BAD),
    st.text(max_size=8).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.binary(max_size=6),
)
# Mostly text-like inputs with invalid bytes sprinkled in, plus plain random bytes.
data_strategy = st.one_of(
    st.lists(_chunks, max_size=24).map(b"".join),
    st.binary(max_size=64),
)
_configs = st.tuples(st.sampled_from(splitter_lib.RULES), st.sampled_from([4, 5, 8, 31]))


def _check_pieces(words, data, max_word_bytes):
  assert b"".join(words) == data
  assert all(0 < len(w) <= max_word_bytes for w in words)


@settings(max_examples=300, deadline=None)
@given(data=data_strategy, config=_configs)
def test_round_trip_and_lengths(data, config):
  rule, max_word_bytes = config
  sp = splitter_lib.Splitter(rule, max_word_bytes)
  words = sp.split(data)
  _check_pieces(words, data, max_word_bytes)
  np.testing.assert_array_equal(sp.word_lengths(data), [len(w) for w in words])
  assert sp.word_lengths(data).dtype == np.int32


@settings(max_examples=300, deadline=None)
@given(data=data_strategy, config=_configs, frac=st.floats(0, 1))
def test_prefix_stability(data, config, frac):
  sp = splitter_lib.Splitter(*config)
  full = sp.split(data)
  cut = int(round(frac * len(data)))
  head = sp.split(data[:cut])[:-1]
  assert full[: len(head)] == head


@settings(max_examples=30, deadline=None)
@given(data=data_strategy, config=_configs)
def test_prefix_stability_every_cut(data, config):
  sp = splitter_lib.Splitter(*config)
  full = sp.split(data)
  for cut in range(len(data) + 1):
    head = sp.split(data[:cut])[:-1]
    assert full[: len(head)] == head, cut


@pytest.mark.parametrize(
    "rule,text,expected",
    [
        ("whitespace", "Hello world", ["Hello ", "world"]),
        ("whitespace", "  Hi  there\n\nyou", ["  ", "Hi  ", "there\n\n", "you"]),
        ("whitespace", "a\tb\x0bc\x0cd\re", ["a\t", "b\x0b", "c\x0c", "d\r", "e"]),
        ("whitespace", "", []),
        ("unicode", "Hello, world!", ["Hello,", " world!"]),
        ("unicode", "camelCase", ["camel", "Case"]),
        ("unicode", "", []),
    ],
)
def test_examples(rule, text, expected):
  assert splitter_lib.split_words(text.encode(), rule) == [w.encode() for w in expected]


def test_whitespace_is_ascii_only():
  # NBSP and other Unicode spaces are not word separators in the whitespace rule.
  assert splitter_lib.split_words("a\u00a0b c".encode()) == ["a\u00a0b ".encode(), b"c"]


def test_unicode_invalid_bytes():
  words = splitter_lib.split_words(b"ab\xffcd \xc3\xa9", "unicode")
  assert words == [b"ab", b"\xff", b"cd", b" \xc3\xa9"]
  # An unfinished character at the end stays with the preceding word.
  assert splitter_lib.split_words(b"x caf\xc3", "unicode") == [b"x", b" caf\xc3"]
  assert splitter_lib.split_words(b"\xe2\x82", "unicode") == [b"\xe2\x82"]


@pytest.mark.parametrize("prefix,full", [
    (" \u00a0", " \u00a0\u0301x"),  # whitespace that becomes a word absorbed the space
    ("1\u2044", "1\u20442"),  # fraction slash joins digits only once the digit comes
    (" 12\u2044", " 12\u20443 "),
])
def test_unicode_repairs_hat_splitter_instabilities(prefix, full):
  for max_word_bytes in (4, 31):
    sp = splitter_lib.Splitter("unicode", max_word_bytes)
    head = sp.split(prefix.encode())[:-1]
    assert head and sp.split(full.encode())[: len(head)] == head


def test_long_words_cut_at_character_boundaries():
  data = ("h" + "é" * 6 + " x").encode()
  words = splitter_lib.split_words(data, max_word_bytes=4)
  assert words == [b"h\xc3\xa9", "éé".encode(), "éé".encode(), "é ".encode(), b"x"]
  for w in words:
    w.decode("utf-8")  # never a cut inside a character
  emoji = "😀" * 5
  assert splitter_lib.split_words(emoji.encode(), "unicode", 5) == ["😀".encode()] * 5


@pytest.mark.parametrize("rule", splitter_lib.RULES)
def test_one_megabyte_word(rule):
  data = ("abcé日😀" * 80_000).encode()[: 1 << 20]
  start = time.perf_counter()
  words = splitter_lib.split_words(data, rule, 31)
  assert time.perf_counter() - start < 5.0
  _check_pieces(words, data, 31)
  assert len(words) >= len(data) // 31


def test_bad_arguments_name_the_argument():
  with pytest.raises(ValueError, match="rule"):
    splitter_lib.Splitter("spaces", 31)
  with pytest.raises(ValueError, match="max_word_bytes"):
    splitter_lib.Splitter("whitespace", 3)


def test_splitter_pickles():
  sp = splitter_lib.Splitter("unicode", 16)
  sp.split(b"warm up the lazy splitter")
  clone = pickle.loads(pickle.dumps(sp))
  assert clone.split(b"Hello, world!") == [b"Hello,", b" world!"]
  assert clone.max_word_bytes == 16


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=64))
def test_byte_tokenizer_round_trip(data):
  tok = tokenizers.ByteTokenizer()
  ids = tok.encode(data)
  assert all(0 <= i < 256 for i in ids)
  assert tok.decode(ids) == data
  assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == data


def test_byte_tokenizer_interface():
  tok = tokenizers.load_tokenizer("byte", "")
  assert isinstance(tok, tokenizers.ByteTokenizer)
  assert tok.vocab_size == codec.BYTE_VOCAB_SIZE
  assert tok.bos_id == tok.eos_id == codec.S_ID
  assert tok.pad_id == codec.PAD_ID
  assert pickle.loads(pickle.dumps(tok)).encode(b"hi") == [104, 105]
  with pytest.raises(ValueError, match="kind"):
    tokenizers.load_tokenizer("wordpiece", "")
