"""Merge-gated HAT: learned byte chunks instead of rule-based words (no splitter).

Consumes the byte-stream layout of `hat.data.merge_layout` (per segment `[S] b_1 … b_n`,
targets shifted left). Data flow, all causal:

1. A byte encoder runs over the packed stream (attention within a document segment).
2. A boundary gate reads each byte's state h_t: a chunk ends at t when p_t > 0.5, or at
   `[S]` (a segment's first position is a chunk of its own, like HAT's START unit), or
   when the chunk reached `max_chunk_bytes`. Every input to the decision lies at or
   before t, so generation makes the identical decision online (`hat.generate`).
3. Chunk ends are compacted to M backbone positions (`capacity`); chunk ends beyond M are
   dropped (their bytes join the last chunk that fit) and counted as `chunk_overflow`.
   A chunk's vector is W_E·h_end times a straight-through confidence (value 1, gradient
   through p), so the language-model loss also trains the gate.
4. The backbone predicts p_c for each chunk; position t decodes byte t+1 from the guide
   p of the last chunk ending at or before t, added to the byte embeddings of the
   decoder, whose attention stays within that span (the bytes since the chunk end).

A controller keeps the mean chunk length near `target_bytes_per_chunk`: MrT5's PI
controller on `alpha·mean(p)` (the "deleted" bytes are those ending no chunk) or
H-Net's ratio loss at a fixed weight.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from hat.config import ModelConfig
from hat.models import gates
from hat.models.hat_model import build_byte_hierarchy
from hat.models.layers import embed_lookup, to_dtype
from hat.sharding import constrain
from hat.text.codec import BYTE_VOCAB_SIZE


def merge_capacity(model_cfg: ModelConfig, positions: int) -> int:
  """Backbone positions per sequence: the config's, else 1.25·T/target rounded up to 8."""
  g = model_cfg.gate
  if g.capacity:
    return g.capacity
  return min(positions, int(math.ceil(1.25 * positions / g.target_bytes_per_chunk / 8)) * 8)


def chunk_boundaries(p_BxT, segment_BxT, pos_BxT, max_chunk: int):
  """Chunk-end decisions, left to right: [S], p > 0.5, or a chunk of max_chunk bytes."""
  real_BxT = segment_BxT > 0
  bos_BxT = real_BxT & (pos_BxT == 0)
  want_BxT = real_BxT & (p_BxT > 0.5)

  def body(run_B, inputs):
    want_B, bos_B = inputs
    run_B = jnp.where(bos_B, 1, run_B + 1)  # bytes in the current chunk, this one included
    end_B = bos_B | want_B | (run_B >= max_chunk)
    return jnp.where(end_B, 0, run_B), end_B

  batch = p_BxT.shape[0]
  _, end_TxB = jax.lax.scan(body, jnp.zeros((batch,), jnp.int32), (want_BxT.T, bos_BxT.T))
  return end_TxB.T & real_BxT


