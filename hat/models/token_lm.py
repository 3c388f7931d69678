"""Token-level LM (BPE or flat bytes): the same backbone class as HAT's, embedding + head.

Consumes the token layout of `hat.data.batch`: documents packed per sequence, attention
causal within a segment, RoPE at the position within the segment.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hat.config import ModelConfig
from hat.models.layers import TransformerStack, embed_lookup, param, to_dtype
from hat.sharding import constrain


class TokenLM(nnx.Module):
  """Token embedding -> causal TransformerStack -> untied LM head."""

  def __init__(self, cfg: ModelConfig, *, vocab_size: int, row_len: int | None = None,
               rngs: nnx.Rngs):
    del row_len  # token layouts have no rows
    bb, pd = cfg.backbone, to_dtype(cfg.param_dtype)
    self.cfg, self.vocab_size = cfg, vocab_size
    self.compute_dtype = to_dtype(cfg.compute_dtype)
    self.embed = param(rngs, (vocab_size, bb.d_model), ("vocab", "embed"), fan_in=1, dtype=pd)
    self.backbone = TransformerStack(bb, causal=True, attention_impl=cfg.attention_impl,
                                     compute_dtype=cfg.compute_dtype,
                                     param_dtype=cfg.param_dtype, remat=cfg.remat,
                                     scan_layers=cfg.scan_layers, rngs=rngs)
    self.head = param(rngs, (bb.d_model, vocab_size), ("embed", "vocab"), fan_in=bb.d_model,
                      dtype=pd)

  def hidden(self, tokens_BxT: jax.Array, segment_BxT: jax.Array,
             pos_BxT: jax.Array) -> jax.Array:
    """Final-normed backbone states h_BxTxD."""
    x_BxTxD = embed_lookup(self.embed[...], tokens_BxT, self.compute_dtype)
    return self.backbone(x_BxTxD, segment_BxL=segment_BxT, pos_BxL=pos_BxT)

  def logits(self, h_BxTxD: jax.Array) -> jax.Array:
    """LM head in fp32 -> logits_BxTxV."""
    cd = self.compute_dtype
    logits_BxTxV = jnp.einsum("btd,dv->btv", h_BxTxD.astype(cd), self.head[...].astype(cd),
                              preferred_element_type=jnp.float32)
    return constrain(logits_BxTxV, ("batch", "length", "vocab"))

  def __call__(self, batch: dict) -> tuple[jax.Array, dict]:
    """Teacher-forced forward over a token batch -> (fp32 logits_BxTxV, aux = {})."""
    h_BxTxD = self.hidden(batch["tokens_BxT"], batch["segment_BxT"], batch["pos_BxT"])
    return self.logits(h_BxTxD), {}
