"""Deletion-gated HAT: a MrT5 delete gate inside the word backbone (KV-cache compression).

The backbone is split in two stacks: `layer` lower blocks (no final norm), the gate, and
the upper blocks. Every word keeps its own query, so a deleted word still predicts the
next word; what deletion removes is the word's key/value entry in the upper layers.

- Soft deletion (training, `__call__`): G is added to the upper layers' attention logits
  on the key axis, except on the diagonal (a word always attends to itself).
- Hard deletion (`model(batch, hard=True)`): words with G < k/2 get no K/V.
  The upper layers' K/V are compacted to a fixed capacity M per sequence (the first M
  kept words, in order); kept words beyond M are dropped and counted (`kv_overflow`).
- Generation (`hat.generate`): one word per step through the KV cache of
  `layers.TransformerStack.extend`; the lower layers append every word's K/V, the upper
  layers only kept words' (keep mask, the same first-M policy), so the cache holds
  exactly what the batched hard pass attends to.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from hat.config import delete_capacity
from hat.models import gates
from hat.models.hat_model import HAT, Units, _stack_kwargs
from hat.models.layers import TransformerStack, attend


def hard_upper(stack: TransformerStack, x_BxWxD, segment_BxW, pos_BxW, keep_BxW,
               capacity: int):
  """Upper layers with K/V compacted to `capacity` kept words; (h_BxWxD, overflow_B)."""
  index_BxM, valid_BxM, overflow_B = gates.compact_indices(keep_BxW, capacity)
  seg_BxM = jnp.take_along_axis(segment_BxW, index_BxM, axis=1)
  length = x_BxWxD.shape[1]
  query_BxW = jnp.broadcast_to(jnp.arange(length)[None], segment_BxW.shape)
  # Cached keys strictly before the query (its own key is added separately), same segment.
  mask_BxWxM = (valid_BxM[:, None, :] & (seg_BxM[:, None, :] == segment_BxW[:, :, None])
                & (index_BxM[:, None, :] < query_BxW[:, :, None]))
  # Kept keys in the cache layout (B, G, M, K), as a KV cache holding only kept words.
  gather = lambda a: jnp.take_along_axis(a, index_BxM[:, :, None, None], axis=1).transpose(
      0, 2, 1, 3)
  for block in stack.layer_blocks():
    q, k, v = block.attn.qkv(block.attn_norm(x_BxWxD), pos_BxW)
    att = attend(q, gather(k), gather(v), mask_BxWxM, self_kv=(k, v))
    x_BxWxD = x_BxWxD + block.attn.out(att)
    x_BxWxD = x_BxWxD + block.mlp(block.mlp_norm(x_BxWxD))
  if stack.final_norm is not None:
    x_BxWxD = stack.final_norm(x_BxWxD)
  return x_BxWxD, overflow_B


class GatedHAT(HAT):
  """HAT whose backbone has a MrT5 delete gate after `gate.delete.layer` blocks.

  Overrides the backbone of the byte hierarchy only: `backbone_lower` (absent when the
  gate sits on the word inputs, layer 0), the gate, and `backbone_upper`.
  """

  def build_backbone(self, rngs: nnx.Rngs) -> None:
    """Two halves of the word backbone around the gate (no final norm below it)."""
    cfg, bb = self.cfg, self.cfg.backbone
    g = cfg.gate.delete
    split = lambda n, norm: TransformerStack(dataclasses.replace(bb, num_layers=n),
                                             causal=True, final_norm=norm, rngs=rngs,
                                             **_stack_kwargs(cfg))
    self.backbone_lower = split(g.layer, False) if g.layer else None
    self.gate = gates.DeleteGate(bb.d_model, k=g.k, bias_init=g.bias_init,
                                 norm_eps=bb.norm_eps, param_dtype=cfg.param_dtype, rngs=rngs)
    self.backbone_upper = split(bb.num_layers - g.layer, True)

  def gate_scores(self, words_BxWxD, segment_BxW, pos_BxW):
    """Lower layers and the gate: (h_BxWxD, G_BxW with 0 on padding)."""
    h_BxWxD = words_BxWxD
    if self.backbone_lower is not None:
      h_BxWxD = self.backbone_lower(words_BxWxD, segment_BxL=segment_BxW, pos_BxL=pos_BxW)
    detach = self.cfg.gate.delete.detach_input
    gate_in_BxWxD = jax.lax.stop_gradient(h_BxWxD) if detach else h_BxWxD
    g_BxW = jnp.where(segment_BxW > 0, self.gate(gate_in_BxWxD), 0.0)
    return h_BxWxD, g_BxW

  def _project(self, h_BxWxD):
    return self._project_out(h_BxWxD)

  def backbone_stage(self, units: Units, aux: dict, *, hard: bool = False) -> jax.Array:
    """Gated backbone -> p_BxWxd; soft deletion, or hard (compacted K/V) with `hard`.

    Adds the summed gate statistics and `gate_loss` (mean G over real words) to aux.
    """
    segment_BxW, pos_BxW = units.segment_BxW, units.pos_BxW
    h_BxWxD, g_BxW = self.gate_scores(units.x_BxWxD, segment_BxW, pos_BxW)
    real_BxW = segment_BxW > 0
    gone_BxW = gates.deleted(g_BxW, self.gate.k) & real_BxW
    aux.update(gate_sum=jnp.sum(g_BxW), gate_units=jnp.sum(real_BxW).astype(jnp.float32),
               gate_deleted=jnp.sum(gone_BxW).astype(jnp.float32))
    if hard:
      capacity = delete_capacity(self.cfg.gate.delete, units.x_BxWxD.shape[1])
      h_BxWxD, overflow_B = hard_upper(self.backbone_upper, h_BxWxD, segment_BxW, pos_BxW,
                                       real_BxW & ~gone_BxW, capacity)
      aux["kv_overflow"] = jnp.sum(overflow_B).astype(jnp.float32)
    else:
      h_BxWxD = self.backbone_upper(h_BxWxD, segment_BxL=segment_BxW, pos_BxL=pos_BxW,
                                    key_bias_BxL=g_BxW)
    aux["gate_loss"] = aux["gate_sum"] / jnp.maximum(aux["gate_units"], 1.0)
    return self._project_out(h_BxWxD)
