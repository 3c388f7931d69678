"""Sampling primitives: options, host-side `pick`, jit-side `sample_on_device`, stop strings.

Greedy, temperature, top-k and top-p sampling with per-row seeded keys: row b's random
stream depends on (seed, b) only, and advances only when the row samples, so a row's
output does not depend on the other rows of its batch.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SampleOptions:
  """How to pick each symbol, and when to stop."""

  temperature: float = 0.8
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1 = off
  max_new_bytes: int = 200
  stop: tuple[str, ...] = ()
  seed: int = 0

  @property
  def greedy(self) -> bool:
    return self.temperature <= 0.0

  def device_args(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(temperature, top_k, top_p, max_new_bytes) as fixed-dtype scalars: never recompile."""
    return (np.float32(self.temperature), np.int32(self.top_k), np.float32(self.top_p),
            np.int32(max(self.max_new_bytes, 0)))


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


def row_keys(seed: int, batch: int) -> np.ndarray:
  """Raw key data per row: row b's stream depends on (seed, b) only."""
  base = jax.random.key(seed)
  keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(batch))
  return np.asarray(jax.random.key_data(keys))


def split_keys(keys_BxK: jax.Array, active_B: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(next keys, keys to use now); a row's stream only advances when it samples."""
  pairs = jax.vmap(jax.random.split)(jax.random.wrap_key_data(keys_BxK))
  nxt, use = jax.random.key_data(pairs[:, 0]), jax.random.key_data(pairs[:, 1])
  return jnp.where(active_B[:, None], nxt, keys_BxK), use


def stop_strings(stop: Sequence[str]) -> list[bytes]:
  """The non-empty stop strings as bytes (an empty one would cut everything)."""
  return [s.encode("utf-8", "surrogateescape") for s in stop if s]


def cut_at_stop(out: bytes, stop: Sequence[str]) -> bytes:
  """`out` up to the earliest occurrence of any stop string."""
  cut = len(out)
  for s in stop_strings(stop):
    i = out.find(s)
    if i >= 0:
      cut = min(cut, i)
  return out[:cut]


def hit_stop(out: bytes, new: int, stop: Sequence[str]) -> bool:
  """Whether a stop string ends within the last `new` bytes (the rest was checked)."""
  return any(s in out[max(0, len(out) - new - len(s) + 1):] for s in stop_strings(stop))
