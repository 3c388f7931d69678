"""Cached, device-resident sampler of the merge HAT (learned chunks over the byte stream).

Each tick takes one symbol of every row's stream (`[S]`, then the prompt's bytes, then
its own samples) through the causal byte encoder (KV cache over bytes). The boundary
gate decides there and then whether a chunk ends, with the rule of the full forward pass
(`merge_hat.chunk_boundaries`: `[S]`, p > 0.5, or a chunk of max_chunk_bytes), so the
decisions are identical. At a chunk end the backbone advances one chunk for that row
(KV cache over chunks) and its guide vector replaces the previous one; the decoder's
cache restarts there, since its attention stays within the span since the chunk end.
The decoder then predicts the next byte. Prompt bytes are fed as forced symbols, so a
prompt costs one tick per byte and needs no separate prefill pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hat.config import merge_capacity
from hat.data import layout
from hat.generate import rules
from hat.generate.device import (CHUNK_STEPS, DECODING, DONE, FULL, DeviceSampler,
                                 cond_entries, embed, kept_context, project, reset_length,
                                 where_rows)
from hat.generate.hat_sampler import dec_table
from hat.generate.sampling import sample_on_device, split_keys
from hat.models import gates
from hat.models.layers import write_kv
from hat.text.codec import S_ID
from hat.text.tokenizers import ByteTokenizer


class MergeSampler(DeviceSampler):
  """Cached merge-HAT sampler: online chunk boundaries, batched, decoding on the device."""

  def __init__(self, model, cfg, tokenizer=None, *, context_bytes: int | None = None,
               overflow: str = "slide", chunk_steps: int = CHUNK_STEPS):
    self.tok = tokenizer or ByteTokenizer()
    self.context = context_bytes or cfg.data.max_tokens  # [S] + bytes
    self.chunks = merge_capacity(cfg.model.gate.merge, self.context)
    self.max_chunk = model.max_chunk
    self.banned_1xV = np.asarray(rules.token_banned(self.tok, model.head.shape[-1], np))
    super().__init__(model, cfg, chunk_steps=chunk_steps, overflow=overflow)

  def _full_message(self) -> str:
    return (f"generation needs more than the context of {self.context} bytes "
            f"({self.chunks} chunks); use overflow='slide'")

  def _init_state(self, batch: int) -> dict:
    m, cd = self.model, self.model.compute_dtype
    zeros = lambda: jnp.zeros((batch,), jnp.int32)
    return {"enc": m.encoder.init_cache(batch, self.context, cd),
            "bb": m.backbone.init_cache(batch, self.chunks, cd),
            "dec": m.decoder.init_cache(batch, self.max_chunk + 1, cd),
            "guide_Bxd": jnp.zeros((batch, m.cfg.decoder.d_model), cd),
            "stream_BxP": jnp.zeros((batch, self.context), jnp.int32),
            "plen_B": zeros(), "t_B": zeros(), "run_B": zeros(), "span_B": zeros(),
            "cur_B": jnp.full((batch,), S_ID, jnp.int32)}

  def _prefill(self, model, st, rows_B, stream_BxP, plen_B):
    """Restarts the rows from `[S]` with their streams as forced symbols."""
    del model
    fresh = {k: jnp.zeros_like(st[k]) for k in ("t_B", "run_B", "span_B")}
    fresh.update(stream_BxP=stream_BxP, plen_B=plen_B,
                 cur_B=jnp.full_like(st["cur_B"], S_ID))
    flat = where_rows(rows_B, fresh, {k: st[k] for k in fresh})
    return {**st, **flat, **{k: reset_length(st[k], rows_B) for k in ("enc", "bb", "dec")}}

  def _tick(self, model, st, temperature, top_k, top_p, max_new):
    """One stream position per decoding row: encoder, gate, backbone at a chunk end, decoder."""
    cd = model.compute_dtype
    status_B, t_B, cur_B = st["status_B"], st["t_B"], st["cur_B"]
    decoding_B = status_B == DECODING
    full_B = decoding_B & ((t_B >= self.context) |
                           (st["bb"]["length_B"] >= self.chunks))
    active_B = decoding_B & ~full_B
    keep_Bx1 = active_B[:, None]
    h_Bx1xd, enc = model.encoder.extend(embed(model.enc_embed[...], cur_B[:, None], cd),
                                        pos_NxT=t_B[:, None], cache=st["enc"],
                                        keep_NxT=keep_Bx1)
    p_B = model.gate(h_Bx1xd)[:, 0]
    bos_B = t_B == 0
    run_B = jnp.where(bos_B, 1, st["run_B"] + 1)
    end_B = active_B & (bos_B | (p_B > 0.5) | (run_B >= self.max_chunk))
    run_B = jnp.where(active_B, jnp.where(end_B, 0, run_B), st["run_B"])

    def chunk_step(guide_Bxd):
      conf_Bx1 = gates.straight_through(p_B[:, None])
      x_Bx1xD = project(h_Bx1xd, model.w_enc[...], cd) * conf_Bx1[..., None].astype(cd)
      hb_Bx1xD, new = model.backbone.step(x_Bx1xD, pos_NxT=st["bb"]["length_B"][:, None],
                                          cache=st["bb"], keep_NxT=end_B[:, None])
      guide_new = project(hb_Bx1xD, model.w_dec[...], cd)[:, 0]
      return jnp.where(end_B[:, None], guide_new.astype(cd), guide_Bxd), new

    any_end = jnp.any(end_B)
    guide_Bxd, new = cond_entries(any_end, chunk_step, lambda g: g, st["guide_Bxd"])
    bb = write_kv(st["bb"], new, any_end)
    span_B = jnp.where(end_B, t_B, st["span_B"])
    dec = dict(st["dec"], length_B=jnp.where(end_B, 0, st["dec"]["length_B"]))
    y_Bx1xd = embed(dec_table(model), cur_B[:, None], cd) + guide_Bxd[:, None]
    hd_Bx1xd, dec = model.decoder.extend(y_Bx1xd, pos_NxT=(t_B - span_B)[:, None],
                                         cache=dec, keep_NxT=keep_Bx1)
    logits_BxV = project(hd_Bx1xd, model.head[...], cd,
                         preferred_element_type=jnp.float32)[:, 0]
    forced_B = t_B + 1 < st["plen_B"]
    sample_B = active_B & ~forced_B
    keys_BxK, use_BxK = split_keys(st["keys_BxK"], sample_B)
    sampled_B = sample_on_device(jnp.where(jnp.asarray(self.banned_1xV), -jnp.inf,
                                           logits_BxV), use_BxK, temperature, top_k, top_p)
    forced_sym_B = jnp.take_along_axis(
        st["stream_BxP"], jnp.minimum(t_B + 1, self.context - 1)[:, None], axis=1)[:, 0]
    sym_B = jnp.where(forced_B, forced_sym_B, sampled_B)
    nout_B = st["nout_B"] + (sample_B & (sym_B < 256))
    done_B = sample_B & ((sym_B == S_ID) | (nout_B >= max_new))
    status_B = jnp.where(done_B, DONE, jnp.where(full_B, FULL, status_B))
    return ({**st, "enc": enc, "bb": bb, "dec": dec, "guide_Bxd": guide_Bxd,
             "run_B": run_B, "span_B": span_B, "t_B": t_B + active_B,
             "cur_B": jnp.where(active_B, sym_B, cur_B), "nout_B": nout_B,
             "status_B": status_B, "keys_BxK": keys_BxK}, sym_B, sample_B)

  def _new_row(self, prompt: bytes) -> dict:
    return {"stream": prompt}

  def _emit(self, row: dict, sym: int) -> bytes:
    if sym < 256:
      row["stream"] += bytes([sym])
      return bytes([sym])
    return b""

  def _refill_arrays(self, rows: list, which: np.ndarray, slide: bool) -> tuple:
    stream = np.zeros((len(rows), self.context), np.int32)
    stream[:, 0] = S_ID
    length = np.ones(len(rows), np.int32)
    for b in np.flatnonzero(which):
      data = rows[b]["stream"]
      kept = kept_context(len(data), self.context, slide)
      if kept < len(data) and self.overflow == "error":
        raise layout.CapacityError(
            f"prompt of {len(data)} bytes + [S] exceeds the context of {self.context} bytes")
      data = data[len(data) - kept:]
      stream[b, 1:len(data) + 1] = np.frombuffer(data, np.uint8)
      length[b] = len(data) + 1
    return stream, length
