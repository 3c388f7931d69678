"""Cached, device-resident sampler of the word-level HATs (plain and delete-gated).

The paper's nested loop, per row and on the device: the byte decoder spells the current
word (its KV cache lives for one word; slot 0 is the predictive embedding p of the
previous unit, slots 1.. the word's bytes) until it emits `[W]`; the finished word is
encoded (bidirectionally, over that word alone), the backbone advances one unit for that
row (word-level KV cache) and the row starts its next word; `[S]` ends the row.

Rows advance independently. Each tick runs one decoder step for every decoding row.
Rows that finished a word wait until a full sub-batch of them (`word_rows` of the batch;
one row at batch 1) or no decoding row is left; then waiting rows, taken round robin, are
encoded and stepped through the backbone together, reading their caches and writing one
new entry per layer in place. A word step's fixed cost is so shared by its rows, and no
row waits for the longest word of the batch.

The backbone behind the loop comes from the family: a plain causal stack, or the delete
gate's lower stack + gate + upper stack, whose upper cache holds only the kept words
(keep mask of `TransformerStack.extend`; the capacity of the batched hard pass), which is
what `model(batch, hard=True)` attends to.

A prompt is split into words; all but the last are prefilled through the encoder and
backbone (blocks of `prefill_block` units, as far as the longest prompt of the batch
reaches), the last (possibly incomplete) word through the decoder, which then
continues inside it ("the quick bro" -> "wn "), so output does not depend on where the
prompt was cut.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from hat.config import delete_capacity
from hat.data import layout
from hat.family import family_of
from hat.generate import rules
from hat.generate.device import (CHUNK_STEPS, DECODING, DONE, FULL, WAITING, DeviceSampler,
                                 cond_entries, embed, kept_context, padded, prefill_blocks,
                                 project, reset_length, where_rows)
from hat.generate.sampling import sample_on_device, split_keys
from hat.generate.word_encoder import encode_bucketed
from hat.models import gates
from hat.models.layers import write_kv
from hat.text.codec import PAD_ID, S_ID, W_ID
from hat.text.splitter import Splitter


# The per-row fields a word step changes (besides the backbone and decoder caches).
WORD_STEP_FIELDS = ("next_row", "p_Bxd", "units_B", "word_BxL", "nbytes_B", "status_B")


def dec_table(model) -> jax.Array:
  """The decoder's byte embedding table (the encoder's when tied)."""
  return (model.enc_embed if model.cfg.tie_byte_embeddings else model.dec_embed)[...]


@dataclasses.dataclass(frozen=True)
class PlainBackbone:
  """One causal stack over words, every word cached."""

  capacity: int

  def init(self, model, batch: int) -> dict:
    return {"bb": model.backbone.init_cache(batch, self.capacity, model.compute_dtype)}

  def reset(self, caches: dict, rows_B) -> dict:
    return {k: reset_length(c, rows_B) for k, c in caches.items()}

  def run(self, model, words_NxTxD, pos_NxT, caches, keep_NxT, rows_N):
    """New units through the cached backbone -> (p_NxTxd, caches); rows_N None: all rows."""
    h, bb = model.backbone.extend(words_NxTxD, pos_NxT=pos_NxT, cache=caches["bb"],
                                  keep_NxT=keep_NxT, rows_N=rows_N)
    return project(h, model.w_dec[...], model.compute_dtype), {"bb": bb}

  def step(self, model, words_Nx1xD, pos_Nx1, caches, keep_Nx1, rows_N):
    """One unit per row, reading the caches only -> (p_Nx1xd, new entries for `write`)."""
    h, new = model.backbone.step(words_Nx1xD, pos_NxT=pos_Nx1, cache=caches["bb"],
                                 keep_NxT=keep_Nx1, rows_N=rows_N)
    return project(h, model.w_dec[...], model.compute_dtype), {"bb": new}

  def write(self, caches: dict, new: dict, enabled) -> dict:
    return {"bb": write_kv(caches["bb"], new["bb"], enabled)}


@dataclasses.dataclass(frozen=True)
class DeleteGatedBackbone:
  """Lower stack (every word cached), delete gate, upper stack (kept words only)."""

  capacity: int
  kept_capacity: int

  def init(self, model, batch: int) -> dict:
    cd = model.compute_dtype
    # A gate on the word inputs (gate.delete.layer=0) has no lower stack to cache.
    lower = (model.backbone_lower.init_cache(batch, self.capacity, cd)
             if model.backbone_lower is not None else {})
    return {"lower": lower,
            "upper": model.backbone_upper.init_cache(batch, self.kept_capacity, cd),
            "deleted_B": jnp.zeros((batch,), jnp.int32)}

  def reset(self, caches: dict, rows_B) -> dict:
    return {"lower": reset_length(caches["lower"], rows_B) if caches["lower"] else {},
            "upper": reset_length(caches["upper"], rows_B),
            "deleted_B": jnp.where(rows_B, 0, caches["deleted_B"])}

  def run(self, model, words_NxTxD, pos_NxT, caches, keep_NxT, rows_N):
    """New units through lower stack, gate and upper stack -> (p_NxTxd, caches).

    rows_N: the cache rows of the N inputs; None for every row in order.
    """
    p, lower, upper, gone_N = self._through(model, "extend", words_NxTxD, pos_NxT, caches,
                                            keep_NxT, rows_N)
    deleted_B = caches["deleted_B"] + gone_N if rows_N is None else \
        caches["deleted_B"].at[rows_N].add(gone_N)
    return p, {"lower": lower if lower is not None else caches["lower"], "upper": upper,
               "deleted_B": deleted_B}

  def step(self, model, words_Nx1xD, pos_Nx1, caches, keep_Nx1, rows_N):
    """One unit per row, reading the caches only -> (p_Nx1xd, new entries for `write`)."""
    p, lower, upper, gone_N = self._through(model, "step", words_Nx1xD, pos_Nx1, caches,
                                            keep_Nx1, rows_N)
    return p, {"lower": lower, "upper": upper, "gone_N": gone_N}

  def _through(self, model, op: str, words_NxTxD, pos_NxT, caches, keep_NxT, rows_N):
    """Lower stack, gate, upper stack by `op` of `TransformerStack` ("extend": updated
    caches, "step": new entries) -> (p_NxTxd, lower, upper, deleted words per row)."""
    h, lower = words_NxTxD, None
    if model.backbone_lower is not None:
      h, lower = getattr(model.backbone_lower, op)(words_NxTxD, pos_NxT=pos_NxT,
                                                   cache=caches["lower"], keep_NxT=keep_NxT,
                                                   rows_N=rows_N)
    gone_NxT = gates.deleted(model.gate(h), model.gate.k) & keep_NxT
    # A deleted word still runs the upper layers (its own query predicts the next word),
    # but leaves no K/V entry there.
    h, upper = getattr(model.backbone_upper, op)(h, pos_NxT=pos_NxT, cache=caches["upper"],
                                                 keep_NxT=keep_NxT & ~gone_NxT, rows_N=rows_N)
    p = project(h, model.w_dec[...], model.compute_dtype)
    return p, lower, upper, jnp.sum(gone_NxT, 1, dtype=jnp.int32)

  def write(self, caches: dict, new: dict, enabled) -> dict:
    lower = (write_kv(caches["lower"], new["lower"], enabled)
             if new["lower"] is not None else caches["lower"])
    rows_N = new["upper"].rows_N
    return {"lower": lower, "upper": write_kv(caches["upper"], new["upper"], enabled),
            "deleted_B": caches["deleted_B"].at[rows_N].add(
                jnp.where(enabled, new["gone_N"], 0))}


def first_rows(select_B: jax.Array, num: int, start: jax.Array | int = 0
               ) -> tuple[jax.Array, jax.Array]:
  """The first `num` selected rows in cyclic order from `start` -> (rows_K, valid_K);
  padding points at 0.

  Row j is the number of rows whose running count of selected rows is <= j: a compare
  and a sum, where an argsort (`gates.compact_indices`) costs more than the step.
  """
  batch = select_B.shape[0]
  count_B = jnp.cumsum(jnp.roll(select_B, -start).astype(jnp.int32))
  rows_K = jnp.sum(count_B[None, :] <= jnp.arange(num)[:, None], axis=1, dtype=jnp.int32)
  valid_K = jnp.arange(num) < count_B[-1]
  return jnp.where(valid_K, (rows_K + start) % batch, 0), valid_K


def backbone_for(model, cfg, capacity: int):
  """The backbone runner of this family (plain or delete-gated)."""
  if family_of(cfg).gate == "delete":
    return DeleteGatedBackbone(capacity, delete_capacity(cfg.model.gate.delete, capacity))
  return PlainBackbone(capacity)


class HATSampler(DeviceSampler):
  """Cached HAT sampler (plain or delete-gated), batched, decoding on the device."""

  def __init__(self, model, cfg, tokenizer=None, *, max_units: int | None = None,
               overflow: str = "slide", word_rows: float = 0.25, chunk_steps: int = CHUNK_STEPS,
               prefill_block: int = 16):
    del tokenizer  # words come from the splitter
    self.splitter = Splitter(cfg.data.splitter, cfg.data.max_word_bytes)
    self.max_units = max_units or cfg.data.max_units
    self.max_word = cfg.data.max_word_bytes
    self.slots = self.max_word + 1  # [W] b_1 .. b_n: encoder input and decoder cache
    self.word_rows = word_rows
    self.prefill_block = min(prefill_block, self.max_units)
    self.backbone = backbone_for(model, cfg, self.max_units)
    super().__init__(model, cfg, chunk_steps=chunk_steps, overflow=overflow)

  def _full_message(self) -> str:
    return (f"generation needs more than the backbone KV cache of {self.max_units} units; "
            "raise max_units or use overflow='slide'")

  # Device side.

  def _init_state(self, batch: int) -> dict:
    model = self.model
    d_dec = model.cfg.decoder.d_model
    return {"bb": self.backbone.init(model, batch),
            "dec": model.decoder.init_cache(batch, self.slots, model.compute_dtype),
            "p_Bxd": jnp.zeros((batch, d_dec), model.compute_dtype),
            "word_BxL": jnp.full((batch, self.slots), PAD_ID, jnp.int32),
            "nbytes_B": jnp.zeros((batch,), jnp.int32),
            "units_B": jnp.zeros((batch,), jnp.int32),
            "next_row": jnp.zeros((), jnp.int32)}

  def _prefill(self, model, st, rows_B, ids_BxUxL, nb_BxU, units_B, word_BxL, nbytes_B):
    """Encoder + backbone over each refilled row's units, decoder over its partial word.

    Units go through in blocks of `prefill_block` up to the longest refilled context
    (`prefill_blocks`), each block's words encoded over the fewest slots that hold its
    longest word; p is read at each row's last unit.
    """
    batch, _, slots = ids_BxUxL.shape
    cd = model.compute_dtype
    block = self.prefill_block

    def step(pos_BxT, carry, ids_BxTxL, nb_BxT):
      bb, p_Bxd = carry
      words_BxTxD = encode_bucketed(model, ids_BxTxL.reshape(batch * block, slots),
                                     nb_BxT.reshape(-1)).reshape(batch, block, -1)
      keep_BxT = rows_B[:, None] & (pos_BxT < units_B[:, None])
      p_BxTxd, bb = self.backbone.run(model, words_BxTxD, pos_BxT, bb, keep_BxT, None)
      last_B = units_B - 1 - pos_BxT[:, 0]
      here_B = rows_B & (last_B >= 0) & (last_B < block)
      p_last_Bxd = jnp.take_along_axis(p_BxTxd, jnp.clip(last_B, 0, block - 1)[:, None, None],
                                       axis=1)[:, 0].astype(p_Bxd.dtype)
      return bb, jnp.where(here_B[:, None], p_last_Bxd, p_Bxd)

    bb, p_Bxd = prefill_blocks(step, (self.backbone.reset(st["bb"], rows_B), st["p_Bxd"]),
                               jnp.where(rows_B, units_B, 0), block, ids_BxUxL, nb_BxU)
    x_BxLxd = embed(dec_table(model), word_BxL, cd).at[:, 0].set(p_Bxd.astype(cd))
    pos_BxL = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32)[None], (batch, slots))
    # The decoder holds slots 0..n-1; the first tick feeds slot n (b_n, or p when n = 0).
    _, dec = model.decoder.extend(x_BxLxd, pos_NxT=pos_BxL,
                                  cache=reset_length(st["dec"], rows_B),
                                  keep_NxT=rows_B[:, None] & (pos_BxL < nbytes_B[:, None]))
    flat = where_rows(rows_B, {"word_BxL": word_BxL, "nbytes_B": nbytes_B,
                               "units_B": units_B},
                      {k: st[k] for k in ("word_BxL", "nbytes_B", "units_B")})
    return {**st, **flat, "p_Bxd": p_Bxd, "bb": bb, "dec": dec}

  def _tick(self, model, st, temperature, top_k, top_p, max_new):
    """One decoder step for every decoding row; then the word step for finished words."""
    cd = model.compute_dtype
    status_B, n_B, word_BxL = st["status_B"], st["nbytes_B"], st["word_BxL"]
    batch = n_B.shape[0]
    decoding_B = status_B == DECODING
    byte_B = jnp.take_along_axis(word_BxL, n_B[:, None], axis=1)
    x_Bx1xd = embed(dec_table(model), byte_B, cd)
    x_Bx1xd = jnp.where((n_B == 0)[:, None, None], st["p_Bxd"][:, None].astype(cd), x_Bx1xd)
    h_Bx1xd, dec = model.decoder.extend(x_Bx1xd, pos_NxT=n_B[:, None], cache=st["dec"],
                                        keep_NxT=decoding_B[:, None])
    logits_BxV = project(h_Bx1xd, model.head[...], cd,
                         preferred_element_type=jnp.float32)[:, 0]
    banned_BxV = rules.word_banned(n_B, self.max_word, jnp, logits_BxV.shape[-1])
    keys_BxK, use_BxK = split_keys(st["keys_BxK"], decoding_B)
    sym_B = sample_on_device(jnp.where(banned_BxV, -jnp.inf, logits_BxV), use_BxK,
                             temperature, top_k, top_p)
    is_byte_B = decoding_B & (sym_B < 256)
    rows_B = jnp.arange(batch)
    at_B = jnp.where(is_byte_B, n_B + 1, self.slots)  # out of range: no write
    word_BxL = word_BxL.at[rows_B, at_B].set(sym_B, mode="drop")
    nout_B = st["nout_B"] + is_byte_B
    status_B = jnp.where(decoding_B & (sym_B == W_ID), WAITING, status_B)
    status_B = jnp.where((decoding_B & (sym_B == S_ID)) | (is_byte_B & (nout_B >= max_new)),
                         DONE, status_B)
    st = {**st, "dec": dec, "word_BxL": word_BxL, "nbytes_B": n_B + is_byte_B,
          "nout_B": nout_B, "status_B": status_B, "keys_BxK": keys_BxK}
    waiting = jnp.sum(status_B == WAITING)
    # A word step has a fixed cost (weights, launches) that its rows share: wait until a
    # full sub-batch of finished words, or until no row is left decoding.
    run = (waiting >= self._word_batch(batch)) | ((waiting > 0) & ~jnp.any(status_B == DECODING))
    # The word step returns the small per-row fields and the backbone's new entries.
    updates, new = cond_entries(
        run, functools.partial(self._word_step, model),
        lambda st: {k: st[k] for k in WORD_STEP_FIELDS} | {"dec_length_B": st["dec"]["length_B"]},
        st)
    dec = dict(st["dec"], length_B=updates.pop("dec_length_B"))
    st = {**st, **updates, "dec": dec, "bb": self.backbone.write(st["bb"], new, run)}
    return st, sym_B, decoding_B

  def _word_batch(self, batch: int) -> int:
    """Rows per word step: `word_rows` of the batch, at least 1."""
    return min(batch, max(1, math.ceil(self.word_rows * batch)))

  def _word_step(self, model, st) -> tuple[dict, dict]:
    """Encodes up to `word_rows` finished words and advances their rows' backbone ->
    (new values of `WORD_STEP_FIELDS` and the decoder's lengths, the backbone's new
    entries)."""
    status_B, units_B = st["status_B"], st["units_B"]
    batch = status_B.shape[0]
    waiting_B = status_B == WAITING
    full_B = waiting_B & (units_B >= self.max_units)
    num = self._word_batch(batch)
    if num == batch:
      # Every waiting row fits: serve them in place (no gather of the rows' caches).
      rows_K, valid_K, next_row, cache_rows = (jnp.arange(batch), waiting_B & ~full_B,
                                               st["next_row"], None)
    else:
      # Round robin from the row after the last one served: the first rows in index
      # order would starve the last rows of a busy batch (one ran 130 ticks after the rest).
      rows_K, valid_K = first_rows(waiting_B & ~full_B, num, st["next_row"])
      served = jnp.sum(valid_K)
      next_row = jnp.where(served > 0, (rows_K[jnp.maximum(served - 1, 0)] + 1) % batch,
                           st["next_row"])
      cache_rows = rows_K
    words_KxD = encode_bucketed(model, st["word_BxL"][rows_K],
                                jnp.where(valid_K, st["nbytes_B"][rows_K], 0))
    p_Kx1xd, new = self.backbone.step(model, words_KxD[:, None], units_B[rows_K][:, None],
                                      st["bb"], valid_K[:, None], cache_rows)
    dst_K = jnp.where(valid_K, rows_K, batch)  # out of range: no write
    fresh_L = jnp.full((self.slots,), PAD_ID, jnp.int32).at[0].set(W_ID)
    updates = {
        "next_row": next_row,
        "p_Bxd": st["p_Bxd"].at[dst_K].set(p_Kx1xd[:, 0].astype(st["p_Bxd"].dtype),
                                           mode="drop"),
        "units_B": units_B.at[dst_K].add(1, mode="drop"),
        "word_BxL": st["word_BxL"].at[dst_K].set(
            jnp.broadcast_to(fresh_L, (num, self.slots)), mode="drop"),
        "nbytes_B": st["nbytes_B"].at[dst_K].set(0, mode="drop"),
        "status_B": jnp.where(full_B, FULL, status_B.at[dst_K].set(DECODING, mode="drop")),
        "dec_length_B": st["dec"]["length_B"].at[dst_K].set(0, mode="drop")}
    return updates, new

  # Host side.

  def _new_row(self, prompt: bytes) -> dict:
    words = list(self.splitter.split(prompt))
    partial = words.pop() if words else b""
    return {"words": words, "partial": partial}

  def _emit(self, row: dict, sym: int) -> bytes:
    if sym == W_ID:
      row["words"].append(row["partial"])
      row["partial"] = b""
    elif sym < 256:
      row["partial"] += bytes([sym])
      return bytes([sym])
    return b""

  def _refill_arrays(self, rows: list, which: np.ndarray, slide: bool) -> tuple:
    batch = len(rows)
    units_padded = padded(self.max_units, self.prefill_block)
    ids = np.full((batch, units_padded, self.slots), PAD_ID, np.int32)
    nb = np.zeros((batch, units_padded), np.int32)
    word = np.full((batch, self.slots), PAD_ID, np.int32)
    ids[:, :, 0] = W_ID
    ids[:, 0, 0] = S_ID
    word[:, 0] = W_ID
    units = np.ones(batch, np.int32)
    nbytes = np.zeros(batch, np.int32)
    for b in np.flatnonzero(which):
      words = rows[b]["words"]
      kept = kept_context(len(words), self.max_units, slide)
      if kept < len(words) and self.overflow == "error":
        raise layout.CapacityError(
            f"context of {len(words)} words + START exceeds the backbone KV cache of "
            f"{self.max_units} units; raise max_units or use overflow='slide'")
      context = words[len(words) - kept:]
      for u, w in enumerate(context, start=1):
        ids[b, u, 1:len(w) + 1] = np.frombuffer(w, np.uint8)
        nb[b, u] = len(w)
      units[b] = len(context) + 1
      partial = rows[b]["partial"]
      word[b, 1:len(partial) + 1] = np.frombuffer(partial, np.uint8)
      nbytes[b] = len(partial)
    return ids, nb, units, word, nbytes
