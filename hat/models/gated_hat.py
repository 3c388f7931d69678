"""Deletion-gated HAT: a MrT5 delete gate inside the word backbone (KV-cache compression).

The backbone is split in two stacks: `layer` lower blocks (no final norm), the gate, and
the upper blocks. Every word keeps its own query, so a deleted word still predicts the
next word; what deletion removes is the word's key/value entry in the upper layers.

- Soft deletion (training, `__call__`): G is added to the upper layers' attention logits
  on the key axis, except on the diagonal (a word always attends to itself).
- Hard deletion (`model(batch, hard=True)`): words with G < k/2 get no K/V.
  The upper layers' K/V are compacted to a fixed capacity M per sequence (the first M
  kept words, in order); kept words beyond M are dropped and counted (`kv_overflow`).
- Generation (`CachedBackbone`): one word per step; the lower layers append every
  word's K/V to their cache, the upper layers only kept words' (the same first-M policy,
  counted), so the cache holds exactly what the batched hard pass attends to.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from hat.config import delete_capacity
from hat.models import gates
from hat.models.hat_model import HAT, Units, _stack_kwargs
from hat.models.layers import Block, TransformerStack, rope


def stack_blocks(stack: TransformerStack) -> list[Block]:
  """The stack's blocks as separate modules (slicing the layer axis when scanned)."""
  if not stack.scan_layers:
    return list(stack.blocks)
  graphdef, state = nnx.split(stack.layers)
  n = stack.cfg.num_layers
  return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(n)]


def _qkv(block: Block, x_BxLxD: jax.Array, pos_BxL: jax.Array):
  """Queries, keys and values of a block's attention (RoPE applied), as layers.Attention."""
  attn = block.attn
  cd = attn.compute_dtype
  x = block.attn_norm(x_BxLxD).astype(cd)
  q = jnp.einsum("bld,dhk->blhk", x, attn.wq[...].astype(cd))
  k = jnp.einsum("bld,dgk->blgk", x, attn.wk[...].astype(cd))
  v = jnp.einsum("bld,dgk->blgk", x, attn.wv[...].astype(cd))
  theta = attn.cfg.rope_theta
  return rope(q, pos_BxL, theta), rope(k, pos_BxL, theta), v


def _attend_cache_and_self(q_BxLxHxK, kc_BxMxGxK, vc_BxMxGxK, mask_BxLxM, k_BxLxGxK,
                           v_BxLxGxK):
  """Attention over M cached keys (masked) plus each query's own key, fp32 softmax."""
  b, length, heads, dim = q_BxLxHxK.shape
  groups = kc_BxMxGxK.shape[2]
  q = q_BxLxHxK.reshape(b, length, groups, heads // groups, dim)
  scale = dim**-0.5
  cache_BxGxRxLxM = jnp.einsum("blgrk,bmgk->bgrlm", q, kc_BxMxGxK,
                               preferred_element_type=jnp.float32) * scale
  self_BxGxRxLx1 = jnp.einsum("blgrk,blgk->bgrl", q, k_BxLxGxK,
                              preferred_element_type=jnp.float32)[..., None] * scale
  cache_BxGxRxLxM = jnp.where(mask_BxLxM[:, None, None], cache_BxGxRxLxM, -jnp.inf)
  probs = jax.nn.softmax(jnp.concatenate([cache_BxGxRxLxM, self_BxGxRxLx1], -1), axis=-1)
  pc, ps = probs[..., :-1], probs[..., -1]
  out = jnp.einsum("bgrlm,bmgk->blgrk", pc.astype(vc_BxMxGxK.dtype), vc_BxMxGxK)
  out = out + jnp.einsum("bgrl,blgk->blgrk", ps.astype(v_BxLxGxK.dtype), v_BxLxGxK)
  return out.reshape(b, length, heads, dim)


def _finish_block(block: Block, x_BxLxD, att_BxLxHxK):
  cd = block.attn.compute_dtype
  x_BxLxD = x_BxLxD + jnp.einsum("blhk,hkd->bld", att_BxLxHxK.astype(cd),
                                 block.attn.wo[...].astype(cd))
  return x_BxLxD + block.mlp(block.mlp_norm(x_BxLxD))


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
  gather = lambda a: jnp.take_along_axis(a, index_BxM[:, :, None, None], axis=1)
  for block in stack_blocks(stack):
    q, k, v = _qkv(block, x_BxWxD, pos_BxW)
    att = _attend_cache_and_self(q, gather(k), gather(v), mask_BxWxM, k, v)
    x_BxWxD = _finish_block(block, x_BxWxD, att)
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


# ------------------------------------------------------------------ incremental backbone


def _step_layer(block: Block, x_Bx1xD, pos_B, cache: dict, keep_B):
  """One block for one new position against its cache; appends K/V where keep_B."""
  q, k, v = _qkv(block, x_Bx1xD, pos_B[:, None])
  length_B = cache["len_B"]
  capacity = cache["k"].shape[1]
  mask_Bx1xC = (jnp.arange(capacity)[None, :] < length_B[:, None])[:, None, :]
  att = _attend_cache_and_self(q, cache["k"], cache["v"], mask_Bx1xC, k, v)
  write_B = keep_B & (length_B < capacity)
  at_BxC = (jnp.arange(capacity)[None, :] == length_B[:, None]) & write_B[:, None]
  new = {"k": jnp.where(at_BxC[:, :, None, None], k, cache["k"]),
         "v": jnp.where(at_BxC[:, :, None, None], v, cache["v"]),
         "len_B": length_B + write_B.astype(jnp.int32),
         "overflow_B": cache["overflow_B"] + (keep_B & ~write_B).astype(jnp.int32)}
  return _finish_block(block, x_Bx1xD, att), new


def empty_caches(stack: TransformerStack, batch: int, capacity: int) -> list[dict]:
  """Zeroed K/V caches, one per block of `stack`."""
  t = stack.cfg
  shape = (batch, capacity, t.num_kv_heads, t.head_dim)
  dtype = stack_blocks(stack)[0].attn.compute_dtype if t.num_layers else jnp.float32
  return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
           "len_B": jnp.zeros((batch,), jnp.int32),
           "overflow_B": jnp.zeros((batch,), jnp.int32)} for _ in range(t.num_layers)]


