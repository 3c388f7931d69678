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

import jax
import jax.numpy as jnp
from flax import nnx

from hat.config import ModelConfig, merge_capacity
from hat.models import gates
from hat.models.hat_model import ByteHierarchy, Units
from hat.models.layers import embed_lookup
from hat.sharding import constrain
from hat.text.codec import BYTE_VOCAB_SIZE


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


class MergeHAT(ByteHierarchy):
  """Causal byte encoder -> boundary gate -> chunk backbone -> span-local byte decoder.

  Overrides the encode stage (chunks instead of words), the decoder inputs (a guide
  vector added to every byte of the span) and the decode stage (the byte stream).
  """

  encoder_causal = True  # the boundary gate may only look left

  def __init__(self, cfg: ModelConfig, *, vocab_size: int = BYTE_VOCAB_SIZE,
               row_len: int | None = None, rngs: nnx.Rngs):
    del row_len  # the byte stream has no rows
    super().__init__(cfg, vocab_size=vocab_size, rngs=rngs)
    self.max_chunk = cfg.gate.merge.max_chunk_bytes
    self.gate = gates.BoundaryGate(cfg.encoder.d_model, norm_eps=cfg.encoder.norm_eps,
                                   param_dtype=cfg.param_dtype, rngs=rngs)

  def _chunk_in(self, h_Bx_xd, conf):
    return self._project_in(h_Bx_xd) * conf[..., None].astype(self.compute_dtype)

  def _chunk_out(self, h_Bx_xD):
    return self._project_out(h_Bx_xD)

  def encode(self, batch: dict, aux: dict) -> Units:
    """Stream encoder, chunk ends, and the chunk vectors compacted to M positions."""
    ids_BxT, seg_BxT, pos_BxT = batch["tokens_BxT"], batch["segment_BxT"], batch["pos_BxT"]
    capacity = merge_capacity(self.cfg.gate.merge, ids_BxT.shape[1])
    x_BxTxd = embed_lookup(self.enc_embed[...], ids_BxT, self.compute_dtype)
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
    self._gate_aux(aux, p_BxT, end_BxT, seg_BxT, pos_BxT, overflow_B)
    return Units(constrain(chunks_BxMxD, ("batch", "units", "embed")), cseg_BxM, cpos_BxM,
                 extra={"end_BxT": end_BxT, "index_BxM": index_BxM})

  def _gate_aux(self, aux, p_BxT, end_BxT, seg_BxT, pos_BxT, overflow_B) -> None:
    """Summed gate statistics, the controlled loss and (ratio controller) its fixed loss."""
    inner_BxT = (seg_BxT > 0) & (pos_BxT > 0)  # bytes whose chunk end the gate decides
    units = jnp.sum(inner_BxT).astype(jnp.float32)
    p_sum = jnp.sum(jnp.where(inner_BxT, p_BxT, 0.0))
    aux.update(gate_units=units,
               gate_deleted=jnp.sum(inner_BxT & ~end_BxT).astype(jnp.float32),
               gate_p_sum=p_sum, chunks=jnp.sum(end_BxT).astype(jnp.float32),
               chunk_overflow=jnp.sum(overflow_B).astype(jnp.float32),
               gate_loss=p_sum / jnp.maximum(units, 1.0), boundary_BxT=end_BxT)
    g = self.cfg.gate
    if g.controller == "ratio":
      aux["gate_fixed_loss"] = g.merge.ratio_loss_weight * gates.ratio_loss(
          p_BxT, end_BxT, inner_BxT, g.merge.target_bytes_per_chunk)

  def _spans(self, batch: dict, units: Units):
    """Per byte t: the chunk that guides it (the last ending at or before t) and its span."""
    seg_BxT = batch["segment_BxT"]
    capacity = units.segment_BxW.shape[1]
    chunk_BxT = jnp.clip(gates.slot_of(units.extra["end_BxT"]), 0, capacity - 1)
    same_doc_BxT = (seg_BxT > 0) & (jnp.take_along_axis(units.segment_BxW, chunk_BxT,
                                                         axis=1) == seg_BxT)
    return chunk_BxT, same_doc_BxT

  def decoder_inputs(self, p_BxWxd: jax.Array, batch: dict, units: Units) -> jax.Array:
    """Byte embeddings plus the guide p of the chunk each byte's span follows."""
    cd = self.compute_dtype
    chunk_BxT, same_doc_BxT = self._spans(batch, units)
    guide_BxTxd = jnp.take_along_axis(p_BxWxd, chunk_BxT[:, :, None], axis=1)
    y_BxTxd = embed_lookup(self._dec_table(), batch["tokens_BxT"], cd)
    return y_BxTxd + jnp.where(same_doc_BxT[:, :, None], guide_BxTxd, 0).astype(cd)

  def decode(self, x_BxTxd: jax.Array, batch: dict, units: Units) -> jax.Array:
    """Causal decoder whose attention stays in each span (bytes since the chunk end)."""
    seg_BxT = batch["segment_BxT"]
    length = seg_BxT.shape[1]
    chunk_BxT, _ = self._spans(batch, units)
    span_start_BxT = jnp.take_along_axis(units.extra["index_BxM"], chunk_BxT, axis=1)
    dseg_BxT = jnp.where(seg_BxT > 0, (chunk_BxT + 1) * (length + 1) + seg_BxT, 0)
    dpos_BxT = jnp.maximum(jnp.arange(length)[None, :] - span_start_BxT, 0)
    hd_BxTxd = self.decoder(x_BxTxd, segment_BxL=dseg_BxT, pos_BxL=dpos_BxT)
    return self._head(hd_BxTxd, ("batch", "length", "vocab"))

  def __call__(self, batch: dict, *, with_boundaries: bool = False):
    """Teacher-forced forward -> (fp32 logits_BxTxV, aux: summed gate statistics + losses).

    `with_boundaries` keeps the chunk-end flags `boundary_BxT` in aux (tests, tools).
    """
    logits_BxTxV, aux = super().__call__(batch)
    if not with_boundaries:
      del aux["boundary_BxT"]
    return logits_BxTxV, aux
