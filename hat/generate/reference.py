"""Uncached reference samplers: one full forward pass over the training layout per symbol.

Slow and simple: the ground truth the cached samplers are tested against. A delete-gated
HAT runs its batched hard-deletion forward (`model(batch, hard=True)`), the pass whose
K/V compaction the cached sampler reproduces step by step.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hat.data import layout
from hat.data.layout import Segment
from hat.family import family_of
from hat.generate import rules
from hat.generate.sampling import SampleOptions, cut_at_stop, hit_stop, pick
from hat.text.codec import S_ID, W_ID
from hat.text.splitter import Splitter


def forward_fn(model: nnx.Module, **kwargs):
  """Jitted `model(batch, **kwargs)` logits over numpy batches."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, batch):
    return nnx.merge(graphdef, state)(batch, **kwargs)[0]

  return lambda batch: forward(state, {k: jnp.asarray(v) for k, v in batch.items()})


class _OneAtATime:
  """The batch interface of the cached samplers, one `generate` per prompt."""

  def generate(self, prompt: bytes, opts: SampleOptions) -> bytes:
    raise NotImplementedError

  def generate_batch(self, prompts: Sequence[bytes], opts: SampleOptions) -> list[bytes]:
    """One `generate` per prompt."""
    return [self.generate(p, opts) for p in prompts]

  def generate_many(self, prompts: Sequence[bytes], opts: SampleOptions, batch_size: int,
                    progress: bool = False) -> list[bytes]:
    """One `generate` per prompt (`batch_size` and `progress` as the cached samplers)."""
    del batch_size, progress
    return self.generate_batch(prompts, opts)


class ReferenceHATSampler(_OneAtATime):
  """Uncached HAT sampler (plain or delete-gated): full forward per symbol, one row."""

  def __init__(self, model: nnx.Module, cfg, tokenizer=None):
    del tokenizer  # words come from the splitter
    self.cfg = cfg
    self.splitter = Splitter(cfg.data.splitter, cfg.data.max_word_bytes)
    hard = {"hard": True} if family_of(cfg).gate == "delete" else {}
    self.forward = forward_fn(model, **hard)

  def _logits(self, words: list[bytes], partial: bytes) -> tuple[np.ndarray, list[bytes]]:
    d = self.cfg.data
    while True:
      try:
        seqs = layout.hat_sequences([Segment(tuple(words) + (partial,), False)],
                                    max_units=d.max_units, num_rows=d.num_rows,
                                    row_len=d.row_len, overflow="error")
        break
      except layout.CapacityError:
        words = words[1:]  # keep the most recent context that fits
    seq = seqs[0]
    unit = int(seq["num_units_B"]) - 1
    slot = int(seq["unit_slot_BxW"][unit]) + len(partial)
    logits = self.forward(layout.stack([seq]))
    return np.array(logits[0, slot], np.float32), words

  def generate(self, prompt: bytes, opts: SampleOptions) -> bytes:
    """Continues `prompt`; returns only the new bytes."""
    rng = np.random.default_rng(opts.seed)
    words = list(self.splitter.split(bytes(prompt)))
    partial = words.pop() if words else b""
    out = b""
    max_word = self.cfg.data.max_word_bytes
    while len(out) < opts.max_new_bytes:
      logits, words = self._logits(words, partial)
      banned = rules.word_banned(np.array([len(partial)]), max_word, np)[0]
      sym = pick(np.where(banned, -np.inf, logits), opts, rng)
      if sym == S_ID:
        break
      if sym == W_ID:
        words.append(partial)
        partial = b""
        continue
      partial += bytes([sym])
      out += bytes([sym])
      if hit_stop(out, 1, opts.stop):
        break
    return cut_at_stop(out, opts.stop)


class ReferenceTokenSampler(_OneAtATime):
  """Uncached token-layout sampler (BPE, byte LM, merge HAT): full forward per token."""

  def __init__(self, model: nnx.Module, cfg, tokenizer):
    self.cfg, self.tok = cfg, tokenizer
    self.forward = forward_fn(model)

  def _batch(self, ctx: list[int]) -> dict[str, np.ndarray]:
    t, n = self.cfg.data.max_tokens, len(ctx)
    tokens = np.full((1, t), self.tok.pad_id, np.int32)
    tokens[0, :n] = ctx
    segment = np.zeros((1, t), np.int32)
    segment[0, :n] = 1
    pos = np.zeros((1, t), np.int32)
    pos[0, :n] = np.arange(n)
    zeros = np.zeros((1, t), np.int32)
    return {"tokens_BxT": tokens, "targets_BxT": zeros, "target_mask_BxT": zeros,
            "segment_BxT": segment, "pos_BxT": pos, "num_bytes_B": np.zeros(1, np.int32)}

  def generate(self, prompt: bytes, opts: SampleOptions) -> bytes:
    """Continues `prompt`; returns only the new bytes."""
    rng = np.random.default_rng(opts.seed)
    ids = list(self.tok.encode(bytes(prompt)))
    new: list[int] = []
    cap = self.cfg.data.max_tokens - 1
    out = b""
    while len(out) < opts.max_new_bytes:
      ctx = [self.tok.bos_id] + (ids + new)[-cap:]
      logits = np.array(self.forward(self._batch(ctx))[0, len(ctx) - 1], np.float32)
      banned = rules.token_banned(self.tok, logits.shape[-1], np)[0]
      t = pick(np.where(banned, -np.inf, logits), opts, rng)
      if t == self.tok.eos_id:
        break
      new.append(t)
      piece = self.tok.decode([t])
      out += piece
      if piece and hit_stop(out, len(piece), opts.stop):
        break
    return cut_at_stop(out[:opts.max_new_bytes], opts.stop)
