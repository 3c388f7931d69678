"""SentencePiece BPE baseline tokenizer with an exact round trip for any bytes.

SentencePiece sees only well-formed UTF-8 text, with two substitutions:
- `" "` is written as U+2581 (`▁`) by SentencePiece itself;
- `"\\n"` is written as U+240A (`␊`) by us, because its trainer never keeps a newline
  inside a piece (every newline would cost one byte-fallback token, as in Llama 2);
  with the substitute it learns pieces such as `".␊"` and `"␊␊"`.
Bytes SentencePiece must not see go straight to the byte-fallback pieces `<0xNN>`:
invalid UTF-8, and literal `▁` / `␊`, which would otherwise decode as space / newline.
Decoding maps every piece to its bytes with one table lookup, so it is exact.

Training input: each document is cut into "sentences" of whole lines (newlines kept)
of at most `chunk_chars` characters, so pieces may span line ends and blank lines.
"""

from __future__ import annotations

import errno
import io
import os
import re
from typing import Iterable, Iterator

import sentencepiece as spm

from hat import storage
from hat.text import splitter

NEWLINE_SUB = "\u240a"  # stands for "\n" inside SentencePiece
_SPACE_SUB = "\u2581"  # SentencePiece's own stand-in for " "
_ESCAPE = re.compile("[\u2581\u240a]+")
_BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")
_CHUNK_CHARS = 4096
_CUT = re.compile(r"[^ ](?= )")  # match ends right before a space after a non-space


def _to_text(doc: str | bytes) -> str:
  if isinstance(doc, bytes):
    return doc.decode("utf-8", errors="replace")
  return doc


def _chunks(texts: Iterable[str | bytes], chunk_chars: int) -> Iterator[str]:
  """Yields training sentences: runs of whole lines, at most chunk_chars long."""
  for doc in texts:
    text = _ESCAPE.sub("", _to_text(doc)).replace("\n", NEWLINE_SUB)
    start = 0
    while start < len(text):
      end = min(start + chunk_chars, len(text))
      if end < len(text):
        cut = text.rfind(NEWLINE_SUB, start, end)
        if cut < 0:
          cut = text.rfind(" ", start, end)
        end = cut + 1 if cut >= start else end
      yield text[start:end]
      start = end


def train_bpe(
    texts: Iterable[str | bytes],
    vocab_size: int,
    model_path: str | os.PathLike | None = None,
    *,
    max_sentences: int = 2_000_000,
    chunk_chars: int = 4096,
    character_coverage: float = 0.9995,
    num_threads: int | None = None,
) -> BPETokenizer:
  """Trains a byte-fallback BPE on `texts`, writes it to `model_path` if given."""
  if vocab_size < 300:
    # 256 byte pieces and 4 specials come first; fewer than ~40 more leaves no merges.
    raise ValueError(f"vocab_size must be >= 300, got {vocab_size}")
  writer = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=_chunks(texts, chunk_chars),
      model_writer=writer,
      model_type="bpe",
      vocab_size=vocab_size,
      normalization_rule_name="identity",
      byte_fallback=True,
      add_dummy_prefix=False,
      split_digits=True,
      remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True,
      pad_id=0,
      unk_id=1,
      bos_id=2,
      eos_id=3,
      character_coverage=character_coverage,
      max_sentence_length=4 * chunk_chars + 16,  # in bytes
      input_sentence_size=max_sentences,
      shuffle_input_sentence=True,
      train_extremely_large_corpus=False,
      num_threads=num_threads or min(16, os.cpu_count() or 1),
      minloglevel=2,
  )
  tok = BPETokenizer.from_bytes(writer.getvalue())
  if model_path is not None:
    model_path = storage.path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    model_path.write_bytes(tok.model_proto)
  return tok


