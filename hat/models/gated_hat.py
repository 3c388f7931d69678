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
import math

import jax
import jax.numpy as jnp
from flax import nnx

from hat.config import ModelConfig
from hat.models import gates
from hat.models.hat_model import HAT
from hat.models.layers import Block, TransformerStack, attend
from hat.sharding import constrain
from hat.text.codec import BYTE_VOCAB_SIZE


def default_capacity(model_cfg: ModelConfig, max_units: int) -> int:
  """Kept words per sequence for hard deletion: the config's, else (1-δ)·W·1.25 rounded to 8."""
  g = model_cfg.gate
  if g.capacity:
    return g.capacity
  return min(max_units, int(math.ceil((1.0 - g.target_ratio) * max_units * 1.25 / 8)) * 8)


def stack_blocks(stack: TransformerStack) -> list[Block]:
  """The stack's blocks as separate modules (slicing the layer axis when scanned)."""
  if not stack.scan_layers:
    return list(stack.blocks)
  graphdef, state = nnx.split(stack.layers)
  n = stack.cfg.num_layers
  return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(n)]


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
  for block in stack_blocks(stack):
    q, k, v = block.attn.qkv(block.attn_norm(x_BxWxD), pos_BxW)
    att = attend(q, gather(k), gather(v), mask_BxWxM, self_kv=(k, v))
    x_BxWxD = x_BxWxD + block.attn.out(att)
    x_BxWxD = x_BxWxD + block.mlp(block.mlp_norm(x_BxWxD))
  if stack.final_norm is not None:
    x_BxWxD = stack.final_norm(x_BxWxD)
  return x_BxWxD, overflow_B


class GatedHAT(HAT):
  """HAT whose backbone has a MrT5 delete gate after `gate.layer` blocks."""

  def __init__(self, cfg: ModelConfig, *, vocab_size: int = BYTE_VOCAB_SIZE,
               row_len: int | None = None, rngs: nnx.Rngs):
    super().__init__(cfg, vocab_size=vocab_size, row_len=row_len, rngs=rngs)
    del self.backbone  # replaced by the two halves around the gate
    g, bb = cfg.gate, cfg.backbone
    stack = dict(attention_impl=cfg.attention_impl, compute_dtype=cfg.compute_dtype,
                 param_dtype=cfg.param_dtype, remat=cfg.remat, scan_layers=cfg.scan_layers)
    split = lambda n, norm: TransformerStack(dataclasses.replace(bb, num_layers=n),
                                             causal=True, final_norm=norm, rngs=rngs, **stack)
    self.backbone_lower = split(g.layer, False)
    self.gate = gates.DeleteGate(bb.d_model, k=g.k, bias_init=g.bias_init,
                                 norm_eps=bb.norm_eps, param_dtype=cfg.param_dtype, rngs=rngs)
    self.backbone_upper = split(bb.num_layers - g.layer, True)

  def gate_scores(self, words_BxWxD, segment_BxW, pos_BxW):
    """Lower layers and the gate: (h_BxWxD, G_BxW with 0 on padding)."""
    h_BxWxD = self.backbone_lower(words_BxWxD, segment_BxL=segment_BxW, pos_BxL=pos_BxW)
    gate_in_BxWxD = jax.lax.stop_gradient(h_BxWxD) if self.cfg.gate.detach_input else h_BxWxD
    g_BxW = jnp.where(segment_BxW > 0, self.gate(gate_in_BxWxD), 0.0)
    return h_BxWxD, g_BxW

  def _project(self, h_BxWxD):
    cd = self.compute_dtype
    p_BxWxd = jnp.einsum("bwe,ed->bwd", h_BxWxD.astype(cd), self.w_dec[...].astype(cd))
    return constrain(p_BxWxd, ("batch", "units", "embed"))

  def backbone_with_aux(self, words_BxWxD, segment_BxW, pos_BxW, *, hard: bool = False):
    """Gated backbone -> (p_BxWxd, aux of summed gate statistics)."""
    h_BxWxD, g_BxW = self.gate_scores(words_BxWxD, segment_BxW, pos_BxW)
    real_BxW = segment_BxW > 0
    gone_BxW = gates.deleted(g_BxW, self.gate.k) & real_BxW
    aux = {"gate_sum": jnp.sum(g_BxW), "gate_units": jnp.sum(real_BxW).astype(jnp.float32),
           "gate_deleted": jnp.sum(gone_BxW).astype(jnp.float32)}
    if hard:
      capacity = default_capacity(self.cfg, words_BxWxD.shape[1])
      h_BxWxD, overflow_B = hard_upper(self.backbone_upper, h_BxWxD, segment_BxW, pos_BxW,
                                       real_BxW & ~gone_BxW, capacity)
      aux["kv_overflow"] = jnp.sum(overflow_B).astype(jnp.float32)
    else:
      h_BxWxD = self.backbone_upper(h_BxWxD, segment_BxL=segment_BxW, pos_BxL=pos_BxW,
                                    key_bias_BxL=g_BxW)
    return self._project(h_BxWxD), aux

  def backbone_forward(self, words_BxWxD, unit_segment_BxW, unit_pos_BxW):
    """Soft-deletion backbone -> predictive embeddings p_BxWxd."""
    return self.backbone_with_aux(words_BxWxD, unit_segment_BxW, unit_pos_BxW)[0]

  def __call__(self, batch: dict, *, hard: bool = False, row_len: int | None = None):
    """Teacher-forced forward -> (logits_BxSxV, gate aux); `gate_loss` = mean G."""
    row_len = row_len or self.row_len
    words_BxWxD = self.encode(batch, row_len)
    p_BxWxd, aux = self.backbone_with_aux(words_BxWxD, batch["unit_segment_BxW"],
                                          batch["unit_pos_BxW"], hard=hard)
    logits = self.decode(self.decoder_inputs(p_BxWxd, batch), batch, row_len)
    aux["gate_loss"] = aux["gate_sum"] / jnp.maximum(aux["gate_units"], 1.0)
    return logits, aux
