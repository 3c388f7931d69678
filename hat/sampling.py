"""Sampling primitives and the uncached reference samplers.

`SampleOptions`, host-side `pick` and jit-side `sample_on_device` implement greedy,
temperature, top-k and top-p sampling with per-row seeded keys. The reference samplers
recompute the full context through the training layout for every symbol: slow, simple,
and the ground truth that the cached samplers of `hat.generate` are tested against.
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
from hat.text.codec import PAD_ID, S_ID, W_ID

@dataclasses.dataclass(frozen=True)
class SampleOptions:
  """How to pick each symbol."""

  temperature: float = 0.8
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1 = off
  max_new_bytes: int = 200
  stop: tuple[str, ...] = ()
  seed: int = 0

  @property
  def greedy(self) -> bool:
    return self.temperature <= 0.0

  def device_args(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(temperature, top_k, top_p) as fixed-dtype scalars: new values never recompile."""
    return (np.float32(self.temperature), np.int32(self.top_k), np.float32(self.top_p))


def pick(logits_V: np.ndarray, opts: SampleOptions, rng: np.random.Generator) -> int:
  """Greedy, or temperature + top-k + top-p sampling from one logit vector (fp32)."""
  logits_V = np.asarray(logits_V, np.float64)
  if opts.greedy:
    return int(np.argmax(logits_V))
  z = logits_V / opts.temperature
  if opts.top_k > 0:
    kth = np.sort(z)[-min(opts.top_k, len(z))]
    z = np.where(z < kth, -np.inf, z)
  p = np.exp(z - z.max())
  p /= p.sum()
  if opts.top_p < 1.0:
    order = np.argsort(-p)
    keep = np.cumsum(p[order]) - p[order] < opts.top_p
    mask = np.zeros_like(p, bool)
    mask[order[keep]] = True
    p = np.where(mask, p, 0.0)
    p /= p.sum()
  return int(rng.choice(len(p), p=p))


def sample_on_device(logits_BxV: jax.Array, keys_BxK: jax.Array, temperature: jax.Array,
                     top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """`pick` for a batch inside jit: greedy when temperature <= 0; raw per-row keys."""
  vocab = logits_BxV.shape[-1]
  greedy_B = jnp.argmax(logits_BxV, axis=-1)
  z_BxV = logits_BxV / jnp.maximum(temperature, 1e-6)
  desc_BxV = -jnp.sort(-z_BxV, axis=-1)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  kth_Bx1 = jax.lax.dynamic_slice_in_dim(desc_BxV, k - 1, 1, axis=1)
  z_BxV = jnp.where(z_BxV < kth_Bx1, -jnp.inf, z_BxV)
  probs_BxV = jax.nn.softmax(z_BxV, axis=-1)
  desc_p_BxV = -jnp.sort(-probs_BxV, axis=-1)
  keep_BxV = (jnp.cumsum(desc_p_BxV, axis=-1) - desc_p_BxV < top_p) | (top_p >= 1.0)
  thr_Bx1 = jnp.min(jnp.where(keep_BxV, desc_p_BxV, jnp.inf), axis=-1, keepdims=True)
  z_BxV = jnp.where(probs_BxV >= thr_Bx1, z_BxV, -jnp.inf)
  keys = jax.random.wrap_key_data(keys_BxK)
  sampled_B = jax.vmap(jax.random.categorical)(keys, z_BxV)
  return jnp.where(temperature <= 0.0, greedy_B, sampled_B).astype(jnp.int32)


def _row_keys(seed: int, batch: int) -> np.ndarray:
  """Raw key data per row: row b's stream depends on (seed, b) only."""
  base = jax.random.key(seed)
  keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(batch))
  return np.asarray(jax.random.key_data(keys))


def _split_keys(keys_BxK: jax.Array, active_B: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(next keys, keys to use now); a row's stream only advances when it samples."""
  pairs = jax.vmap(jax.random.split)(jax.random.wrap_key_data(keys_BxK))
  nxt, use = jax.random.key_data(pairs[:, 0]), jax.random.key_data(pairs[:, 1])
  return jnp.where(active_B[:, None], nxt, keys_BxK), use


def _merge_rows(rows_B: jax.Array, new, old, axis: int = 0):
  """Rows where `rows_B` from `new`, others from `old`, along the batch axis."""

  def one(n, o):
    shape = [1] * n.ndim
    shape[axis] = -1
    return jnp.where(rows_B.reshape(shape), n, o)

  return jax.tree.map(one, new, old)


def _cut_at_stop(out: bytes, stop: Sequence[str]) -> bytes:
  for s in stop:
    i = out.find(s.encode())
    if i >= 0:
      out = out[:i]
  return out


def _hit_stop(out: bytes, new: int, stop: Sequence[str]) -> bool:
  """Whether a stop string ends within the last `new` bytes (the rest was checked)."""
  return any(s.encode() in out[-(len(s.encode()) + new - 1):] for s in stop if s)


# ----------------------------------------------------------------------------- HAT


# ---------------------------------------------------------------- uncached reference


def _forward_fn(model: nnx.Module):
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, batch):
    return nnx.merge(graphdef, state)(batch)[0]

  return lambda batch: forward(state, {k: jnp.asarray(v) for k, v in batch.items()})


class ReferenceHATSampler:
  """Uncached HAT sampler: one full forward pass over the training layout per symbol."""

  def __init__(self, model: nnx.Module, cfg, splitter):
    self.cfg, self.splitter = cfg, splitter
    self.forward = _forward_fn(model)

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
    words = list(self.splitter.split(prompt))
    partial = words.pop() if words else b""
    out = b""
    max_word = self.cfg.data.max_word_bytes
    while len(out) < opts.max_new_bytes:
      logits, words = self._logits(words, partial)
      logits[PAD_ID] = -np.inf
      if partial:
        logits[S_ID] = -np.inf  # [S] only follows a finished word
      else:
        logits[W_ID] = -np.inf  # an empty word would loop forever
      if len(partial) >= max_word:
        logits[:256] = -np.inf  # words are cut at max_word_bytes
      sym = pick(logits, opts, rng)
      if sym == S_ID:
        break
      if sym == W_ID:
        words.append(partial)
        partial = b""
        continue
      partial += bytes([sym])
      out += bytes([sym])
      if any(s.encode() in out for s in opts.stop):
        break
    return _cut_at_stop(out, opts.stop)


class ReferenceTokenSampler:
  """Uncached BPE / byte LM sampler: one full forward pass per token."""

  def __init__(self, model: nnx.Module, cfg, tokenizer):
    self.cfg, self.tok = cfg, tokenizer
    self.forward = _forward_fn(model)

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
    ids = list(self.tok.encode(prompt))
    new: list[int] = []
    cap = self.cfg.data.max_tokens - 1
    while len(self.tok.decode(new)) < opts.max_new_bytes:
      ctx = [self.tok.bos_id] + (ids + new)[-cap:]
      logits = np.array(self.forward(self._batch(ctx))[0, len(ctx) - 1], np.float32)
      logits[self.tok.pad_id] = -np.inf
      if self.tok.bos_id != self.tok.eos_id:
        logits[self.tok.bos_id] = -np.inf
      t = pick(logits, opts, rng)
      if t == self.tok.eos_id:
        break
      new.append(t)
      if any(s.encode() in self.tok.decode(new) for s in opts.stop):
        break
    return _cut_at_stop(self.tok.decode(new)[:opts.max_new_bytes], opts.stop)
