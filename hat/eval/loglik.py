"""Log-likelihood of a continuation given a context, for HAT and token models.

`Scorer.loglikelihood(context, continuation)` is the summed log-probability of the
symbols the model emits *after* the last context byte:

- HAT: every byte of the continuation, and the `[W]` of every word that ends at or after
  the context's end and before the text's end. A word that straddles the split is scored
  from inside the word, so the split point may fall anywhere, even mid-word, and scores
  add up exactly: `ll(a, b + c) == ll(a, b) + ll(a + b, c)`. The final word's `[W]` is
  not counted: the text may go on.
- BPE / byte LM / merge HAT (token layouts): the tokens of `encode(continuation)` after
  `BOS + encode(context)` (the lm-evaluation-harness convention; exact at any split for
  the byte-level families). For BPE the tokens are the ones the model saw in training
  only where the continuation starts with a space after a non-space; there the score is
  that of the continuation *and a word boundary after it* (see `hat.eval.exact_bpe`).
- BPE with `Scorer(..., exact=True)`: the byte-level log-likelihood
  `log P(context + continuation) - log P(context)`, each a sum over the cover encodings
  of the byte prefix (`hat.eval.exact_bpe`): exact and additive at any split, like HAT.
  `exact` changes nothing for the other families, which are exact already.

Requests are laid out with the run's static shapes and scored in fixed-size batches by
one jit-compiled function, so nothing recompiles per request. A context longer than the
layout holds keeps its most recent words / tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hat.data import layout
from hat.data.layout import Segment
from hat.family import family_of


@dataclasses.dataclass(frozen=True)
class Score:
  """Summed log-prob (nats) of a continuation, and whether greedy decoding produces it."""

  logprob: float
  is_greedy: bool  # always False for exact BPE scores (no byte-level greedy check)
  num_symbols: int  # scored symbols: bytes / [W]s for HAT, tokens, bytes for exact BPE


def _as_bytes(x: str | bytes) -> bytes:
  return x.encode("utf-8") if isinstance(x, str) else bytes(x)


def _log_probs(logits_BxLxV, targets_BxL):
  """(log-softmax over the vocabulary in fp32, the targets' log-probs)."""
  logp_BxLxV = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
  return logp_BxLxV, jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]


@jax.jit
def _token_logprobs(logits_BxLxV, targets_BxL):
  _, lp_BxL = _log_probs(logits_BxLxV, targets_BxL)
  greedy_BxL = jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL
  return lp_BxL, greedy_BxL


@jax.jit
def _row_logprobs(logits_BxTxV, targets_BxT, last_B):
  """Per-position target log-probs, and the whole distribution at each row's end."""
  logp_BxTxV, lp_BxT = _log_probs(logits_BxTxV, targets_BxT)
  final_BxV = logp_BxTxV[jnp.arange(logp_BxTxV.shape[0]), last_B]
  return lp_BxT, final_BxV


