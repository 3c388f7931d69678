"""Sampling primitives: options, host-side `pick`, jit-side `sample_on_device`, stop strings.

Greedy, temperature, top-k and top-p sampling with per-row seeded keys: row b's random
stream depends on (seed, b) only, and advances only when the row samples, so a row's
output does not depend on the other rows of its batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hat.cli import UserError


@dataclasses.dataclass(frozen=True)
class SampleOptions:
  """How to pick each symbol, and when to stop."""

  temperature: float = 0.8
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1 = off
  max_new_bytes: int = 200
  stop: tuple[str, ...] = ()
  seed: int = 0

  def __post_init__(self):
    """Checks every option once, so a bad one fails here in one line, not as NaN logits
    or NUL bytes deep in the decode loop; a single stop string becomes a 1-tuple."""
    if isinstance(self.stop, (str, bytes)):
      object.__setattr__(self, "stop", (self.stop,))
    else:
      object.__setattr__(self, "stop", tuple(self.stop))
    if not math.isfinite(self.temperature) or self.temperature < 0:
      raise UserError(f"temperature must be finite and >= 0 (0 = greedy), got "
                      f"{self.temperature}")
    if not 0 < self.top_p <= 1:  # NaN fails too
      raise UserError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
    if int(self.top_k) != self.top_k or self.top_k < 0:
      raise UserError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")
    if int(self.max_new_bytes) != self.max_new_bytes:
      raise UserError(f"max_new_bytes must be an integer, got {self.max_new_bytes}")
    if int(self.seed) != self.seed or not -2**31 <= self.seed < 2**32:
      raise UserError(f"seed must be an integer that fits in 32 bits, got {self.seed}")
    if not all(isinstance(s, str) for s in self.stop):
      raise UserError(f"stop strings must be str, got {self.stop!r}")

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
  """`pick` for a batch inside jit: greedy when temperature <= 0; raw per-row keys.

  No sort over the vocabulary (on CPU a sort of 32 x 2,048 logits costs more than the
  model step): top-k and top-p thresholds are found by bisection over the float bits,
  and the draw is one uniform per row against the cumulative distribution. Greedy,
  top-k off and top-p off skip their work at run time (`lax.cond` on the traced
  options, so changing them never recompiles).
  """
  return jax.lax.cond(
      temperature <= 0.0,
      _first_argmax,
      lambda l: _sample(l, keys_BxK, temperature, top_k, top_p), logits_BxV)


# Draws per row in the second round of sampling by rejection (one vectorised pass); rows
# that drew no kept symbol in either round take the exact path.
SECOND_ROUND_DRAWS = 4


def _sample(logits_BxV, keys_BxK, temperature, top_k, top_p) -> jax.Array:
  """Temperature, then top-k and top-p (by rejection when only one is on), then a draw."""
  z_BxV = logits_BxV.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
  both = (top_p < 1.0) & (top_k > 0) & (top_k < z_BxV.shape[-1])
  return jax.lax.cond(both, _sample_exact, _sample_by_rejection, z_BxV, keys_BxK, top_k,
                      top_p)


def _sample_exact(z_BxV, keys_BxK, top_k, top_p) -> jax.Array:
  """Top-k threshold and top-p threshold by bisection, then one inverse-CDF draw per row."""
  vocab = z_BxV.shape[-1]

  def top_k_mask(z_BxV):
    key_BxV = _order_key(z_BxV)
    kth_B = _kth_largest_key(key_BxV, top_k)
    return jnp.where(key_BxV >= kth_B[:, None], z_BxV, -jnp.inf)  # ties stay, as in `pick`

  z_BxV = jax.lax.cond((top_k > 0) & (top_k < vocab), top_k_mask, lambda z: z, z_BxV)
  probs_BxV = jax.nn.softmax(z_BxV, axis=-1)

  def top_p_mask(probs_BxV):
    bits_BxV = jax.lax.bitcast_convert_type(probs_BxV, jnp.uint32)
    thr_B = _nucleus_threshold(probs_BxV, bits_BxV, top_p)
    return jnp.where(bits_BxV >= thr_B[:, None], probs_BxV, 0.0)

  probs_BxV = jax.lax.cond(top_p < 1.0, top_p_mask, lambda p: p, probs_BxV)
  u_Bx1 = jax.vmap(jax.random.uniform)(jax.random.wrap_key_data(keys_BxK))[:, None]
  return _draw(probs_BxV, _cumsum(probs_BxV), u_Bx1)[:, 0]


def _sample_by_rejection(z_BxV, keys_BxK, top_k, top_p) -> jax.Array:
  """Top-k or top-p sampling (one of them, or neither) as draws from the full
  distribution, keeping a row's first draw that lies in its kept set S.

  A draw from p conditioned on landing in S is a draw from p restricted to S and
  renormalised: exactly top-k (top-p) sampling. Symbol i is in the top-k set when fewer
  than k symbols have a larger logit (ties of the k-th stay, as in `pick`), in the top-p
  set when the symbols more likely than i hold less than top_p of the mass (ties of the
  last one stay, as in `_nucleus_threshold`): one pass per draw, where a threshold takes
  a bisection of 8-32 passes. Each row draws once; if any row missed S, every row draws
  `SECOND_ROUND_DRAWS` more (its own key, folded); rows that missed every time take the
  exact path. The result is exact in every case. A top-p set holds at least top_p of the
  mass, so a draw lands in it with probability >= top_p whatever the distribution; a
  top-k set holds most of the mass of a trained model but little of a flat one.
  `tools/bench_sampling.py`, 32 x 259 symbols, top-k 50: 54 against 95 us per draw with
  97% of the mass in S, but 131 against 97 us with 55% (flat distributions pay for the
  rounds that miss, then the exact path).
  """
  vocab = z_BxV.shape[-1]
  probs_BxV = jax.nn.softmax(z_BxV, axis=-1)
  cdf_BxV = _cumsum(probs_BxV)
  keys = jax.random.wrap_key_data(keys_BxK)
  topk_on = (top_k > 0) & (top_k < vocab)
  topp_on = top_p < 1.0

  def in_top_k(index_BxR):
    z_drawn_BxR = jnp.take_along_axis(z_BxV, index_BxR, axis=1)
    return jnp.sum(z_BxV[:, None, :] > z_drawn_BxR[:, :, None], axis=-1) < top_k

  def in_top_p(index_BxR):
    p_drawn_BxR = jnp.take_along_axis(probs_BxV, index_BxR, axis=1)
    likelier_BxR = jnp.sum(jnp.where(probs_BxV[:, None, :] > p_drawn_BxR[:, :, None],
                                     probs_BxV[:, None, :], 0.0), axis=-1)
    return likelier_BxR < top_p

  def in_set(index_BxR):
    """Whether each drawn symbol is kept (a pass over the vocabulary per filter on)."""
    every_BxR = lambda i: jnp.ones(i.shape, jnp.bool_)
    return (jax.lax.cond(topk_on, in_top_k, every_BxR, index_BxR)
            & jax.lax.cond(topp_on, in_top_p, every_BxR, index_BxR))

  u_Bx1 = jax.vmap(jax.random.uniform)(keys)[:, None]
  index_B = _draw(probs_BxV, cdf_BxV, u_Bx1)[:, 0]
  found_B = in_set(index_B[:, None])[:, 0]

  def second_round(_):
    u_BxR = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1),
                                                  (SECOND_ROUND_DRAWS,)))(keys)
    index_BxR = _draw(probs_BxV, cdf_BxV, u_BxR)
    ok_BxR = in_set(index_BxR)
    again_B = jnp.take_along_axis(index_BxR, jnp.argmax(ok_BxR, axis=1)[:, None], axis=1)[:, 0]
    found2_B = found_B | jnp.any(ok_BxR, axis=1)
    picked_B = jnp.where(found_B, index_B, again_B)

    def exact(_):
      fresh_BxK = jax.random.key_data(jax.vmap(lambda k: jax.random.fold_in(k, 2))(keys))
      return jnp.where(found2_B, picked_B, _sample_exact(z_BxV, fresh_BxK, top_k, top_p))

    return jax.lax.cond(jnp.all(found2_B), lambda _: picked_B, exact, None)

  return jax.lax.cond(jnp.all(found_B), lambda _: index_B, second_round, None)


def _draw(probs_BxV: jax.Array, cdf_BxV: jax.Array, u_BxR: jax.Array) -> jax.Array:
  """Inverse-CDF draws: per row and uniform, the first symbol with mass whose cumulative
  mass exceeds u * total (asking for mass keeps a zero-mass symbol out whatever the
  rounding of the sums); rounding can push u * total to the total itself: then the last
  symbol with mass -> index_BxR."""
  vocab = probs_BxV.shape[-1]
  above_BxRxV = ((cdf_BxV[:, None, :] > (u_BxR * cdf_BxV[:, -1:])[:, :, None])
                 & (probs_BxV[:, None, :] > 0))
  index_BxR = jnp.min(jnp.where(above_BxRxV, jnp.arange(vocab), vocab), axis=-1)
  last_Bx1 = jnp.max(jnp.where(probs_BxV > 0, jnp.arange(vocab), 0), axis=-1)[:, None]
  return jnp.where(index_BxR < vocab, index_BxR, last_Bx1).astype(jnp.int32)


def _cumsum(x_BxV: jax.Array, block: int = 16) -> jax.Array:
  """Cumulative sum along the last axis as two small matmuls (within and across blocks).

  XLA:CPU runs `jnp.cumsum` as a windowed reduction, 3x slower at 32 x 259 and at
  32 x 2,048; the sums may round differently, which the draw above tolerates.
  """
  batch, vocab = x_BxV.shape
  blocks = -(-vocab // block)
  x_BxNxW = jnp.pad(x_BxV, ((0, 0), (0, blocks * block - vocab))).reshape(batch, blocks, block)
  inner_BxNxW = x_BxNxW @ jnp.triu(jnp.ones((block, block), x_BxV.dtype))
  before_BxN = inner_BxNxW[:, :, -1] @ jnp.triu(jnp.ones((blocks, blocks), x_BxV.dtype), 1)
  return (inner_BxNxW + before_BxN[:, :, None]).reshape(batch, -1)[:, :vocab]


def _first_argmax(logits_BxV: jax.Array) -> jax.Array:
  """`jnp.argmax` (first index of the maximum) as two plain reductions.

  XLA:CPU runs argmax's paired (value, index) reduction ~10x slower than a max.
  """
  vocab = logits_BxV.shape[-1]
  top_Bx1 = jnp.max(logits_BxV, axis=-1, keepdims=True)
  return jnp.min(jnp.where(logits_BxV == top_Bx1, jnp.arange(vocab), vocab), axis=-1
                 ).astype(jnp.int32)


def _order_key(x: jax.Array) -> jax.Array:
  """uint32 keys in the order of the float32 values (-0 as +0), for sort-free thresholds."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32) + 0.0, jnp.uint32)
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _kth_largest_key(key_BxV: jax.Array, k: jax.Array) -> jax.Array:
  """Per row, the key of the k-th largest value (1 <= k <= V), by bisection on the bits.

  Invariant: at least k keys are >= lo, and the answer lies in [lo, hi]. A row is done
  when lo == hi, or as soon as exactly k keys are >= mid: the answer is then the least of
  them. That ends most rows after 8-16 of the 32 halvings; they run in rounds of 8
  unrolled steps (a loop iteration per step costs more than the step).
  """
  lo_B, hi_B = jnp.min(key_BxV, axis=-1), jnp.max(key_BxV, axis=-1)

  def halve(carry):
    lo_B, hi_B, done_B = carry
    for _ in range(8):
      mid_B = lo_B + (hi_B - lo_B + 1) // 2
      count_B = jnp.sum(key_BxV >= mid_B[:, None], axis=-1)
      ok_B = ~done_B & (count_B >= k)
      lo_B = jnp.where(ok_B, mid_B, lo_B)
      hi_B = jnp.where(~done_B & ~ok_B, mid_B - 1, hi_B)
      done_B = done_B | (count_B == k) | (lo_B >= hi_B)
    return lo_B, hi_B, done_B

  lo_B, _, _ = jax.lax.while_loop(lambda c: ~jnp.all(c[2]), halve,
                                  (lo_B, hi_B, lo_B >= hi_B))
  return jnp.min(jnp.where(key_BxV >= lo_B[:, None], key_BxV, jnp.uint32(0xFFFFFFFF)),
                 axis=-1)


