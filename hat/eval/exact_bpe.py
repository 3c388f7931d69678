"""Exact byte-level log-likelihood of a BPE language model at any split point.

A token model scores token sequences, so `encode(a) + encode(b)` is off-distribution
whenever the split between `a` and `b` falls inside a token (`[..., ' that', ' '] +
['the', ...]`). Phan et al. 2024 (arXiv 2410.09303, Byte-Token Representation Lemma):
the probability that the model's text starts with the bytes `x` is the summed probability
of the *cover encodings* of `x`. Then

    ll(a, b) = log P(a + b) - log P(a),

a difference of one function of the byte prefix, so `ll(a, b + c) == ll(a, b) +
ll(a + b, c)` at any split, exactly as for HAT (whose scores are byte prefix
probabilities too).

**The covers summed over** (the *valid* covers): `c = enc(x[:j]) + [t]` for
`0 <= j < len(x)`, where `enc` is the tokenizer's canonical encoding, the bytes of token
`t` start with `x[j:]` (so `t` holds the last byte of `x` and may reach past it), and `c`
is itself canonical, `enc(decode(c)) == c`. These are the token sequences the tokenizer
produces for some text, whose decoding short of the last token is a proper prefix of `x`
and whose last token covers the end of `x`: for BPE a prefix of a canonical encoding is
canonical (no merge crosses a final token boundary, and merges left of it happen in the
same order without the right part), so every valid cover has this form.
Non-canonical sequences (`[' ', 'the']`) are left out, as in Phan et al.: the model
never saw them (a trained model gives them next to no mass; an untrained one would only
add noise through them).

**Relation to the lm-evaluation-harness path** (`encode(context) + encode(continuation)`):
at a cut before a space (`a` ends a word, `b` starts with the space) that path gives
`log B(a + b) - log B(a)`, with `B(x)` the probability of the canonical tokens of `x`
alone, i.e. of `x` *followed by a token boundary*. The exact value replaces both `B`s by
the prefix probability `P >= B`: it also pays for "the word ends here" after `a` (as HAT
does with its `[W]`), and not after `b`. The two agree up to those two word-boundary terms.

**Cost**: `P(x) = sum_j P(enc(x[:j])) * sum_{t} p(t | enc(x[:j]))`: one model row per
start `j` of the last token (at most the longest piece's length back from the end, and
only where a valid `t` exists; one to a few in practice), scored by the caller in
fixed-size batches, the inner sum a logsumexp over the row's last distribution. A space
after a non-space is a hard boundary of this tokenizer (no piece holds one), so validity
is checked on the last word alone and all rows share the canonical tokens before it.
A request needing more than `max_rows` model rows is a one-line error, never a silent cut.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Sequence

import numpy as np

_SPACE = 0x20
_CACHE_SIZE = 1 << 16
# (row token ids without BOS, per-row log-probs of its targets, last-position log-softmax)
RowScorer = Callable[[Sequence[tuple[int, ...]]], Iterable[tuple[np.ndarray, np.ndarray]]]


@dataclasses.dataclass(frozen=True)
class Cover:
  """One group of valid covers: the canonical tokens of `x[:j]`, then any of `last`."""

  prefix: tuple[int, ...]
  last: np.ndarray  # candidate final token ids (int32), all valid


@dataclasses.dataclass
class Stats:
  """Running cost counters (for reports): requests, model rows, cover encodings."""

  requests: int = 0
  rows: int = 0
  groups: int = 0
  covers: int = 0


def hard_boundary(x: bytes, j: int) -> int:
  """The last `p <= j` that no token crosses in any text starting with `x`.

  That is 0 or a space after a non-space: the tokenizer never makes a piece holding both.
  """
  p = j
  while p > 0 and not (x[p] == _SPACE and x[p - 1] != _SPACE):
    p -= 1
  return p


class ExactBPE:
  """Byte prefix log-probabilities of a BPE LM, summed over its valid cover encodings."""

  def __init__(self, tokenizer, max_tokens: int, max_rows: int = 64):
    if max_rows < 1:
      raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    self.tok, self.max_tokens, self.max_rows = tokenizer, max_tokens, max_rows
    self.pieces = [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
    by_prefix: dict[bytes, list[int]] = {}
    for i, p in enumerate(self.pieces):
      for k in range(1, len(p) + 1):  # specials decode to b"" and are never a cover
        by_prefix.setdefault(p[:k], []).append(i)
    self._by_prefix = {k: np.asarray(v, np.int32) for k, v in by_prefix.items()}
    self.max_piece_bytes = max(len(p) for p in self.pieces)
    self.stats = Stats()
    self._valid: dict[tuple[bytes, bytes], np.ndarray] = {}

  def _valid_last(self, word: bytes, rest: bytes) -> np.ndarray:
    """Tokens t with bytes starting with `rest` such that enc(word + t) == enc(word) + [t].

    `word` starts at a hard boundary, so this is the validity of the whole cover.
    """
    key = (word, rest)
    if key not in self._valid:
      if len(self._valid) > _CACHE_SIZE:  # words repeat; a bounded cache is plenty
        self._valid.clear()
      head = self.tok.encode(word)
      cands = self._by_prefix.get(rest, np.zeros(0, np.int32)).tolist()
      self._valid[key] = np.asarray(
          [t for t in cands if self.tok.encode(word + self.pieces[t]) == head + [t]],
          np.int32)
    return self._valid[key]

  def covers(self, x: bytes) -> list[Cover]:
    """The valid covers of the byte prefix `x`, grouped by their canonical prefix."""
    out, heads = [], {}
    for j in range(max(0, len(x) - self.max_piece_bytes), len(x)):
      if x[j:] not in self._by_prefix:
        continue
      h = hard_boundary(x, j)
      last = self._valid_last(x[h:j], x[j:])
      if not len(last):
        continue
      if h not in heads:
        heads[h] = self.tok.encode(x[:h])
      out.append(Cover(tuple(heads[h] + self.tok.encode(x[h:j])), last))
    if x and not out:  # the canonical encoding of x is always a cover
      raise AssertionError(f"no valid cover found for {x[-20:]!r}")
    return out

  def loglikelihood_many(self, requests: Sequence[tuple[bytes, bytes]],
                         score_rows: RowScorer) -> list[float]:
    """log P(context + continuation) - log P(context) per request (nats)."""
    plans, rows, row_index = [], [], {}
    for context, continuation in requests:
      if not continuation:
        plans.append(None)
        continue
      ends = [self.covers(context) if context else [],
              self.covers(context + continuation)]
      groups = ends[0] + ends[1]
      # Tokens all covers share cancel out of the ratio; with no context nothing cancels.
      shared = _common_prefix_len([g.prefix for g in groups]) if context else 0
      longest = max(len(g.prefix) for g in groups)
      drop = max(0, longest + 1 - self.max_tokens)  # +1 for BOS
      if drop > shared:
        raise ValueError(
            f"the last {longest - shared} tokens of a request differ between its covers, "
            f"more than data.max_tokens={self.max_tokens} holds; shorten the continuation")
      slots = []
      for side, gs in enumerate(ends):
        for g in gs:
          key = g.prefix[drop:]
          if key not in row_index:
            row_index[key] = len(rows)
            rows.append(key)
          slots.append((side, row_index[key], shared - drop, g.last))
      n_rows = len({s[1] for s in slots})
      if n_rows > self.max_rows:
        raise ValueError(f"exact BPE scoring needs {n_rows} model rows for one request, "
                         f"more than max_rows={self.max_rows}")
      plans.append(slots)
      self.stats.requests += 1
      self.stats.groups += len(slots)
      self.stats.covers += sum(len(s[3]) for s in slots)
    self.stats.rows += len(rows)

    # Per row: consumers (request, side, count-from, candidates) -> masses.
    needs: dict[int, list] = {}
    for r, slots in enumerate(plans):
      for k, (side, row, start, last) in enumerate(slots or ()):
        needs.setdefault(row, []).append((r, k, start, last))
    mass = [[None] * len(s) if s else [] for s in plans]
    for row, (lp_T, final_V) in zip(range(len(rows)), score_rows(rows)):
      for r, k, start, last in needs[row]:
        n = len(rows[row])
        prefix = float(np.sum(lp_T[start:n], dtype=np.float64))
        mass[r][k] = prefix + _logsumexp(final_V[last])
    out = []
    for slots, m in zip(plans, mass):
      if slots is None:
        out.append(0.0)
        continue
      sides = [[v for (side, *_), v in zip(slots, m) if side == s] for s in (0, 1)]
      ctx = _logsumexp(np.asarray(sides[0])) if sides[0] else 0.0
      out.append(_logsumexp(np.asarray(sides[1])) - ctx)
    return out


def _common_prefix_len(seqs: Sequence[tuple[int, ...]]) -> int:
  first = min(seqs, key=len)
  n = len(first)
  for s in seqs:
    k = 0
    while k < n and s[k] == first[k]:
      k += 1
    n = k
  return n


def _logsumexp(v: np.ndarray) -> float:
  v = np.asarray(v, np.float64)
  m = float(np.max(v))
  if not np.isfinite(m):
    return m
  return m + float(np.log(np.sum(np.exp(v - m))))
