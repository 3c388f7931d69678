"""Word splitting of raw bytes (any bytes, invalid UTF-8 included).

Two rules, both guaranteeing for every input:
- exact round trip: `b"".join(split(data)) == data`;
- every piece is non-empty and at most `max_word_bytes` long;
- prefix stability: for any prefix `p` of `data`, `split(p)[:-1]` is a prefix of
  `split(data)` (generation continues a prompt whose last word may be incomplete).

`whitespace`: a word is a run of non-whitespace bytes followed by the whitespace after it
(`b"Hello world"` -> `b"Hello "`, `b"world"`); leading whitespace forms its own word.
`unicode`: the `hat_splitter` rule (UAX #29 word bounds, punctuation attached to the
preceding word, spaces to the following one, camelCase split). It only accepts `str`, so
bytes are cut into maximal valid-UTF-8 runs, which it splits, and runs of invalid bytes,
which become pieces of their own. An incomplete multi-byte character at the very end of
the input is attached to the preceding piece: completing it later then only changes the
last piece.

Words longer than `max_word_bytes` are cut greedily from the left, at UTF-8 character
boundaries (any byte that is not a continuation byte 0b10xxxxxx starts a character); a
run of more than three continuation bytes (invalid UTF-8) is cut at the limit.
"""

from __future__ import annotations

import codecs
import re
from typing import Sequence

import numpy as np

RULES = ("whitespace", "unicode")
MIN_WORD_BYTES = 4  # a UTF-8 character can take 4 bytes; a smaller cap would split it

_WS = np.zeros(256, dtype=bool)
_WS[list(b" \t\n\r\x0b\x0c")] = True

# One or more well-formed UTF-8 characters (RFC 3629: no overlongs, no surrogates).
_VALID_RUN = re.compile(
    rb"(?:[\x00-\x7f]|[\xc2-\xdf][\x80-\xbf]|\xe0[\xa0-\xbf][\x80-\xbf]"
    rb"|[\xe1-\xec\xee\xef][\x80-\xbf]{2}|\xed[\x80-\x9f][\x80-\xbf]"
    rb"|\xf0[\x90-\xbf][\x80-\xbf]{2}|[\xf1-\xf3][\x80-\xbf]{3}"
    rb"|\xf4[\x80-\x8f][\x80-\xbf]{2})+"
)


def _check_args(rule: str, max_word_bytes: int) -> None:
  if rule not in RULES:
    raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
  if not isinstance(max_word_bytes, (int, np.integer)) or max_word_bytes < MIN_WORD_BYTES:
    raise ValueError(
        f"max_word_bytes must be an int >= {MIN_WORD_BYTES}, got {max_word_bytes!r}"
    )


def _cut_points(data: bytes, start: int, end: int, max_bytes: int) -> list[int]:
  """Internal cut offsets that split `data[start:end]` into pieces <= max_bytes."""
  cuts = []
  s = start
  while end - s > max_bytes:
    e = s + max_bytes
    # Back off to the start of the character that straddles the limit. The decision
    # only reads bytes before `s + max_bytes + 1`, which keeps cutting prefix-stable.
    for j in range(e, e - 4, -1):
      if not 0x80 <= data[j] < 0xC0:
        e = j
        break
    cuts.append(e)
    s = e
  return cuts


def _apply_limit(data: bytes, ends: np.ndarray, max_bytes: int) -> np.ndarray:
  """Adds cut points to word end offsets `ends` so that no piece exceeds max_bytes."""
  starts = np.concatenate([[0], ends[:-1]])
  long_words = np.flatnonzero(ends - starts > max_bytes)
  if long_words.size == 0:
    return ends
  extra = []
  for k in long_words.tolist():
    extra.extend(_cut_points(data, int(starts[k]), int(ends[k]), max_bytes))
  return np.sort(np.concatenate([ends, np.asarray(extra, dtype=ends.dtype)]))


def _whitespace_ends(data: bytes) -> np.ndarray:
  """End offsets of whitespace-rule words (before the length limit)."""
  n = len(data)
  if n == 0:
    return np.zeros(0, dtype=np.int64)
  ws = _WS[np.frombuffer(data, dtype=np.uint8)]
  # A word starts where a non-whitespace byte follows a whitespace byte.
  starts = np.flatnonzero(ws[:-1] & ~ws[1:]) + 1
  return np.concatenate([starts, [n]]).astype(np.int64)


def _incomplete_tail(data: bytes) -> int:
  """Length of a trailing valid prefix of a multi-byte character (0 if none)."""
  for k in range(1, min(3, len(data)) + 1):
    b = data[-k]
    if not 0x80 <= b < 0xC0:
      if b < 0xC2:
        return 0
      # With final=False a well-formed but unfinished sequence decodes to nothing.
      try:
        out, consumed = codecs.utf_8_decode(data[-k:], "strict", False)
      except UnicodeDecodeError:
        return 0
      return k if consumed == 0 and not out else 0
  return 0


_SPACE_THEN_WS = re.compile(r" [^\S ]")


