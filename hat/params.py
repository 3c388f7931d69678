"""Analytic parameter counts per module, from a `ModelConfig` alone.

The counts follow the model as built in `hat.models`: Llama-style pre-RMSNorm blocks
with bias-free q/k/v/o projections (k and v sized by `num_kv_heads * head_dim`), a
three-matrix SwiGLU (gate, up, down), two RMSNorm scales per block and a final RMSNorm
per stack. A HAT adds byte embedding tables for encoder and decoder (one shared table
when tied), W_E (d_enc x D), W_D (D x d_dec) and a byte head (d_dec x BYTE_VOCAB_SIZE);
a token LM adds a token embedding (V x D) and an untied head (D x V).
Nothing is allocated, so paper-scale configs are counted instantly.
"""

from __future__ import annotations

from hat.config import ModelConfig, TransformerConfig
from hat.family import family_of
from hat.text.codec import BYTE_VOCAB_SIZE


def attention_params(t: TransformerConfig) -> int:
  """Weights of one attention sublayer: q, k, v, o projections, no biases."""
  q = t.d_model * t.num_heads * t.head_dim
  kv = 2 * t.d_model * t.num_kv_heads * t.head_dim
  o = t.num_heads * t.head_dim * t.d_model
  return q + kv + o


def mlp_params(t: TransformerConfig) -> int:
  """Weights of one SwiGLU sublayer: gate and up (D x F) and down (F x D)."""
  return 3 * t.d_model * t.mlp_dim


def layer_params(t: TransformerConfig) -> int:
  """One transformer block: attention, MLP and its two RMSNorm scales."""
  return attention_params(t) + mlp_params(t) + 2 * t.d_model


def stack_params(t: TransformerConfig) -> int:
  """A whole stack: its blocks plus the final RMSNorm."""
  return t.num_layers * layer_params(t) + t.d_model


def stack_matmul_params(t: TransformerConfig) -> int:
  """Weights of a stack that take part in a matmul per position (norms excluded)."""
  return t.num_layers * (attention_params(t) + mlp_params(t))


def default_vocab_size(m: ModelConfig, vocab_size: int | None = None) -> int:
  """Output vocabulary: the byte symbols, else (BPE) `vocab_size` or the config's."""
  if family_of(m).tokenizer != "bpe":
    return BYTE_VOCAB_SIZE
  v = vocab_size if vocab_size else m.vocab_size
  if not v:
    raise ValueError("a BPE model's parameter count needs vocab_size (config says 0)")
  return v


def count_params(m: ModelConfig, vocab_size: int | None = None) -> dict[str, int]:
  """Parameters per module (and "total"), matching the model built from `m` exactly."""
  v = default_vocab_size(m, vocab_size)
  family = family_of(m)
  out: dict[str, int] = {}
  if family.hierarchical:
    enc, dec, bb = m.encoder, m.decoder, m.backbone
    out["encoder_embed"] = v * enc.d_model
    # A tied table is stored once (in the encoder) and reused by the decoder.
    out["decoder_embed"] = 0 if m.tie_byte_embeddings else v * dec.d_model
    out["encoder"] = stack_params(enc)
    out["w_e"] = enc.d_model * bb.d_model
    out["backbone"] = stack_params(bb)
    out["w_d"] = bb.d_model * dec.d_model
    out["decoder"] = stack_params(dec)
    out["head"] = dec.d_model * v
    # Dynamic gates: RMSNorm scale, w and a scalar bias on the backbone (delete) or
    # byte-encoder (merge) width.
    gate_width = {"delete": bb.d_model, "merge": enc.d_model}.get(family.gate)
    if gate_width:
      out["gate"] = 2 * gate_width + 1
  else:
    bb = m.backbone
    out["embed"] = v * bb.d_model
    out["backbone"] = stack_params(bb)
    out["head"] = bb.d_model * v
  out["total"] = sum(out.values())
  return out


def paper_groups(m: ModelConfig, vocab_size: int | None = None) -> dict[str, int]:
  """Counts grouped as the paper's Table 2 reports them.

  HAT: "encoder" = byte embedding + encoder stack + W_E, "decoder" = byte embedding +
  W_D + decoder stack + byte head, "backbone" = the word-level stack. Token LMs:
  "total" including both 64k embedding matrices.
  """
  c = count_params(m, vocab_size)
  if not family_of(m).hierarchical:
    return {"total": c["total"], "non_embedding": c["backbone"]}
  dec_embed = c["decoder_embed"] or c["encoder_embed"]
  return {
      "encoder": c["encoder_embed"] + c["encoder"] + c["w_e"],
      "backbone": c["backbone"] + c.get("gate", 0),
      "decoder": dec_embed + c["w_d"] + c["decoder"] + c["head"],
      "total": c["total"],
  }


def format_count(n: float) -> str:
  """1234567 -> '1.23M'; for logs and tables."""
  for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.3g}{unit}"
  return str(int(n))