def step_stack(stack: TransformerStack, x_Bx1xD, pos_B, caches: list[dict], keep_B):
  """The whole stack (final norm included) for one new position; returns (h, caches)."""
  new_caches = []
  for block, cache in zip(stack_blocks(stack), caches):
    x_Bx1xD, cache = _step_layer(block, x_Bx1xD, pos_B, cache, keep_B)
    new_caches.append(cache)
  if stack.final_norm is not None:
    x_Bx1xD = stack.final_norm(x_Bx1xD)
  return x_Bx1xD, new_caches


def backbone_step(model: HAT, words_Bx1xD, pos_B, caches: dict):
  """One word through a HAT's (gated or plain) backbone with KV caches -> (p_Bx1xd, caches).

  `caches` = {"lower": [...], "upper": [...], "deleted_B": ...}; a plain HAT uses only
  "lower". Where the gate deletes the word, the upper caches do not grow.
  """
  batch = words_Bx1xD.shape[0]
  always = jnp.ones((batch,), jnp.bool_)
  if not isinstance(model, GatedHAT):
    h, lower = step_stack(model.backbone, words_Bx1xD, pos_B, caches["lower"], always)
    cd = model.compute_dtype
    p_Bx1xd = jnp.einsum("bwe,ed->bwd", h.astype(cd), model.w_dec[...].astype(cd))
    return p_Bx1xd, dict(caches, lower=lower)
  h, lower = step_stack(model.backbone_lower, words_Bx1xD, pos_B, caches["lower"], always)
  g_B = model.gate(h)[:, 0]
  gone_B = gates.deleted(g_B, model.gate.k)
  h, upper = step_stack(model.backbone_upper, h, pos_B, caches["upper"], ~gone_B)
  new = {"lower": lower, "upper": upper,
         "deleted_B": caches["deleted_B"] + gone_B.astype(jnp.int32)}
  return model._project(h), new


def empty_backbone_caches(model: HAT, batch: int, context: int,
                          capacity: int | None = None) -> dict:
  """Caches for `backbone_step`: `context` words below the gate, `capacity` kept above."""
  if not isinstance(model, GatedHAT):
    return {"lower": empty_caches(model.backbone, batch, context),
            "upper": [], "deleted_B": jnp.zeros((batch,), jnp.int32)}
  return {"lower": empty_caches(model.backbone_lower, batch, context),
          "upper": empty_caches(model.backbone_upper, batch, capacity or context),
          "deleted_B": jnp.zeros((batch,), jnp.int32)}


def kv_entries(caches: dict) -> int:
  """K/V entries held across all backbone layers (each is one key and one value)."""
  return int(sum(int(jnp.sum(c["len_B"])) for c in caches["lower"] + caches["upper"]))