def _repair(words: list[str], text: str) -> list[str]:
  """Re-splits the two places where `hat_splitter` is not prefix-stable.

  There, text arriving later moves a boundary that was already emitted:
  - a lone space before other whitespace (`" \xa0"` -> `" ", "\xa0"`) joins it once a
    combining mark or format character follows (`" \xa0\u0301"` is one word), because
    the whitespace has turned into a word that absorbs the preceding space;
  - U+2044 FRACTION SLASH (UAX #29 MidNum, not punctuation) splits from a number
    (`"1\u2044"` -> `"1", "\u2044"`) until a digit follows (`"1\u20442"` is one word).
  We always cut before such whitespace and before U+2044, which makes both boundaries
  independent of what follows. Merging at the end instead would not do: a merged last
  word that exceeds max_word_bytes would be cut across the boundary in question.
  """
  if "\u2044" not in text and not _SPACE_THEN_WS.search(text):
    return words
  out = []
  for w in words:
    if len(w) > 1 and w[0] == " " and w[1] != " " and w[1].isspace():
      out.append(" ")
      w = w[1:]
    if "\u2044" in w[1:]:
      parts = w.split("\u2044")
      out.extend(p for p in parts[:1] if p)
      out.extend("\u2044" + p for p in parts[1:])
    else:
      out.append(w)
  return out


class Splitter:
  """Splits bytes into words by `rule`, each piece at most `max_word_bytes` long."""

  def __init__(self, rule: str = "whitespace", max_word_bytes: int = 31):
    _check_args(rule, max_word_bytes)
    self.rule = rule
    self.max_word_bytes = int(max_word_bytes)
    self._hat = None  # hat_splitter.HATSplitter, created lazily (not picklable)

  def __getstate__(self):
    return {"rule": self.rule, "max_word_bytes": self.max_word_bytes}

  def __setstate__(self, state):
    self.__init__(state["rule"], state["max_word_bytes"])

  def __repr__(self):
    return f"Splitter(rule={self.rule!r}, max_word_bytes={self.max_word_bytes})"

  def _hat_split(self, text: str) -> list[str]:
    if self._hat is None:
      from hat_splitter import HATSplitter  # pylint: disable=g-import-not-at-top

      self._hat = HATSplitter()
    return self._hat.split(text)

  def _unicode_lengths(self, data: bytes) -> list[int]:
    """Byte lengths of unicode-rule words (before the length limit)."""
    tail = _incomplete_tail(data)
    body = data[: len(data) - tail]
    lengths: list[int] = []
    for valid, run in utf8_runs(body):
      if valid:
        text = run.decode("utf-8")
        words = _repair(self._hat_split(text), text)
        lengths.extend(len(w.encode("utf-8")) for w in words if w)
      else:
        lengths.append(len(run))  # a run of invalid bytes is one piece
    if tail:
      if lengths:
        lengths[-1] += tail
      else:
        lengths.append(tail)
    return lengths

  def split_with_offsets(self, data: bytes) -> np.ndarray:
    """End offsets (int64, increasing, last == len(data)) of the words of `data`."""
    data = bytes(data)
    if self.rule == "whitespace":
      ends = _whitespace_ends(data)
    else:
      ends = np.cumsum(np.asarray(self._unicode_lengths(data), dtype=np.int64))
    return _apply_limit(data, ends, self.max_word_bytes)

  def word_lengths(self, data: bytes) -> np.ndarray:
    """Byte length (int32) of each word of `data`."""
    ends = self.split_with_offsets(data)
    return np.diff(ends, prepend=0).astype(np.int32)

  def split(self, data: bytes) -> list[bytes]:
    """Words of `data` as bytes; their concatenation is `data`."""
    data = bytes(data)
    ends = self.split_with_offsets(data).tolist()
    return [data[a:b] for a, b in zip([0] + ends[:-1], ends)]


def split_words(
    data: bytes, rule: str = "whitespace", max_word_bytes: int = 31
) -> list[bytes]:
  """Splits `data` into words (see `Splitter`)."""
  return Splitter(rule, max_word_bytes).split(data)


def word_lengths(
    data: bytes, rule: str = "whitespace", max_word_bytes: int = 31
) -> np.ndarray:
  """Byte length (int32) of each word of `data` (see `Splitter`)."""
  return Splitter(rule, max_word_bytes).word_lengths(data)


def utf8_runs(data: bytes) -> list[tuple[bool, bytes]]:
  """Cuts `data` into maximal well-formed UTF-8 runs (True) and invalid-byte runs (False)."""
  try:
    data.decode("utf-8")
    return [(True, data)] if data else []
  except UnicodeDecodeError:
    pass
  out, pos = [], 0
  for m in _VALID_RUN.finditer(data):
    if m.start() > pos:
      out.append((False, data[pos : m.start()]))
    out.append((True, m.group()))
    pos = m.end()
  if pos < len(data):
    out.append((False, data[pos:]))
  return out


def join_words(words: Sequence[bytes]) -> bytes:
  """Inverse of `split_words`."""
  return b"".join(words)
