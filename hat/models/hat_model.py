"""The hierarchical autoregressive transformer (HAT): byte encoder, word backbone, byte decoder.

Consumes the packed-row HAT layout of `hat.data.batch`. Byte-level attention runs per
packed row, (B·R, C, C), with a same-unit mask; the backbone runs over units, (B, W, W),
with a same-segment causal mask. The decoder of unit j sees the predictive embedding of
unit j-1 at its marker slot and its own earlier bytes after it, never later words.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from hat.config import ModelConfig
from hat.models.layers import TransformerStack, embed_lookup, param, to_dtype
from hat.sharding import constrain
from hat.text.codec import BYTE_VOCAB_SIZE


def _gather_units(x_BxSxD: jax.Array, index_BxW: jax.Array) -> jax.Array:
  """x[b, index[b, w]] for every (b, w)."""
  return jnp.take_along_axis(x_BxSxD, index_BxW[:, :, None], axis=1)


def _stack_kwargs(cfg: ModelConfig) -> dict:
  return dict(attention_impl=cfg.attention_impl, compute_dtype=cfg.compute_dtype,
              param_dtype=cfg.param_dtype, remat=cfg.remat, scan_layers=cfg.scan_layers)


class ByteHierarchy(nnx.Module):
  """The stages every HAT variant shares: encode, backbone, decoder inputs, decode.

  `__call__(batch)` runs them in order and returns `(logits, aux)`. A variant overrides
  only the stage it changes (and `build_backbone` if its backbone differs):

    encode(batch, aux)                     -> Units (backbone inputs, segments, positions)
    backbone_stage(units, aux, **options)  -> p_BxWxd, predictive embeddings
    decoder_inputs(p_BxWxd, batch, units)  -> decoder input embeddings
    decode(x, batch, units)                -> fp32 logits

  `aux` collects summed statistics and losses (empty for plain HAT). Stage outputs that
  later stages need besides the tensors above travel in `Units.extra`.
  """

  encoder_causal = False  # the merge variant's gate may only look left

  def __init__(self, cfg: ModelConfig, *, vocab_size: int = BYTE_VOCAB_SIZE,
               row_len: int | None = None, rngs: nnx.Rngs):
    if vocab_size != BYTE_VOCAB_SIZE:
      raise ValueError(f"HAT predicts the {BYTE_VOCAB_SIZE} byte symbols, got vocab_size="
                       f"{vocab_size}")
    self.cfg = cfg
    self.compute_dtype = to_dtype(cfg.compute_dtype)
    # S = R·C is all the batch shapes say; the row length C must come from the data config.
    self.row_len = row_len
    enc, bb, dec = cfg.encoder, cfg.backbone, cfg.decoder
    pd, v = to_dtype(cfg.param_dtype), BYTE_VOCAB_SIZE
    self.enc_embed = param(rngs, (v, enc.d_model), ("vocab", "embed"), fan_in=1, dtype=pd)
    if not cfg.tie_byte_embeddings:
      self.dec_embed = param(rngs, (v, dec.d_model), ("vocab", "embed"), fan_in=1, dtype=pd)
    self.encoder = TransformerStack(enc, causal=self.encoder_causal, rngs=rngs,
                                    **_stack_kwargs(cfg))
    self.w_enc = param(rngs, (enc.d_model, bb.d_model), (None, "embed"), fan_in=enc.d_model,
                       dtype=pd)
    self.build_backbone(rngs)
    self.w_dec = param(rngs, (bb.d_model, dec.d_model), ("embed", None), fan_in=bb.d_model,
                       dtype=pd)
    self.decoder = TransformerStack(dec, causal=True, rngs=rngs, **_stack_kwargs(cfg))
    self.head = param(rngs, (dec.d_model, v), ("embed", "vocab"), fan_in=dec.d_model,
                      dtype=pd)

  def build_backbone(self, rngs: nnx.Rngs) -> None:
    """The word-level stack (a variant with a gate inside it overrides this)."""
    self.backbone = TransformerStack(self.cfg.backbone, causal=True, rngs=rngs,
                                     **_stack_kwargs(self.cfg))

  def __call__(self, batch: dict, **options) -> tuple[jax.Array, dict]:
    """Teacher-forced forward -> (fp32 logits, aux of summed statistics and losses)."""
    aux: dict = {}
    units = self.encode(batch, aux)
    p_BxWxd = self.backbone_stage(units, aux, **options)
    logits = self.decode(self.decoder_inputs(p_BxWxd, batch, units), batch, units)
    return logits, aux

  # Shared pieces.

  def _dec_table(self) -> jax.Array:
    return (self.enc_embed if self.cfg.tie_byte_embeddings else self.dec_embed)[...]

  def _project_in(self, e_BxWxd: jax.Array) -> jax.Array:
    cd = self.compute_dtype
    words_BxWxD = jnp.einsum("bwd,de->bwe", e_BxWxd.astype(cd), self.w_enc[...].astype(cd))
    return constrain(words_BxWxD, ("batch", "units", "embed"))

  def _project_out(self, h_BxWxD: jax.Array) -> jax.Array:
    cd = self.compute_dtype
    p_BxWxd = jnp.einsum("bwe,ed->bwd", h_BxWxD.astype(cd), self.w_dec[...].astype(cd))
    return constrain(p_BxWxd, ("batch", "units", "embed"))

  def _head(self, h_BxSxd: jax.Array,
            names: tuple = ("batch", "length", "vocab")) -> jax.Array:
    cd = self.compute_dtype
    logits_BxSxV = jnp.einsum("bsd,dv->bsv", h_BxSxd.astype(cd), self.head[...].astype(cd),
                              preferred_element_type=jnp.float32)
    return constrain(logits_BxSxV, names)

  def backbone_stage(self, units: "Units", aux: dict, **options) -> jax.Array:
    """Causal word backbone -> predictive embeddings p_BxWxd (p_j predicts unit j+1)."""
    del aux, options
    h_BxWxD = self.backbone(units.x_BxWxD, segment_BxL=units.segment_BxW,
                            pos_BxL=units.pos_BxW)
    return self._project_out(h_BxWxD)


@dataclasses.dataclass(frozen=True)
class Units:
  """The backbone's input: one vector per unit (word or chunk) with its segment and position."""

  x_BxWxD: jax.Array
  segment_BxW: jax.Array
  pos_BxW: jax.Array
  extra: dict = dataclasses.field(default_factory=dict)