class BPETokenizer:
  """SentencePiece BPE; `encode`/`decode` round-trip any bytes exactly. Picklable."""

  def __init__(self, model_proto: bytes):
    self._proto = bytes(model_proto)
    self._sp = None
    self._load()

  @classmethod
  def load(cls, path: str | os.PathLike) -> BPETokenizer:
    """Loads a `.model` file written by `train_bpe`."""
    path = storage.path(path)
    if not path.is_file():
      raise FileNotFoundError(errno.ENOENT, "BPE model not found", str(path))
    return cls(path.read_bytes())

  @classmethod
  def from_bytes(cls, model_proto: bytes) -> BPETokenizer:
    """Builds the tokenizer from a serialized SentencePiece model."""
    return cls(model_proto)

  def _load(self):
    sp = spm.SentencePieceProcessor(model_proto=self._proto)
    self._byte_ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
    if any(sp.id_to_piece(i) != f"<0x{b:02X}>" for b, i in enumerate(self._byte_ids)):
      raise ValueError("the SentencePiece model has no byte-fallback pieces")
    table = []
    for i in range(sp.get_piece_size()):
      piece = sp.id_to_piece(i)
      m = _BYTE_PIECE.fullmatch(piece)
      if m and sp.is_byte(i):
        table.append(bytes([int(m.group(1), 16)]))
      elif sp.is_control(i) or sp.is_unknown(i):
        table.append(b"")
      else:
        text = piece.replace(_SPACE_SUB, " ").replace(NEWLINE_SUB, "\n")
        table.append(text.encode("utf-8"))
    self._pieces = table
    self._sp = sp

  def __getstate__(self):
    return {"model_proto": self._proto}

  def __setstate__(self, state):
    self.__init__(state["model_proto"])

  @property
  def model_proto(self) -> bytes:
    """The serialized SentencePiece model (store it with the run config)."""
    return self._proto

  @property
  def vocab_size(self) -> int:
    """Number of ids (pieces), specials and byte pieces included."""
    return len(self._pieces)

  @property
  def bos_id(self) -> int:
    """Id of the beginning-of-document token."""
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    """Id of the end-of-document token."""
    return self._sp.eos_id()

  @property
  def pad_id(self) -> int:
    """Id of the padding token."""
    return self._sp.pad_id()

  def _encode_plain(self, text: str, out: list[int]) -> None:
    # SentencePiece's BPE slows down superlinearly on long inputs, so long text goes in
    # pieces, cut before a space that follows a non-space: no piece spans such a place
    # (pieces only start with "▁" or consist of "▁"s), so the ids are the same.
    text = text.replace("\n", NEWLINE_SUB)
    start = 0
    while len(text) - start > _CHUNK_CHARS:
      m = _CUT.search(text, start + _CHUNK_CHARS // 2)
      if m is None:
        break
      out.extend(self._sp.encode(text[start : m.start() + 1]))
      start = m.start() + 1
    out.extend(self._sp.encode(text[start:]))

  def _encode_text(self, text: str, out: list[int]) -> None:
    pos = 0
    for m in _ESCAPE.finditer(text):
      if m.start() > pos:
        self._encode_plain(text[pos : m.start()], out)
      out.extend(self._byte_ids[b] for b in m.group().encode("utf-8"))
      pos = m.end()
    if pos < len(text):
      self._encode_plain(text[pos:], out)

  def encode(self, data: bytes) -> list[int]:
    """Bytes -> token ids (no BOS/EOS added)."""
    out: list[int] = []
    for valid, run in splitter.utf8_runs(bytes(data)):
      if valid:
        self._encode_text(run.decode("utf-8"), out)
      else:
        out.extend(self._byte_ids[b] for b in run)
    return out

  def decode(self, ids: Iterable[int]) -> bytes:
    """Token ids -> bytes; special ids (pad, unk, bos, eos) decode to nothing."""
    pieces = self._pieces
    return b"".join(pieces[int(i)] for i in ids)

  def id_to_piece(self, i: int) -> str:
    """The SentencePiece piece of id `i` (for inspection)."""
    return self._sp.id_to_piece(int(i))

  def __repr__(self):
    return f"BPETokenizer(vocab_size={self.vocab_size})"
