"""Buckets of whitespace words for the loss decomposition (`hat.eval.decompose`).

A word is classified on its whitespace-stripped bytes: by its frequency rank in training
text (counted case-sensitively), its length in bytes, whether its first letter is upper
case, whether it holds a digit, and whether punctuation is attached to it.
"""

from __future__ import annotations

import collections
import math
import unicodedata
from typing import Iterable, Sequence

import numpy as np

TOP_K, MID_K = 1_000, 10_000
BLANK = "whitespace only"
GROUPS: dict[str, tuple[str, ...]] = {
    "frequency": ("top 1k", "1k-10k", "rare (>10k)", "unseen", BLANK),
    "length": ("1-2", "3-4", "5-6", "7-9", "10+", BLANK),
    "case": ("capitalised", "not capitalised"),
    "digits": ("has digit", "no digit"),
    "punctuation": ("punct attached", "no punct"),
}


def count_words(docs: Iterable[bytes], max_bytes: int | None = None
                ) -> tuple[collections.Counter, int]:
  """(count of each whitespace-stripped word, bytes read), case-sensitive.

  Reading stops after the document that reaches `max_bytes` (None: read everything).
  """
  counts: collections.Counter = collections.Counter()
  used = 0
  for doc in docs:
    if max_bytes is not None and used >= max_bytes:
      break
    counts.update(bytes(doc).split())  # bytes.split: the splitter's six whitespace bytes
    used += len(doc)
  return counts, used


class FrequencyRanks:
  """Frequency bucket of a word from training counts (rank 0 = most frequent)."""

  def __init__(self, counts: collections.Counter):
    # Ties broken by the word itself, so ranks do not depend on the reading order.
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:MID_K]
    self.rank = {w: r for r, (w, _) in enumerate(top)}
    self.seen = counts

  def bucket(self, stripped: bytes) -> str:
    """The frequency bucket of a whitespace-stripped word."""
    if not stripped:
      return BLANK
    r = self.rank.get(stripped)
    if r is not None:
      return GROUPS["frequency"][0] if r < TOP_K else GROUPS["frequency"][1]
    return GROUPS["frequency"][2] if stripped in self.seen else GROUPS["frequency"][3]


def _is_punct(ch: str) -> bool:
  return unicodedata.category(ch).startswith("P")


def classify(stripped: bytes, ranks: FrequencyRanks) -> dict[str, str]:
  """Bucket of a whitespace-stripped word in every group of GROUPS.

  length: bytes of the stripped word; capitalised: its first letter is upper case;
  digit: any character is a digit; punctuation: its first or last character is one
  (Unicode category P*). A word of whitespace only is its own frequency/length bucket.
  """
  text = stripped.decode("utf-8", errors="replace")
  n = len(stripped)
  length = BLANK if n == 0 else next(label for hi, label in (
      (2, "1-2"), (4, "3-4"), (6, "5-6"), (9, "7-9"), (math.inf, "10+")) if n <= hi)
  letter = next((c for c in text if c.isalpha()), "")
  return {
      "frequency": ranks.bucket(stripped),
      "length": length,
      "case": "capitalised" if letter.isupper() else "not capitalised",
      "digits": "has digit" if any(c.isdigit() for c in text) else "no digit",
      "punctuation": "punct attached" if text and (_is_punct(text[0]) or _is_punct(text[-1]))
                     else "no punct",
  }


def bucket_indices(stripped: Sequence[bytes], ranks: FrequencyRanks) -> dict[str, np.ndarray]:
  """{group: index into GROUPS[group] for every word}."""
  cache: dict[bytes, dict[str, str]] = {}
  out = {g: np.zeros(len(stripped), np.int64) for g in GROUPS}
  for i, w in enumerate(stripped):
    labels = cache.get(w)
    if labels is None:
      labels = cache[w] = classify(w, ranks)
    for g, label in labels.items():
      out[g][i] = GROUPS[g].index(label)
  return out
