"""Cached, device-resident sampler of the token LMs (BPE and flat bytes).

One KV cache over BOS + tokens per row. Each tick feeds every decoding row's last token
through the backbone (one new cache entry, written in place) and samples the next; bytes
per token come from a table, so max-new-bytes is counted on the device. A prompt is
prefilled in blocks up to its length except its last token, which the first tick feeds.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from hat.data import layout
from hat.generate import rules
from hat.generate.device import (CHUNK_STEPS, DECODING, DONE, FULL, DeviceSampler, embed,
                                 kept_context, padded, prefill_blocks, project, reset_length,
                                 where_rows)
from hat.generate.sampling import sample_on_device, split_keys


class TokenSampler(DeviceSampler):
  """Cached sampler for a BPE or byte-level LM, batched, decoding on the device."""

  def __init__(self, model, cfg, tokenizer, *, max_tokens: int | None = None,
               overflow: str = "slide", chunk_steps: int = CHUNK_STEPS, prefill_block: int = 32):
    self.tok = tokenizer
    self.capacity = max_tokens or cfg.data.max_tokens
    self.prefill_block = min(prefill_block, self.capacity)
    vocab = model.head.shape[-1]
    self.token_bytes_V = np.array([len(tokenizer.decode([i])) if i < tokenizer.vocab_size
                                   else 0 for i in range(vocab)], np.int32)
    self.banned_1xV = np.asarray(rules.token_banned(tokenizer, vocab, np))
    super().__init__(model, cfg, chunk_steps=chunk_steps, overflow=overflow)

  def _full_message(self) -> str:
    return (f"generation needs more than the KV cache of {self.capacity} positions; "
            "use overflow='slide'")

  def _init_state(self, batch: int) -> dict:
    return {"cache": self.model.backbone.init_cache(batch, self.capacity,
                                                    self.model.compute_dtype),
            "tok_B": jnp.zeros((batch,), jnp.int32)}

  def _prefill(self, model, st, rows_B, tokens_BxP, length_B):
    """All context tokens but the last into the cache, in blocks up to the longest
    context; the last is fed by the first tick."""
    def step(pos_BxT, cache, tokens_BxT):
      x_BxTxD = embed(model.embed[...], tokens_BxT, model.compute_dtype)
      _, cache = model.backbone.extend(
          x_BxTxD, pos_NxT=pos_BxT, cache=cache,
          keep_NxT=rows_B[:, None] & (pos_BxT < length_B[:, None] - 1))
      return cache

    cache = prefill_blocks(step, reset_length(st["cache"], rows_B),
                           jnp.where(rows_B, length_B - 1, 0), self.prefill_block, tokens_BxP)
    last_B = jnp.take_along_axis(tokens_BxP, (length_B - 1)[:, None], axis=1)[:, 0]
    return {**st, "cache": cache, "tok_B": where_rows(rows_B, last_B, st["tok_B"])}

  def _tick(self, model, st, temperature, top_k, top_p, max_new):
    """Feeds one token per decoding row and samples the next."""
    cd = model.compute_dtype
    status_B, cache = st["status_B"], st["cache"]
    length_B = cache["length_B"]
    decoding_B = status_B == DECODING
    full_B = decoding_B & (length_B >= self.capacity)
    active_B = decoding_B & ~full_B
    x_Bx1xD = embed(model.embed[...], st["tok_B"][:, None], cd)
    h_Bx1xD, cache = model.backbone.extend(x_Bx1xD, pos_NxT=length_B[:, None], cache=cache,
                                           keep_NxT=active_B[:, None])
    logits_BxV = project(h_Bx1xD, model.head[...], cd, preferred_element_type=jnp.float32)[:, 0]
    keys_BxK, use_BxK = split_keys(st["keys_BxK"], active_B)
    sym_B = sample_on_device(jnp.where(jnp.asarray(self.banned_1xV), -jnp.inf, logits_BxV),
                             use_BxK, temperature, top_k, top_p)
    nout_B = st["nout_B"] + jnp.where(active_B, jnp.asarray(self.token_bytes_V)[sym_B], 0)
    done_B = active_B & ((sym_B == self.tok.eos_id) | (nout_B >= max_new))
    status_B = jnp.where(done_B, DONE, jnp.where(full_B, FULL, status_B))
    return ({**st, "cache": cache, "tok_B": jnp.where(active_B, sym_B, st["tok_B"]),
             "nout_B": nout_B, "status_B": status_B, "keys_BxK": keys_BxK},
            sym_B, active_B)

  def _new_row(self, prompt: bytes) -> dict:
    return {"tokens": list(self.tok.encode(prompt))}

  def _emit(self, row: dict, sym: int) -> bytes:
    if sym == self.tok.eos_id:
      return b""
    row["tokens"].append(sym)
    return self.tok.decode([sym])

  def _refill_arrays(self, rows: list, which: np.ndarray, slide: bool) -> tuple:
    tokens = np.full((len(rows), padded(self.capacity, self.prefill_block)), self.tok.pad_id,
                     np.int32)
    length = np.ones(len(rows), np.int32)
    tokens[:, 0] = self.tok.bos_id
    for b in np.flatnonzero(which):
      history = rows[b]["tokens"]
      kept = kept_context(len(history), self.capacity, slide)
      if kept < len(history) and self.overflow == "error":
        raise layout.CapacityError(
            f"prompt of {len(history)} tokens + BOS exceeds the KV cache of "
            f"{self.capacity} positions")
      ctx = [self.tok.bos_id] + history[len(history) - kept:]
      tokens[b, :len(ctx)] = ctx
      length[b] = len(ctx)
    return tokens, length