class MergeHAT(nnx.Module):
  """Causal byte encoder -> boundary gate -> chunk backbone -> span-local byte decoder."""

  def __init__(self, cfg: ModelConfig, *, vocab_size: int = BYTE_VOCAB_SIZE,
               row_len: int | None = None, rngs: nnx.Rngs):
    del row_len  # the byte stream has no rows
    if vocab_size != BYTE_VOCAB_SIZE:
      raise ValueError(f"the merge HAT predicts the {BYTE_VOCAB_SIZE} byte symbols, got "
                       f"vocab_size={vocab_size}")
    self.cfg, self.compute_dtype = cfg, to_dtype(cfg.compute_dtype)
    self.max_chunk = cfg.gate.max_chunk_bytes
    # The same modules as HAT, but the byte encoder is causal: the gate may only look left.
    build_byte_hierarchy(self, cfg, encoder_causal=True, rngs=rngs)
    self.gate = gates.BoundaryGate(cfg.encoder.d_model, norm_eps=cfg.encoder.norm_eps,
                                   param_dtype=cfg.param_dtype, rngs=rngs)

  def _dec_table(self):
    return (self.enc_embed if self.cfg.tie_byte_embeddings else self.dec_embed)[...]

  def _chunk_in(self, h_Bx_xd, conf):
    cd = self.compute_dtype
    x = jnp.einsum("btd,de->bte", h_Bx_xd.astype(cd), self.w_enc[...].astype(cd))
    return x * conf[..., None].astype(cd)

  def _chunk_out(self, h_Bx_xD):
    cd = self.compute_dtype
    return jnp.einsum("bte,ed->btd", h_Bx_xD.astype(cd), self.w_dec[...].astype(cd))

  def _head(self, h_BxTxd):
    cd = self.compute_dtype
    return jnp.einsum("btd,dv->btv", h_BxTxd.astype(cd), self.head[...].astype(cd),
                      preferred_element_type=jnp.float32)

  def __call__(self, batch: dict, *, with_boundaries: bool = False):
    """Teacher-forced forward -> (logits_BxTxV fp32, aux: summed gate statistics + losses).

    `with_boundaries` adds the chunk-end flags `boundary_BxT` to aux (for tests/tools).
    """
    ids_BxT, seg_BxT, pos_BxT = batch["tokens_BxT"], batch["segment_BxT"], batch["pos_BxT"]
    length = ids_BxT.shape[1]
    capacity = merge_capacity(self.cfg, length)
    cd = self.compute_dtype
    x_BxTxd = embed_lookup(self.enc_embed[...], ids_BxT, cd)
    h_BxTxd = self.encoder(x_BxTxd, segment_BxL=seg_BxT, pos_BxL=pos_BxT)
    p_BxT = self.gate(h_BxTxd)
    end_BxT = chunk_boundaries(p_BxT, seg_BxT, pos_BxT, self.max_chunk)

    # Chunk ends -> M backbone positions (first M in order; the rest counted, dropped).
    index_BxM, valid_BxM, overflow_B = gates.compact_indices(end_BxT, capacity)
    take = lambda a: jnp.take_along_axis(a, index_BxM, axis=1)
    h_end_BxMxd = jnp.take_along_axis(h_BxTxd, index_BxM[:, :, None], axis=1)
    chunks_BxMxD = self._chunk_in(h_end_BxMxd, gates.straight_through(take(p_BxT)))
    cseg_BxM = jnp.where(valid_BxM, take(seg_BxT), 0)
    starts_BxM = jnp.concatenate([jnp.ones_like(cseg_BxM[:, :1], jnp.bool_),
                                  cseg_BxM[:, 1:] != cseg_BxM[:, :-1]], axis=1)
    arange_M = jnp.arange(capacity)[None, :]
    first_BxM = jax.lax.cummax(jnp.where(starts_BxM, arange_M, 0), axis=1)
    cpos_BxM = arange_M - first_BxM
    hb_BxMxD = self.backbone(constrain(chunks_BxMxD, ("batch", "units", "embed")),
                             segment_BxL=cseg_BxM, pos_BxL=cpos_BxM)
    guide_BxMxd = self._chunk_out(hb_BxMxD)

    # Position t decodes byte t+1 from the last chunk ending at or before t.
    real_BxT = seg_BxT > 0
    chunk_BxT = jnp.clip(jnp.minimum(gates.slot_of(end_BxT), capacity - 1), 0, capacity - 1)
    guide_BxTxd = jnp.take_along_axis(guide_BxMxd, chunk_BxT[:, :, None], axis=1)
    same_doc_BxT = real_BxT & (jnp.take_along_axis(cseg_BxM, chunk_BxT, axis=1) == seg_BxT)
    y_BxTxd = embed_lookup(self._dec_table(), ids_BxT, cd)
    y_BxTxd = y_BxTxd + jnp.where(same_doc_BxT[:, :, None], guide_BxTxd, 0).astype(cd)
    span_start_BxT = jnp.take_along_axis(index_BxM, chunk_BxT, axis=1)
    dseg_BxT = jnp.where(real_BxT, (chunk_BxT + 1) * (length + 1) + seg_BxT, 0)
    dpos_BxT = jnp.maximum(jnp.arange(length)[None, :] - span_start_BxT, 0)
    hd_BxTxd = self.decoder(y_BxTxd, segment_BxL=dseg_BxT, pos_BxL=dpos_BxT)
    logits_BxTxV = constrain(self._head(hd_BxTxd), ("batch", "length", "vocab"))

    inner_BxT = real_BxT & (pos_BxT > 0)  # bytes whose chunk end the gate decides
    units = jnp.sum(inner_BxT).astype(jnp.float32)
    aux = {
        "gate_units": units,
        "gate_deleted": jnp.sum(inner_BxT & ~end_BxT).astype(jnp.float32),
        "gate_p_sum": jnp.sum(jnp.where(inner_BxT, p_BxT, 0.0)),
        "chunks": jnp.sum(end_BxT).astype(jnp.float32),
        "chunk_overflow": jnp.sum(overflow_B).astype(jnp.float32),
        "gate_loss": jnp.sum(jnp.where(inner_BxT, p_BxT, 0.0)) / jnp.maximum(units, 1.0),
    }
    g = self.cfg.gate
    if g.controller == "ratio":
      aux["gate_fixed_loss"] = g.ratio_loss_weight * gates.ratio_loss(
          p_BxT, end_BxT, inner_BxT, g.target_bytes_per_chunk)
    if with_boundaries:
      aux["boundary_BxT"] = end_BxT
    return logits_BxTxV, aux
