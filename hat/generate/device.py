"""The device-resident decoding loop every cached sampler shares, and its host driver.

A sampler is a state dict of device arrays (KV caches, per-row positions, status, keys)
and a `tick`: one decoding step of every row. `chunk` runs up to `chunk_steps` ticks
(`stop_steps` when stop strings are given) in a `lax.while_loop` on the device and returns
the symbols emitted per row and tick: one host transfer per chunk, not per byte. Rows
advance independently; a row that is done, or whose cache is full, idles until the host
refills it. The state is donated to every call, so caches are updated in place. A sampler
runs `decoding_copy(model)`, whose layer stacks are lists of blocks, and prefills in
blocks up to the longest prompt (`prefill_blocks`).

The host driver (`generate_batch`; `generate_many` runs any number of prompts through it
in batches of similar length) prefills the rows from their prompts, runs chunks until
every row is done, turns emitted symbols into bytes, applies stop strings (a row that
produced one is stopped before the next chunk; output is cut at the stop) and, when a
row's cache is full, re-prefills it from the most recent half-cache of its context
(`overflow="slide"`, `kept_context`) or raises (`overflow="error"`).
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from hat.data import layout
from hat.generate.sampling import (SampleOptions, cut_at_stop, prompt_keys, seed_scalar,
                                   stop_strings)
from hat.models.layers import TransformerStack

OVERFLOW_POLICIES = ("slide", "error")
# Ticks per device call: without stop strings a call runs until its rows are done (up to
# CHUNK_STEPS; a call costs ~0.2-0.3 ms on CPU besides its ticks); with stop strings the
# host checks them every STOP_STEPS ticks, so a row that produced one stops soon after.
CHUNK_STEPS, STOP_STEPS = 256, 64
# A call also ends once this fraction of its rows wait for a refill (a full cache).
FULL_FRACTION = 1 / 8
DECODING, WAITING, FULL, DONE = 0, 1, 2, 3  # row status
NO_SYMBOL = -1


class DeviceSampler:
  """Base of the cached samplers: `_init_state`, `_refill`, `_tick` and `_emit` per family."""

  def __init__(self, model: nnx.Module, cfg, *, chunk_steps: int = CHUNK_STEPS,
               overflow: str = "slide"):
    if overflow not in OVERFLOW_POLICIES:
      raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
    if chunk_steps < 1:
      raise ValueError(f"chunk_steps must be >= 1, got {chunk_steps}")
    model = decoding_copy(model)
    self.model, self.cfg = model, cfg
    self.chunk_steps, self.overflow = chunk_steps, overflow
    self.stop_steps = min(STOP_STEPS, chunk_steps)
    graphdef, self.params = nnx.split(model)
    self.prefill_fn = jax.jit(functools.partial(self._prefill_merged, graphdef),
                              donate_argnums=1)
    self.chunk_fn = jax.jit(functools.partial(self._chunk, graphdef), donate_argnums=1)
    # One compiled call builds a batch's empty state (dozens of eager ops cost ~3 ms).
    self.init_fn = jax.jit(self._fresh_state)

  def compile_counts(self) -> dict[str, int]:
    """How many times each step function was compiled (one per batch size)."""
    return {"init": self.init_fn._cache_size(), "prefill": self.prefill_fn._cache_size(),
            "chunk": self.chunk_fn._cache_size()}

  # Per family (device side).

  def _init_state(self, batch: int) -> dict:
    raise NotImplementedError

  def _prefill(self, model, st: dict, rows_B, *arrays) -> dict:
    raise NotImplementedError

  def _tick(self, model, st: dict, temperature, top_k, top_p, max_new):
    """One step of every row -> (state, symbol_B, emitted_B)."""
    raise NotImplementedError

  # Per family (host side).

  def _new_row(self, prompt: bytes) -> Any:
    raise NotImplementedError

  def _refill_arrays(self, rows: list, which: np.ndarray, slide: bool) -> tuple:
    """Host arrays for `_prefill` of the rows in `which` (from the prompt, or sliding)."""
    raise NotImplementedError

  def _emit(self, row: Any, sym: int) -> bytes:
    """Records an emitted symbol in the row's history; returns its bytes."""
    raise NotImplementedError

  # Shared.

  def _fresh_state(self, seed, index_B) -> dict:
    """Empty caches, per-row keys of (`seed`, the row's prompt index), every row DONE
    until its prefill."""
    batch = index_B.shape[0]
    return dict(self._init_state(batch), keys_BxK=prompt_keys(seed, index_B),
                status_B=jnp.full((batch,), DONE, jnp.int32),
                nout_B=jnp.zeros((batch,), jnp.int32))

  def _prefill_merged(self, graphdef, params, st, rows_B, *arrays):
    model = nnx.merge(graphdef, params)
    st = self._prefill(model, st, rows_B, *arrays)
    return dict(st, status_B=jnp.where(rows_B, DECODING, st["status_B"]))

  def _chunk(self, graphdef, params, st, stop_B, steps, temperature, top_k, top_p,
             max_new):
    """Up to `steps` (<= `chunk_steps`) ticks on the device -> (state, (symbols_BxC,
    status_B)); it ends early once no row is decoding, or `FULL_FRACTION` of the rows
    wait for a refill."""
    model = nnx.merge(graphdef, params)
    st = dict(st, status_B=jnp.where(stop_B, DONE, st["status_B"]))
    batch = stop_B.shape[0]
    buf_BxC = jnp.full((batch, self.chunk_steps), NO_SYMBOL, jnp.int32)
    max_full = max(1, math.ceil(FULL_FRACTION * batch))

    def live(st):
      status_B = st["status_B"]
      return (jnp.any((status_B == DECODING) | (status_B == WAITING))
              & (jnp.sum(status_B == FULL) < max_full))

    def cond(carry):
      step, st, _ = carry
      return (step < steps) & live(st)

    def body(carry):
      step, st, buf_BxC = carry
      st, sym_B, emit_B = self._tick(model, st, temperature, top_k, top_p, max_new)
      buf_BxC = jax.lax.dynamic_update_slice_in_dim(
          buf_BxC, jnp.where(emit_B, sym_B, NO_SYMBOL)[:, None], step, axis=1)
      return step + 1, st, buf_BxC

    _, st, buf_BxC = jax.lax.while_loop(cond, body, (jnp.int32(0), st, buf_BxC))
    return st, (buf_BxC, st["status_B"])

  def _refill(self, st, rows: list, which: np.ndarray, slide: bool):
    if slide and self.overflow == "error":
      raise layout.CapacityError(self._full_message())
    arrays = self._refill_arrays(rows, which, slide)
    return self.prefill_fn(self.params, st, which, *arrays)

  def _full_message(self) -> str:
    return "generation needs more than the KV cache holds; use overflow='slide'"

  def generate_batch(self, prompts: Sequence[bytes], opts: SampleOptions) -> list[bytes]:
    """Continues every prompt at once; returns only the new bytes of each."""
    return self._run_batch(list(prompts), opts, len(prompts), np.arange(len(prompts)))

  def generate_many(self, prompts: Sequence[bytes], opts: SampleOptions, batch_size: int,
                    progress: bool = False) -> list[bytes]:
    """Continues every prompt, `batch_size` rows at a time; returns only the new bytes of
    each, in order.

    Batches hold prompts of similar length (longest first): a batch prefills as far as
    its longest prompt. Prompt i samples with the stream of (seed, i) whatever its batch,
    so the output equals `generate_batch(prompts, opts)` (one batch of all). A short last
    batch runs with idle rows, so one compiled step serves every batch. `progress`: a bar
    over the prompts on stderr.
    """
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = list(prompts)
    batch = min(batch_size, max(len(prompts), 1))
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outs = [b""] * len(prompts)
    bar = _progress(len(prompts), progress)
    for start in range(0, len(prompts), batch):
      index = order[start:start + batch]
      news = self._run_batch([prompts[i] for i in index], opts, batch, np.array(index))
      for i, new in zip(index, news):
        outs[i] = new
      bar.update(len(index))
    bar.close()
    return outs

  def _run_batch(self, prompts: list, opts: SampleOptions, batch: int, index: np.ndarray
                 ) -> list[bytes]:
    """Continues `prompts` (at most `batch`; further rows idle) with the streams of
    prompts `index`."""
    num = len(prompts)
    outs = [b""] * num
    if opts.max_new_bytes <= 0 or num == 0:
      return outs
    # Idle rows are never prefilled: they stay DONE and emit nothing.
    rows = [self._new_row(bytes(p)) for p in prompts] + [self._new_row(b"")] * (batch - num)
    index_B = np.zeros(batch, np.int32)
    index_B[:num] = index
    st = self.init_fn(seed_scalar(opts.seed), index_B)
    st = self._refill(st, rows, np.arange(batch) < num, slide=False)
    stops = stop_strings(opts.stop)
    stopped = np.zeros(batch, bool)
    dev_opts = opts.device_args()
    steps = np.int32(self.stop_steps if stops else self.chunk_steps)
    while True:
      st, out = self.chunk_fn(self.params, st, stopped, steps, *dev_opts)
      buf_BxC, status_B = jax.device_get(out)
      for b in range(num):
        syms = buf_BxC[b][buf_BxC[b] != NO_SYMBOL]
        if not len(syms) or stopped[b]:
          continue
        outs[b] += b"".join(self._emit(rows[b], int(s)) for s in syms)
        if stops and any(s in outs[b] for s in stops):
          stopped[b] = True
      full = (status_B == FULL) & ~stopped
      if full.any():
        st = self._refill(st, rows, full, slide=True)
      if not (((status_B == DECODING) | (status_B == WAITING) | full) & ~stopped).any():
        break
    self.last_state = st  # caches and counters of the last call, for inspection
    return [cut_at_stop(o[:opts.max_new_bytes], opts.stop) for o in outs]

  def generate(self, prompt: bytes, opts: SampleOptions) -> bytes:
    """Continues `prompt`; returns only the new bytes."""
    return self.generate_batch([prompt], opts)[0]


