"""The byte encoder as generation runs it: one unit per row, read out at its marker only.

The encoder is bidirectional within a unit, and a unit's embedding is the last layer's
output at the marker slot (position 0). So the last layer needs keys and values of every
slot but a query, an attention output and an MLP for slot 0 alone: for the one-layer
encoders of the small configs that is most of the encoder's work saved, and a word step
encodes a handful of words every tick. The lower layers run over every slot as in
training. Slots past the unit are padding, masked out of attention, so the result does
not depend on the padded length: `encode_bucketed` runs over the fewest slots that hold
the longest unit of the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hat.generate.device import embed, project
from hat.models.layers import attend, segment_mask, select_attention_impl, to_dtype


def _marker_layer(block, x_NxLxd: jax.Array, pos_NxL: jax.Array,
                  visible_Nx1xL: jax.Array) -> jax.Array:
  """One block's output at slot 0 only (keys and values from every slot) -> x_Nx1xd."""
  attn = block.attn
  q_NxLxHxK, k_NxLxGxK, v_NxLxGxK = attn.qkv(block.attn_norm(x_NxLxd), pos_NxL)
  att_Nx1xHxK = attend(q_NxLxHxK[:, :1], k_NxLxGxK.transpose(0, 2, 1, 3),
                       v_NxLxGxK.transpose(0, 2, 1, 3), visible_Nx1xL)
  x_Nx1xd = x_NxLxd[:, :1] + attn.out(att_Nx1xHxK)
  return x_Nx1xd + block.mlp(block.mlp_norm(x_Nx1xd))


def encode_units(model, ids_NxL: jax.Array, num_bytes_N: jax.Array) -> jax.Array:
  """Encoder over single units `[marker] b_1..b_n` (padded to L) -> words_NxD."""
  cd = model.compute_dtype
  stack = model.encoder
  length = ids_NxL.shape[1]
  pos_NxL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None], ids_NxL.shape)
  # Segment 1 for the unit, 0 for padding: the same-unit mask of the packed layout.
  segment_NxL = (pos_NxL <= num_bytes_N[:, None]).astype(jnp.int32)
  mask_NxLxL = segment_mask(segment_NxL, stack.causal)
  # As the stack's own call: splash (TPU) reads segment ids and takes no dense mask.
  impl = select_attention_impl(stack.impl, dtype=to_dtype(stack.compute_dtype),
                               head_dim=stack.cfg.head_dim, length=length)
  x_NxLxd = embed(model.enc_embed[...], ids_NxL, cd)
  *lower, last = stack.layer_blocks()
  for block in lower:
    x_NxLxd = block(x_NxLxd, segment_BxL=segment_NxL, pos_BxL=pos_NxL,
                    mask_BxLxL=None if impl == "splash" else mask_NxLxL)
  h_Nx1xd = _marker_layer(last, x_NxLxd, pos_NxL, mask_NxLxL[:, :1])
  if stack.final_norm is not None:
    h_Nx1xd = stack.final_norm(h_Nx1xd)
  return project(h_Nx1xd, model.w_enc[...], cd)[:, 0]


def encode_bucketed(model, ids_NxL: jax.Array, num_bytes_N: jax.Array) -> jax.Array:
  """`encode_units` over the fewest slots (8, 16 or all) that hold the longest unit."""
  slots = ids_NxL.shape[1]
  buckets = sorted({min(b, slots) for b in (8, 16, slots)})
  need = jnp.max(num_bytes_N) + 1
  index = jnp.sum(jnp.array(buckets[:-1]) < need)
  branches = [lambda ids, nb, b=b: encode_units(model, ids[:, :b], nb) for b in buckets]
  return jax.lax.switch(index, branches, ids_NxL, num_bytes_N)