def _nucleus_threshold(probs_BxV: jax.Array, bits_BxV: jax.Array,
                       top_p: jax.Array) -> jax.Array:
  """Per row, the bits of the smallest probability kept by top-p.

  `pick` keeps, in descending order, every symbol whose preceding mass is < top_p, ties
  of the last one included: that is every p >= t*, where t* is the smallest value whose
  strictly larger mass is < top_p. Non-negative floats order as their bits, so t* is
  found by bisection; the largest probability always stays.
  """
  lo_B = jnp.zeros(bits_BxV.shape[:1], jnp.uint32)
  hi_B = jnp.max(bits_BxV, axis=-1)
  for _ in range(32):
    mid_B = lo_B + (hi_B - lo_B) // 2
    above_B = jnp.sum(jnp.where(bits_BxV > mid_B[:, None], probs_BxV, 0.0), axis=-1)
    ok_B = above_B < top_p
    lo_B, hi_B = jnp.where(ok_B, lo_B, mid_B + 1), jnp.where(ok_B, mid_B, hi_B)
  return hi_B


def seed_scalar(seed: int) -> np.ndarray:
  """The seed as a fixed-dtype scalar for jit (same keys as the Python int)."""
  if not -2**31 <= seed < 2**32:
    raise ValueError(f"seed must fit in 32 bits, got {seed}")
  return np.uint32(seed) if seed >= 0 else np.int32(seed)


def prompt_keys(seed, index_B: jax.Array) -> jax.Array:
  """Raw key data per row (seed and indices may be traced): the stream of the row holding
  prompt i depends on (seed, i) only, whatever its batch or row."""
  base = jax.random.key(seed)
  return jax.random.key_data(jax.vmap(lambda i: jax.random.fold_in(base, i))(index_B))


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