class Scorer:
  """Scores (context, continuation) pairs with a trained model of any kind."""

  def __init__(self, model: nnx.Module, cfg, tokenizer=None, batch_size: int = 8,
               exact: bool = False, max_cover_rows: int = 256):
    self.cfg, self.tok, self.batch_size = cfg, tokenizer, batch_size
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, batch):
      return nnx.merge(graphdef, state)(batch)[0]

    self._forward = lambda b: forward(state, {k: jnp.asarray(v) for k, v in b.items()})
    self.family = family_of(cfg)
    if self.family.words:
      from hat.text.splitter import Splitter
      self.splitter = Splitter(cfg.data.splitter, cfg.data.max_word_bytes)
      self._make_request = self._hat_request
    else:
      if tokenizer is None:
        raise ValueError(f"the {self.family.name} family needs its tokenizer to score text")
      self._make_request = self._token_request
    # Only BPE needs marginalising over tokenisations; the other families are byte-exact.
    self.exact = None
    if exact and self.family.name == "bpe":
      from hat.eval.exact_bpe import ExactBPE
      self.exact = ExactBPE(tokenizer, cfg.data.max_tokens, max_rows=max_cover_rows)

  # ------------------------------------------------------------------ request layout

  def _hat_request(self, context: bytes, continuation: bytes):
    """(sequence, mask of counted slots) for one HAT request."""
    d = self.cfg.data
    words = list(self.splitter.split(context + continuation))
    start = 0  # byte offset of words[0] in context + continuation
    while True:
      try:
        seq = layout.hat_sequences([Segment(tuple(words), False)], max_units=d.max_units,
                                   num_rows=d.num_rows, row_len=d.row_len, overflow="error")[0]
        break
      except layout.CapacityError:
        if len(words) <= 1 or start + len(words[0]) > len(context):
          raise ValueError("continuation is too long for the layout's capacity "
                           f"(data.max_units={d.max_units}, data.num_rows*row_len="
                           f"{d.num_rows * d.row_len})") from None
        start += len(words[0])
        words = words[1:]
    ctx_len, total = len(context) - start, len(context) + len(continuation) - start
    lens = np.asarray([0] + [len(w) for w in words])  # unit 0 is START
    offs = np.concatenate([[0], np.cumsum(lens[1:]) - lens[1:]])
    unit, k = seq["slot_unit_BxS"], seq["slot_pos_BxS"]
    u = np.maximum(unit, 0)
    is_word = (unit >= 1) & (unit < len(lens))
    byte_off = offs[np.minimum(u, len(lens) - 1)] + k
    word_end = offs[np.minimum(u, len(lens) - 1)] + lens[np.minimum(u, len(lens) - 1)]
    is_byte = is_word & (k < lens[np.minimum(u, len(lens) - 1)])
    is_w = is_word & ~is_byte
    count = (is_byte & (byte_off >= ctx_len)) | \
            (is_w & (word_end >= ctx_len) & (word_end < total))
    count &= seq["target_mask_BxS"].astype(bool)
    return seq, count, "targets_BxS"

  def _token_request(self, context: bytes, continuation: bytes):
    """(sequence, mask of counted positions) for one BPE / byte-LM request."""
    t = self.cfg.data.max_tokens
    ctx, cont = list(self.tok.encode(context)), list(self.tok.encode(continuation))
    if len(cont) + 1 > t:
      raise ValueError(f"continuation has {len(cont)} tokens, more than data.max_tokens={t}")
    ctx = ctx[max(0, len(ctx) + len(cont) + 1 - t):]
    ids = [self.tok.bos_id] + ctx + cont
    n = len(ids)
    tokens = np.full(t, self.tok.pad_id, np.int32)
    tokens[:n] = ids
    targets = np.full(t, self.tok.pad_id, np.int32)
    targets[:n - 1] = ids[1:]
    count = np.zeros(t, bool)
    count[len(ctx):n - 1] = True
    seq = {"tokens_BxT": tokens, "targets_BxT": targets,
           "target_mask_BxT": count.astype(np.int32),
           "segment_BxT": (np.arange(t) < n).astype(np.int32),
           "pos_BxT": np.where(np.arange(t) < n, np.arange(t), 0).astype(np.int32),
           "num_bytes_B": np.int32(len(continuation))}
    return seq, count, "targets_BxT"

  def _token_row(self, ids: Sequence[int]) -> dict[str, np.ndarray]:
    """One `BOS + ids` row whose targets are `ids` (for the exact BPE path)."""
    t, n = self.cfg.data.max_tokens, len(ids) + 1
    tokens = np.full(t, self.tok.pad_id, np.int32)
    tokens[:n] = [self.tok.bos_id, *ids]
    targets = np.full(t, self.tok.pad_id, np.int32)
    targets[:n - 1] = ids
    return {"tokens_BxT": tokens, "targets_BxT": targets,
            "target_mask_BxT": (np.arange(t) < n - 1).astype(np.int32),
            "segment_BxT": (np.arange(t) < n).astype(np.int32),
            "pos_BxT": np.where(np.arange(t) < n, np.arange(t), 0).astype(np.int32),
            "num_bytes_B": np.int32(0)}

  def _score_rows(self, rows: Sequence[tuple[int, ...]]):
    """Yields (target log-probs, last-position log-softmax) per row, in fixed batches."""
    for i in range(0, len(rows), self.batch_size):
      chunk = list(rows[i:i + self.batch_size])
      laid = [self._token_row(r) for r in chunk]
      laid += [laid[-1]] * (self.batch_size - len(laid))
      batch = layout.stack(laid)
      last = np.asarray([len(r) for r in chunk] + [len(chunk[-1])] * (self.batch_size
                                                                      - len(chunk)))
      lp, final = _row_logprobs(self._forward(batch), jnp.asarray(batch["targets_BxT"]),
                                jnp.asarray(last, np.int32))
      lp, final = np.asarray(lp), np.asarray(final)
      for j in range(len(chunk)):
        yield lp[j], final[j]

  # ------------------------------------------------------------------------- scoring

  def loglikelihood_many(self, requests: Sequence[tuple[str | bytes, str | bytes]]
                         ) -> list[Score]:
    """Scores many (context, continuation) pairs in fixed-size batches."""
    if self.exact is not None:
      pairs = [(_as_bytes(c), _as_bytes(x)) for c, x in requests]
      lls = self.exact.loglikelihood_many(pairs, self._score_rows)
      return [Score(ll, False, len(x)) for ll, (_, x) in zip(lls, pairs)]
    laid = [self._make_request(_as_bytes(c), _as_bytes(x)) for c, x in requests]
    out: list[Score] = []
    for i in range(0, len(laid), self.batch_size):
      chunk = laid[i:i + self.batch_size]
      rows = [s for s, _, _ in chunk]
      rows += [rows[-1]] * (self.batch_size - len(rows))  # fixed batch shape
      batch = layout.stack(rows)
      key = chunk[0][2]
      lp, greedy = _token_logprobs(self._forward(batch), jnp.asarray(batch[key]))
      lp, greedy = np.asarray(lp, np.float64), np.asarray(greedy)
      for j, (_, count, _) in enumerate(chunk):
        out.append(Score(float(lp[j][count].sum()), bool(greedy[j][count].all()),
                         int(count.sum())))
    return out

  def loglikelihood(self, context: str | bytes, continuation: str | bytes) -> Score:
    """Summed log-prob of `continuation` after `context` (see the module docstring)."""
    return self.loglikelihood_many([(context, continuation)])[0]

  def choose(self, context: str | bytes, options: Sequence[str | bytes],
             normalize: bool = False) -> tuple[int, list[float]]:
    """Multiple choice: the option with the highest log-prob (per byte if `normalize`)."""
    scores = self.loglikelihood_many([(context, o) for o in options])
    vals = [s.logprob / max(1, len(_as_bytes(o))) if normalize else s.logprob
            for s, o in zip(scores, options)]
    return int(np.argmax(vals)), vals
