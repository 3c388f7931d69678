"""Sampling text from a trained run (HAT, BPE or byte LM), with KV caches.

    python -m hat.generate --workdir runs/demo --prompt "The quick bro" --max-new-bytes 200

HAT generation follows the paper's nested loop: the decoder spells bytes of the current
word until it emits `[W]`, then the word is committed and the next one begins; `[S]` ends
the document. A prompt whose last word is incomplete is continued from inside that word
(its bytes are fed to the decoder as already emitted), so output does not depend on where
the prompt was cut.

Caches (HAT): a word-level KV cache for the backbone (one entry per committed unit,
START included) and a KV cache for the byte decoder that lives for one word (slot 0 is
the predictive embedding p of the previous unit, slots 1.. the word's bytes). The encoder
runs once per finished word, bidirectionally over that word alone. Rows of a batch decode
their words in lockstep: a row that finished its word waits until every row has, then one
backbone step commits all of them (one backbone call per round of words, not per byte).

Every step function is jit-compiled once per batch size: shapes are static (caches hold
`max_units` units / `max_word_bytes + 1` slots / `max_tokens` tokens, masked by per-row
lengths), and sampling options are traced values. A full backbone cache is never silently
wrong: `overflow="error"` raises, `overflow="slide"` (default) re-prefills the row from
START and its most recent words (tokens for token LMs).

The uncached samplers (`ReferenceHATSampler`, `ReferenceTokenSampler`) recompute the full
context through the training layout each step; tests check the cached ones against them.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hat.cli import entry_point
from hat.data import layout
from hat.sampling import (ReferenceHATSampler, ReferenceTokenSampler, SampleOptions,  # noqa: F401
                          _cut_at_stop, _hit_stop, _merge_rows, _row_keys, _split_keys,
                          sample_on_device)
from hat.text.codec import PAD_ID, S_ID, W_ID

OVERFLOW_POLICIES = ("slide", "error")
_DECODING, _WAITING, _DONE = 0, 1, 2


class HATSampler:
  """Cached HAT sampler: word-level backbone cache, per-word decoder cache, batched."""

  def __init__(self, model: nnx.Module, cfg, splitter, *, max_units: int | None = None,
               overflow: str = "slide"):
    if overflow not in OVERFLOW_POLICIES:
      raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
    if _gated(cfg):
      raise ValueError("the cached HAT sampler does not run dynamic gates; use "
                       "ReferenceHATSampler (make_sampler picks it)")
    self.cfg, self.splitter, self.overflow = cfg, splitter, overflow
    self.max_units = max_units or cfg.data.max_units
    self.max_word = cfg.data.max_word_bytes
    self.slots = self.max_word + 1  # [W] b_1 .. b_n: encoder input and decoder cache
    self.model = model
    graphdef, self.params = nnx.split(model)
    self.prefill_fn = jax.jit(functools.partial(self._prefill, graphdef), donate_argnums=1)
    self.byte_fn = jax.jit(functools.partial(self._byte_step, graphdef), donate_argnums=1)
    self.word_fn = jax.jit(functools.partial(self._word_step, graphdef), donate_argnums=1)

  def compile_counts(self) -> dict[str, int]:
    """How many times each step function was compiled (one per batch size)."""
    return {name: getattr(self, f"{name}_fn")._cache_size()
            for name in ("prefill", "byte", "word")}

  def init_state(self, batch: int, seed: int) -> dict:
    """Empty per-row generation state (caches, lengths, p, current word, keys)."""
    model, d_dec = self.model, self.cfg.model.decoder.d_model
    return {"caches": model.init_caches(batch, self.max_units, self.slots),
            "units_B": jnp.zeros(batch, jnp.int32),
            "p_Bxd": jnp.zeros((batch, d_dec), model.compute_dtype),
            "word_BxL": jnp.full((batch, self.slots), PAD_ID, jnp.int32),
            "nbytes_B": jnp.zeros(batch, jnp.int32),
            "keys_BxK": jnp.asarray(_row_keys(seed, batch))}

  # Jitted step functions: pure in (params, state, ...), the model rebuilt from graphdef.

  def _prefill(self, graphdef, params, st, ctx_BxUxL, ctx_nb_BxU, units_B, word_BxL,
               nbytes_B, rows_B):
    """Fresh context for `rows_B`: encoder + backbone over its units, decoder over the partial."""
    model = nnx.merge(graphdef, params)
    batch, units, slots = ctx_BxUxL.shape
    words_BxUxD = model.encode_units(ctx_BxUxL.reshape(batch * units, slots),
                                     ctx_nb_BxU.reshape(-1)).reshape(batch, units, -1)
    pos_BxU = jnp.broadcast_to(jnp.arange(units, dtype=jnp.int32)[None], (batch, units))
    fresh = model.init_caches(batch, self.max_units, self.slots)
    zero_B = jnp.zeros(batch, jnp.int32)
    p_BxUxd, bb_cache = model.backbone_extend(words_BxUxD, pos_BxU, fresh["backbone"], zero_B)
    p_Bxd = jnp.take_along_axis(p_BxUxd, (units_B - 1)[:, None, None], axis=1)[:, 0]
    x_BxLxd = model.decoder_embed(word_BxL)
    x_BxLxd = x_BxLxd.at[:, 0].set(p_Bxd.astype(x_BxLxd.dtype))
    pos_BxL = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32)[None], (batch, slots))
    _, dec_cache = model.decoder_extend(x_BxLxd, pos_BxL, fresh["decoder"], zero_B)
    new = {"caches": {"backbone": bb_cache, "decoder": dec_cache}}
    caches = _merge_rows(rows_B, new["caches"], st["caches"], axis=1)
    flat = _merge_rows(rows_B, {"units_B": units_B, "p_Bxd": p_Bxd, "word_BxL": word_BxL,
                                "nbytes_B": nbytes_B},
                       {k: st[k] for k in ("units_B", "p_Bxd", "word_BxL", "nbytes_B")})
    return {**st, **flat, "caches": caches}

  def _byte_step(self, graphdef, params, st, active_B, temperature, top_k, top_p):
    """One decoder slot for every row -> (state, sampled symbol per row)."""
    model = nnx.merge(graphdef, params)
    n_B, word_BxL = st["nbytes_B"], st["word_BxL"]
    batch = n_B.shape[0]
    # Decoder slot n holds p (n = 0) or byte b_n, which sits at word slot n.
    byte_Bx1 = jnp.take_along_axis(word_BxL, n_B[:, None], axis=1)
    x_Bx1xd = model.decoder_embed(byte_Bx1)
    x_Bx1xd = jnp.where((n_B == 0)[:, None, None], st["p_Bxd"][:, None].astype(x_Bx1xd.dtype),
                        x_Bx1xd)
    logits_Bx1xV, dec_cache = model.decoder_extend(x_Bx1xd, n_B[:, None],
                                                   st["caches"]["decoder"], n_B)
    logits_BxV = logits_Bx1xV[:, 0]
    sym_V = jnp.arange(logits_BxV.shape[-1])[None]
    n_Bx1 = n_B[:, None]
    banned_BxV = ((sym_V == PAD_ID)
                  | ((sym_V == S_ID) & (n_Bx1 > 0))  # [S] only follows a finished word
                  | ((sym_V == W_ID) & (n_Bx1 == 0))  # an empty word would loop forever
                  | ((sym_V < 256) & (n_Bx1 >= self.max_word)))  # words are cut there
    keys_BxK, use_BxK = _split_keys(st["keys_BxK"], active_B)
    sym_B = sample_on_device(jnp.where(banned_BxV, -jnp.inf, logits_BxV), use_BxK,
                             temperature, top_k, top_p)
    is_byte_B = active_B & (sym_B < 256)
    rows_B = jnp.arange(batch)
    old_B = word_BxL[rows_B, jnp.minimum(n_B + 1, self.slots - 1)]
    word_BxL = word_BxL.at[rows_B, n_B + 1].set(jnp.where(is_byte_B, sym_B, old_B),
                                                 mode="drop")
    caches = {**st["caches"], "decoder": dec_cache}
    return {**st, "caches": caches, "word_BxL": word_BxL, "nbytes_B": n_B + is_byte_B,
            "keys_BxK": keys_BxK}, sym_B

  def _word_step(self, graphdef, params, st, commit_B):
    """Encodes the finished words of `commit_B` rows and advances the backbone one unit."""
    model = nnx.merge(graphdef, params)
    units_B = st["units_B"]
    words_BxD = model.encode_units(st["word_BxL"], st["nbytes_B"])
    p_Bx1xd, bb_cache = model.backbone_extend(words_BxD[:, None], units_B[:, None],
                                              st["caches"]["backbone"], units_B)
    fresh_BxL = jnp.full_like(st["word_BxL"], PAD_ID).at[:, 0].set(W_ID)
    return {**st, "caches": {**st["caches"], "backbone": bb_cache},
            "units_B": units_B + commit_B,
            "p_Bxd": jnp.where(commit_B[:, None], p_Bx1xd[:, 0].astype(st["p_Bxd"].dtype),
                               st["p_Bxd"]),
            "word_BxL": jnp.where(commit_B[:, None], fresh_BxL, st["word_BxL"]),
            "nbytes_B": jnp.where(commit_B, 0, st["nbytes_B"])}

  # Host side.

  def _units_array(self, contexts: list[list[bytes]]) -> tuple[np.ndarray, np.ndarray]:
    """START + words per row -> encoder inputs (B, U, L) and byte counts (B, U)."""
    ids = np.full((len(contexts), self.max_units, self.slots), PAD_ID, np.int32)
    nb = np.zeros((len(contexts), self.max_units), np.int32)
    ids[:, :, 0] = W_ID
    ids[:, 0, 0] = S_ID
    for b, words in enumerate(contexts):
      for u, w in enumerate(words, start=1):
        ids[b, u, 1:len(w) + 1] = np.frombuffer(w, np.uint8)
        nb[b, u] = len(w)
    return ids, nb

  def _context(self, words: list[bytes], keep: int) -> list[bytes]:
    """The most recent words that fit the backbone cache (after START), or an error."""
    if len(words) <= self.max_units - 1:
      return words
    if self.overflow == "error":
      raise layout.CapacityError(
          f"context of {len(words)} words + START exceeds the backbone KV cache of "
          f"{self.max_units} units; raise max_units or use overflow='slide'")
    return words[-keep:]

  def _refill(self, st, rows: np.ndarray, contexts: list[list[bytes]], partials: list[bytes]):
    """Prefills the rows in `rows` (bool, B) from their contexts and partial words."""
    ids, nb = self._units_array(contexts)
    word = np.full((len(partials), self.slots), PAD_ID, np.int32)
    word[:, 0] = W_ID
    for b, w in enumerate(partials):
      word[b, 1:len(w) + 1] = np.frombuffer(w, np.uint8)
    units = np.array([len(c) + 1 for c in contexts], np.int32)
    nbytes = np.array([len(w) for w in partials], np.int32)
    return self.prefill_fn(self.params, st, ids, nb, units, word, nbytes, rows), units

  def generate_batch(self, prompts: Sequence[bytes], opts: SampleOptions) -> list[bytes]:
    """Continues every prompt at once; returns only the new bytes of each."""
    batch = len(prompts)
    words = [list(self.splitter.split(p)) for p in prompts]
    partials = [w.pop() if w else b"" for w in words]
    outs = [b""] * batch
    if opts.max_new_bytes <= 0 or batch == 0:
      return outs
    st = self.init_state(batch, opts.seed)
    contexts = [self._context(w, self.max_units - 1) for w in words]
    st, units = self._refill(st, np.ones(batch, bool), contexts, partials)
    status = np.full(batch, _DECODING)
    dev_opts = opts.device_args()
    while True:
      active = status == _DECODING
      if not active.any():
        waiting = status == _WAITING
        if not waiting.any():
          break
        st, units = self._commit(st, waiting, units, words)
        status[waiting] = _DECODING
        continue
      st, sym_B = self.byte_fn(self.params, st, active, *dev_opts)
      sym_B = np.asarray(sym_B)
      for b in np.flatnonzero(active):
        s = int(sym_B[b])
        if s == S_ID:
          status[b] = _DONE
        elif s == W_ID:
          words[b].append(partials[b])
          partials[b] = b""
          status[b] = _WAITING
        else:
          partials[b] += bytes([s])
          outs[b] += bytes([s])
          if len(outs[b]) >= opts.max_new_bytes or _hit_stop(outs[b], 1, opts.stop):
            status[b] = _DONE
    return [_cut_at_stop(o, opts.stop) for o in outs]

  def _commit(self, st, waiting: np.ndarray, units: np.ndarray, words: list[list[bytes]]):
    """Word step for the waiting rows; rows with a full backbone cache are re-prefilled."""
    full = waiting & (units >= self.max_units)
    if full.any():
      if self.overflow == "error":
        raise layout.CapacityError(
            f"generation needs more than the backbone KV cache of {self.max_units} units; "
            "raise max_units or use overflow='slide'")
      # Keep half the cache so the next re-prefill is max_units/2 words away.
      keep = max(1, self.max_units // 2)
      contexts = [w[-keep:] if f else [] for w, f in zip(words, full)]
      st, new_units = self._refill(st, full, contexts, [b""] * len(words))
      units = np.where(full, new_units, units)
    commit = waiting & ~full
    if commit.any():
      st = self.word_fn(self.params, st, commit)
      units = units + commit
    return st, units

  def generate(self, prompt: bytes, opts: SampleOptions) -> bytes:
    """Continues `prompt`; returns only the new bytes."""
    return self.generate_batch([prompt], opts)[0]


# ---------------------------------------------------------------------- token LMs


class TokenSampler:
  """Cached sampler for a BPE or byte-level LM: one KV cache over BOS + tokens, batched."""

  def __init__(self, model: nnx.Module, cfg, tokenizer, *, max_tokens: int | None = None,
               overflow: str = "slide"):
    if overflow not in OVERFLOW_POLICIES:
      raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
    self.model, self.cfg, self.tok, self.overflow = model, cfg, tokenizer, overflow
    self.capacity = max_tokens or cfg.data.max_tokens
    graphdef, self.params = nnx.split(model)
    self.prefill_fn = jax.jit(functools.partial(self._prefill, graphdef), donate_argnums=1)
    self.step_fn = jax.jit(functools.partial(self._step, graphdef), donate_argnums=1)

  def compile_counts(self) -> dict[str, int]:
    """How many times each step function was compiled (one per batch size)."""
    return {"prefill": self.prefill_fn._cache_size(), "step": self.step_fn._cache_size()}

  def _sample(self, logits_BxV, st, active_B, temperature, top_k, top_p):
    sym_V = jnp.arange(logits_BxV.shape[-1])[None]
    banned_1xV = sym_V == self.tok.pad_id
    if self.tok.bos_id != self.tok.eos_id:
      banned_1xV = banned_1xV | (sym_V == self.tok.bos_id)
    keys_BxK, use_BxK = _split_keys(st["keys_BxK"], active_B)
    sym_B = sample_on_device(jnp.where(banned_1xV, -jnp.inf, logits_BxV), use_BxK,
                             temperature, top_k, top_p)
    return sym_B, keys_BxK

  def _prefill(self, graphdef, params, st, tokens_BxT, length_B, rows_B, temperature, top_k,
               top_p):
    """Fresh context for `rows_B` -> (state, next token per row)."""
    model = nnx.merge(graphdef, params)
    batch, length = tokens_BxT.shape
    pos_BxT = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None], (batch, length))
    logits_BxTxV, cache = model.extend(tokens_BxT, pos_BxT, model.init_cache(batch, length),
                                       jnp.zeros(batch, jnp.int32))
    logits_BxV = jnp.take_along_axis(logits_BxTxV, (length_B - 1)[:, None, None], axis=1)[:, 0]
    sym_B, keys_BxK = self._sample(logits_BxV, st, rows_B, temperature, top_k, top_p)
    return {"cache": _merge_rows(rows_B, cache, st["cache"], axis=1),
            "length_B": jnp.where(rows_B, length_B, st["length_B"]),
            "keys_BxK": keys_BxK}, sym_B

  def _step(self, graphdef, params, st, tokens_B, active_B, temperature, top_k, top_p):
    """Feeds one token per row -> (state, next token per row)."""
    model = nnx.merge(graphdef, params)
    length_B = st["length_B"]
    logits_Bx1xV, cache = model.extend(tokens_B[:, None], length_B[:, None], st["cache"],
                                       length_B)
    sym_B, keys_BxK = self._sample(logits_Bx1xV[:, 0], st, active_B, temperature, top_k,
                                   top_p)
    return {"cache": cache, "length_B": length_B + active_B, "keys_BxK": keys_BxK}, sym_B

  def _contexts(self, histories: list[list[int]], rows: np.ndarray, keep: int):
    """BOS + the most recent `keep` tokens of each row in `rows`, padded to capacity."""
    tokens = np.full((len(histories), self.capacity), self.tok.pad_id, np.int32)
    length = np.ones(len(histories), np.int32)
    for b in np.flatnonzero(rows):
      ctx = [self.tok.bos_id] + histories[b][-keep:] if keep else [self.tok.bos_id]
      tokens[b, :len(ctx)] = ctx
      length[b] = len(ctx)
    return tokens, length

  def generate_batch(self, prompts: Sequence[bytes], opts: SampleOptions) -> list[bytes]:
    """Continues every prompt at once; returns only the new bytes of each."""
    batch = len(prompts)
    outs = [b""] * batch
    if opts.max_new_bytes <= 0 or batch == 0:
      return outs
    histories = [list(self.tok.encode(p)) for p in prompts]
    if self.overflow == "error" and max(map(len, histories)) > self.capacity - 1:
      raise layout.CapacityError(f"prompt of {max(map(len, histories))} tokens + BOS exceeds "
                                 f"the KV cache of {self.capacity} positions")
    dev_opts = opts.device_args()
    st = {"cache": self.model.init_cache(batch, self.capacity),
          "length_B": jnp.zeros(batch, jnp.int32),
          "keys_BxK": jnp.asarray(_row_keys(opts.seed, batch))}
    all_rows = np.ones(batch, bool)
    tokens, length = self._contexts(histories, all_rows, self.capacity - 1)
    st, sym_B = self.prefill_fn(self.params, st, tokens, length, all_rows, *dev_opts)
    active = all_rows.copy()
    while True:
      sym_B = np.asarray(sym_B)
      for b in np.flatnonzero(active):
        t = int(sym_B[b])
        if t == self.tok.eos_id:
          active[b] = False
          continue
        piece = self.tok.decode([t])
        histories[b].append(t)
        outs[b] += piece
        if len(outs[b]) >= opts.max_new_bytes or (piece and _hit_stop(outs[b], len(piece),
                                                                       opts.stop)):
          active[b] = False
      if not active.any():
        break
      full = active & (length >= self.capacity)
      step_rows = active & ~full
      nxt = np.zeros(batch, np.int32)
      if full.any():
        if self.overflow == "error":
          raise layout.CapacityError(f"generation needs more than the KV cache of "
                                     f"{self.capacity} positions; use overflow='slide'")
        # Keep half the cache so the next re-prefill is capacity/2 tokens away.
        tokens, new_len = self._contexts(histories, full, self.capacity // 2)
        st, sym_B = self.prefill_fn(self.params, st, tokens, new_len, full, *dev_opts)
        nxt = np.where(full, np.asarray(sym_B), nxt)
        length = np.where(full, new_len, length)
      if step_rows.any():
        feed = np.array([h[-1] for h in histories], np.int32)
        st, sym_B = self.step_fn(self.params, st, feed, step_rows, *dev_opts)
        nxt = np.where(step_rows, np.asarray(sym_B), nxt)
        length = length + step_rows
      sym_B = nxt
    return [_cut_at_stop(o[:opts.max_new_bytes], opts.stop) for o in outs]

  def generate(self, prompt: bytes, opts: SampleOptions) -> bytes:
    """Continues `prompt`; returns only the new bytes."""
    return self.generate_batch([prompt], opts)[0]


def _gated(cfg) -> bool:
  gate = getattr(cfg.model, "gate", None)
  return getattr(gate, "kind", "none") != "none"


def make_sampler(model, cfg, tokenizer=None, *, cached: bool = True):
  """The sampler for `cfg.model.kind`: cached by default, uncached for reference or gates."""
  if cfg.model.kind == "hat":
    from hat.text.splitter import Splitter
    splitter = Splitter(cfg.data.splitter, cfg.data.max_word_bytes)
    cached = cached and not _gated(cfg)  # gated models keep their own forward pass
    return (HATSampler if cached else ReferenceHATSampler)(model, cfg, splitter)
  return (TokenSampler if cached else ReferenceTokenSampler)(model, cfg, tokenizer)


@entry_point
def main(argv: list[str]) -> int:
  """CLI: load the latest checkpoint of a run and print continuations of the prompts."""
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="run directory written by hat.train")
  parser.add_argument("--prompt", action="append", default=None,
                      help="prompt text; repeat for several, sampled as one batch "
                      "(default: the config's)")
  parser.add_argument("--max-new-bytes", type=int, default=200)
  parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
  parser.add_argument("--top-k", type=int, default=0)
  parser.add_argument("--top-p", type=float, default=1.0)
  parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no-cache", action="store_true",
                      help="uncached reference sampler (full recompute per symbol)")
  args = parser.parse_args(argv)

  from hat.rundir import load_for_inference
  model, cfg, tokenizer = load_for_inference(args.workdir)
  sampler = make_sampler(model, cfg, tokenizer, cached=not args.no_cache)
  opts = SampleOptions(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       max_new_bytes=args.max_new_bytes, stop=tuple(args.stop),
                       seed=args.seed)
  prompts = args.prompt or [cfg.sample_prompt]
  if hasattr(sampler, "generate_batch"):
    news = sampler.generate_batch([p.encode() for p in prompts], opts)
  else:
    news = [sampler.generate(p.encode(), opts) for p in prompts]
  for prompt, new in zip(prompts, news):
    sys.stdout.write(f"--- prompt: {prompt!r}\n{prompt}{new.decode('utf-8', 'replace')}\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
