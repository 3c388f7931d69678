"""Tests for the BPE baseline tokenizer (hat/text/bpe.py) and tools/train_tokenizer.py."""

from __future__ import annotations

import importlib.util
import pathlib
import pickle
import random

from hypothesis import given, settings, strategies as st
import pytest

from hat.text import bpe
from hat.text import tokenizers

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "über", "naïve",
          "Straße", "日本", "語", "1234", "Hello,", "world.", "(x)", "  ", "\t", "😀"]


def _corpus(n_docs=20, n_words=150, seed=0):
  rng = random.Random(seed)
  seps = [" ", " ", " ", "\n", "\n\n", ", ", ".\n"]
  return ["".join(rng.choice(_WORDS) + rng.choice(seps) for _ in range(n_words))
          for _ in range(n_docs)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("bpe") / "tiny.model"
  t = bpe.train_bpe(_corpus(), 360, path)
  assert path.read_bytes() == t.model_proto
  return t


def test_interface(tok):
  assert tok.vocab_size == 360
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
  assert tok.decode([tok.bos_id, tok.pad_id, tok.eos_id]) == b""
  # Training text is compressed: frequent words are single pieces.
  assert len(tok.encode(b"the quick brown fox")) < 10


@pytest.mark.parametrize("data", [
    b"", b"\n", b"\n\n\n", b"\t\tx", b"  leading", b"trailing  ", b"a   b", b"\x00",
    b"nul\x00inside", b"\r\n", b"\xff\xfe", b"caf\xc3", "x\u2581y".encode(),
    "\u240a\n".encode(), "😀日本語".encode(), "e\u0301".encode(), b"\x7f\x1b[0m",
    "\ufeffbom".encode(), b"\xed\xa0\x80", "the quick\n\nbrown".encode(),
])
def test_round_trip_examples(tok, data):
  assert tok.decode(tok.encode(data)) == data


def test_long_text_encodes_like_one_call(tok):
  text = "".join(_corpus(n_docs=3, n_words=2000, seed=2))
  assert len(text) > 3 * bpe._CHUNK_CHARS
  ids = tok.encode(text.encode())
  assert ids == tok._sp.encode(text.replace("\n", bpe.NEWLINE_SUB))
  assert tok.decode(ids) == text.encode()


def test_newlines_are_learned(tok):
  pieces = [tok.id_to_piece(i) for i in tok.encode(b"fox.\n\nthe")]
  assert any(bpe.NEWLINE_SUB in p and not p.startswith("<0x") for p in pieces)


_text = st.lists(st.sampled_from(_WORDS + [" ", "\n", "\u2581", "\u240a", "\x00", "\r"]),
                 max_size=20).map("".join)


@settings(max_examples=200, deadline=None)
@given(data=st.one_of(st.binary(max_size=64),
                      st.text(max_size=32).map(lambda s: s.encode("utf-8", "surrogatepass")),
                      _text.map(str.encode)))
def test_round_trip_any_bytes(tok, data):
  ids = tok.encode(data)
  assert all(0 <= i < tok.vocab_size for i in ids)
  assert tok.decode(ids) == data


def test_pickle_and_load(tok, tmp_path):
  clone = pickle.loads(pickle.dumps(tok))
  data = "the lazy dog\n\tüber 😀 \xff".encode("utf-8", "surrogateescape")
  assert clone.encode(data) == tok.encode(data)
  path = tmp_path / "m.model"
  path.write_bytes(tok.model_proto)
  loaded = tokenizers.load_tokenizer("bpe", str(path))
  assert loaded.encode(data) == tok.encode(data)
  assert bpe.BPETokenizer.from_bytes(tok.model_proto).vocab_size == tok.vocab_size
  with pytest.raises(FileNotFoundError, match="nope.model"):
    bpe.BPETokenizer.load(tmp_path / "nope.model")


def test_vocab_size_too_small():
  with pytest.raises(ValueError, match="vocab_size"):
    bpe.train_bpe(["abc"], 100)


def _cli():
  spec = importlib.util.spec_from_file_location(
      "train_tokenizer", _ROOT / "tools" / "train_tokenizer.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_cli_smoke(tmp_path, capsys):
  data = tmp_path / "corpus"
  (data / "sub").mkdir(parents=True)
  for i, doc in enumerate(_corpus(n_docs=6, seed=1)):
    (data / ("sub" if i % 2 else "") / f"doc{i}.txt").write_text(doc)
  (data / "ignored.json").write_text("{}")
  out = tmp_path / "out" / "bpe.model"
  assert _cli().main([str(data), "--vocab-size", "340", "--out", str(out),
                      "--heldout-bytes", "2000", "--eval", str(data / "doc0.txt")]) == 0
  printed = capsys.readouterr().out
  assert "vocab_size=340" in printed and "bytes/token" in printed
  assert bpe.BPETokenizer.load(out).vocab_size == 340


def test_cli_errors_name_the_path(tmp_path, capsys):
  cli = _cli()
  missing = tmp_path / "missing_dir"
  assert cli.main([str(missing), "--vocab-size", "340", "--out", str(tmp_path / "m.model")]) == 2
  assert "missing_dir" in capsys.readouterr().err
  empty = tmp_path / "empty_dir"
  empty.mkdir()
  assert cli.main([str(empty), "--vocab-size", "340", "--out", str(tmp_path / "m.model")]) == 2
  assert "empty_dir" in capsys.readouterr().err
  (empty / "blank.txt").write_text("")
  assert cli.main([str(empty), "--vocab-size", "340", "--out", str(tmp_path / "m.model")]) == 2
  assert "error: no text in" in capsys.readouterr().err