jax.tree_util.register_dataclass(Units, data_fields=["x_BxWxD", "segment_BxW", "pos_BxW",
                                                     "extra"], meta_fields=[])


class HAT(ByteHierarchy):
  """Encoder (bidirectional, per word) -> causal backbone (per word) -> decoder (per word).

  Byte stacks run over the packed rows of the HAT layout, (B·R, C, C) with a same-unit
  mask; the backbone runs over units.
  """

  def _row_len(self) -> int:
    if not self.row_len:
      raise ValueError("HAT needs the packed row length: build it with row_len=data.row_len")
    return self.row_len

  def _run_rows(self, stack: TransformerStack, x_BxSxd: jax.Array, slot_unit_BxS: jax.Array,
                slot_pos_BxS: jax.Array) -> jax.Array:
    """Runs a byte-level stack per packed row: (B, S, d) -> (B*R, C, d) -> (B, S, d)."""
    row_len = self._row_len()
    batch, slots, width = x_BxSxd.shape
    if slots % row_len:
      raise ValueError(f"{slots} slots are not whole rows of row_len={row_len}")
    rows = slots // row_len
    x_NxCxd = x_BxSxd.reshape(batch * rows, row_len, width)
    # Unit index + 1 as the segment: attention stays in the unit, padding (-1 -> 0) alone.
    segment_NxC = (slot_unit_BxS + 1).reshape(batch * rows, row_len)
    pos_NxC = slot_pos_BxS.reshape(batch * rows, row_len)
    y_NxCxd = stack(x_NxCxd, segment_BxL=segment_NxC, pos_BxL=pos_NxC)
    return y_NxCxd.reshape(batch, slots, width)

  def encode(self, batch: dict, aux: dict) -> Units:
    """Byte encoder read out at each unit's marker slot, projected: words_BxWxD."""
    del aux
    x_BxSxd = embed_lookup(self.enc_embed[...], batch["slot_ids_BxS"], self.compute_dtype)
    h_BxSxd = self._run_rows(self.encoder, x_BxSxd, batch["slot_unit_BxS"],
                             batch["slot_pos_BxS"])
    e_BxWxd = _gather_units(h_BxSxd, batch["unit_slot_BxW"])
    return Units(self._project_in(e_BxWxd), batch["unit_segment_BxW"], batch["unit_pos_BxW"])

  def decoder_inputs(self, p_BxWxd: jax.Array, batch: dict, units: Units) -> jax.Array:
    """Byte embeddings, with each unit's marker slot replaced by p of the previous unit."""
    del units
    cd = self.compute_dtype
    slot_unit_BxS, slot_pos_BxS = batch["slot_unit_BxS"], batch["slot_pos_BxS"]
    x_BxSxd = embed_lookup(self._dec_table(), batch["slot_ids_BxS"], cd)
    prev_BxS = jnp.clip(slot_unit_BxS - 1, 0, p_BxWxd.shape[1] - 1)
    p_prev_BxSxd = _gather_units(p_BxWxd, prev_BxS).astype(cd)
    own_pos_BxS = jnp.take_along_axis(batch["unit_pos_BxW"], jnp.maximum(slot_unit_BxS, 0),
                                      axis=1)
    is_marker_BxS = (slot_pos_BxS == 0) & (slot_unit_BxS >= 0)
    # A START unit (segment position 0) predicts nothing: no previous unit to read from.
    has_prev_BxS = is_marker_BxS & (own_pos_BxS > 0) & (slot_unit_BxS >= 1)
    x_BxSxd = jnp.where(is_marker_BxS[:, :, None], 0, x_BxSxd)
    x_BxSxd = jnp.where(has_prev_BxS[:, :, None], p_prev_BxSxd, x_BxSxd)
    return constrain(x_BxSxd, ("batch", "slots", "embed"))

  def decode(self, x_BxSxd: jax.Array, batch: dict, units: Units) -> jax.Array:
    """Causal byte decoder per row + head -> fp32 logits_BxSxV."""
    del units
    h_BxSxd = self._run_rows(self.decoder, x_BxSxd, batch["slot_unit_BxS"],
                             batch["slot_pos_BxS"])
    return self._head(h_BxSxd, ("batch", "slots", "vocab"))
