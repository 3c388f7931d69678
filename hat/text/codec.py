"""Byte codec: the 256 byte values plus special symbols with ids >= 256.

Every byte value stays representable, so any input (invalid UTF-8 included) round-trips.
"""

from __future__ import annotations

import numpy as np

W_ID = 256  # [W]: word marker (encoder read-out slot) and end-of-word decoder target
S_ID = 257  # [S]: document boundary (start unit marker, end-of-document target)
PAD_ID = 258  # [PAD]: unused slot
BYTE_VOCAB_SIZE = 259
SPECIAL_NAMES = {W_ID: "[W]", S_ID: "[S]", PAD_ID: "[PAD]"}


def encode_bytes(data: bytes) -> np.ndarray:
  """Bytes -> int32 ids 0..255."""
  return np.frombuffer(data, dtype=np.uint8).astype(np.int32)


def decode_ids(ids) -> bytes:
  """Ids -> bytes, dropping special symbols."""
  arr = np.asarray(ids, dtype=np.int64).reshape(-1)
  return arr[(arr >= 0) & (arr < 256)].astype(np.uint8).tobytes()


def render(ids) -> str:
  """Human-readable rendering with specials spelled out, for debugging and inspection."""
  out = []
  for i in np.asarray(ids).reshape(-1).tolist():
    if i in SPECIAL_NAMES:
      out.append(SPECIAL_NAMES[i])
    else:
      out.append(bytes([i]).decode("latin-1") if 32 <= i < 127 else f"<{i:02x}>")
  return "".join(out)
