"""Token-level tokenizers for the flat baselines, behind one small interface.

Both `ByteTokenizer` (flat byte-level LM) and `bpe.BPETokenizer` (SentencePiece BPE) offer
`encode(bytes) -> list[int]`, `decode(ids) -> bytes`, `vocab_size`, `bos_id`, `eos_id`,
`pad_id` and `model_proto`, and round-trip any bytes exactly.
"""

from __future__ import annotations

from typing import Iterable

from hat.text import codec

KINDS = ("byte", "bpe")


class ByteTokenizer:
  """Ids are the byte values; `[S]` is both BOS and EOS, `[PAD]` pads."""

  vocab_size = codec.BYTE_VOCAB_SIZE
  bos_id = codec.S_ID
  eos_id = codec.S_ID
  pad_id = codec.PAD_ID
  model_proto = b""  # nothing to store with the run config

  def encode(self, data: bytes) -> list[int]:
    """Bytes -> ids 0..255."""
    return list(bytes(data))

  def decode(self, ids: Iterable[int]) -> bytes:
    """Ids -> bytes, dropping special ids."""
    return codec.decode_ids(list(ids))

  def __repr__(self):
    return "ByteTokenizer()"


def load_tokenizer(kind: str, path: str = ""):
  """Returns the tokenizer of `kind` ("byte", or "bpe" loaded from the model at `path`)."""
  if kind == "byte":
    return ByteTokenizer()
  if kind == "bpe":
    from hat.text import bpe  # pylint: disable=g-import-not-at-top

    return bpe.BPETokenizer.load(path)
  raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