def _progress(total: int, show: bool):
  """A tqdm bar over `total` prompts on stderr (a no-op bar when not shown)."""
  return tqdm(total=total, unit="prompt", disable=not show, file=sys.stderr,
              desc="generate")


def prefill_blocks(step, carry, length_B: jax.Array, block: int, *arrays_BxP: jax.Array):
  """`carry = step(pos_BxT, carry, *arrays_BxT)` over blocks of `block` positions, up to
  max(length_B); arrays_BxT are the block's columns of each arrays_BxP.

  A prompt costs blocks of its own length, not the cache capacity: the trip count is a
  traced value, so one compiled loop serves every prompt length.
  """
  batch = length_B.shape[0]

  def one(i, carry):
    start = i * block
    pos_BxT = start + jnp.broadcast_to(jnp.arange(block, dtype=jnp.int32)[None],
                                       (batch, block))
    return step(pos_BxT, carry, *(jax.lax.dynamic_slice_in_dim(a, start, block, axis=1)
                                  for a in arrays_BxP))

  return jax.lax.fori_loop(0, (jnp.max(length_B) + block - 1) // block, one, carry)


def kept_context(length: int, capacity: int, slide: bool) -> int:
  """How many of a row's `length` most recent context units (words, tokens, bytes) a
  prefill keeps, one of the `capacity` positions being START/BOS.

  All of them when they fit. Otherwise (a prompt longer than the cache, or a full cache
  that slides) the most recent half of the cache, so the next refill is half a cache
  away: keeping all that fit would fill the cache at the first new unit and prefill
  every long prompt twice.
  """
  if not slide and length < capacity:
    return length
  return min(length, capacity // 2)


def padded(capacity: int, block: int) -> int:
  """`capacity` rounded up to whole prefill blocks (host arrays are this long)."""
  return math.ceil(capacity / block) * block


def decoding_copy(model: nnx.Module) -> nnx.Module:
  """A copy of the model whose scanned layer stacks are lists of blocks (same weights).

  A step of a scanned stack slices each layer's weights out of the stacked arrays, a copy
  per layer and step; the copy's blocks hold their own slices once (the stacked layers'
  weights are held twice while the caller keeps the original).
  """
  model = nnx.clone(model)
  for _, node in nnx.iter_graph(model):
    if isinstance(node, TransformerStack):
      node.unstack()
  return model


def cond_entries(run: jax.Array, step, unchanged, operand):
  """`lax.cond(run, step, ...)` for a step that returns (values, new cache entries): when
  `run` is false, (`unchanged(operand)`, zero entries, which `write_kv(..., run)` leaves
  unwritten). The caller writes the entries after the cond: a branch that returned the
  caches made XLA copy them at every call."""
  _, shapes = jax.eval_shape(step, operand)
  zeros = lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
  return jax.lax.cond(run, step, lambda o: (unchanged(o), zeros()), operand)


def where_rows(rows_B: jax.Array, new: Any, old: Any) -> Any:
  """Per-row select along the leading (batch) axis of every leaf."""
  return jax.tree.map(
      lambda n, o: jnp.where(rows_B.reshape((-1,) + (1,) * (o.ndim - 1)), n, o), new, old)


def reset_length(cache: dict, rows_B: jax.Array) -> dict:
  """The cache with the lengths of `rows_B` set to 0 (their entries become stale)."""
  return dict(cache, length_B=jnp.where(rows_B, 0, cache["length_B"]))


def embed(table_VxD: jax.Array, ids: jax.Array, dtype: Any) -> jax.Array:
  """Rows of an embedding table in the compute dtype."""
  return jnp.take(table_VxD, ids, axis=0).astype(dtype)


def project(x_NxTxA: jax.Array, w_AxC: jax.Array, dtype: Any, **kwargs) -> jax.Array:
  """x @ w in the compute dtype (as the models' projections)."""
  return jnp.einsum("nta,ac->ntc", x_NxTxA.astype(dtype), w_AxC.astype(dtype), **kwargs)
