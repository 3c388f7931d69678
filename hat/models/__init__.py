"""Models: HAT, and token LMs (BPE, flat bytes) on the same backbone class."""

from __future__ import annotations

from typing import Any

from flax import nnx

from hat.config import ModelConfig
from hat.models.gated_hat import GatedHAT
from hat.models.hat_model import HAT
from hat.models.merge_hat import MergeHAT
from hat.models.losses import bits_per_byte, loss_and_metrics
from hat.models.token_lm import TokenLM
from hat.text.codec import BYTE_VOCAB_SIZE

__all__ = ["HAT", "GatedHAT", "MergeHAT", "TokenLM", "build_model", "model_vocab_size", "loss_and_metrics",
           "bits_per_byte"]


def model_vocab_size(model_cfg: ModelConfig, tokenizer: Any = None) -> int:
  """Output vocabulary: 259 byte symbols for hat/byte; the tokenizer's (or config's) for bpe."""
  if model_cfg.kind in ("hat", "byte"):
    return BYTE_VOCAB_SIZE
  if model_cfg.vocab_size > 0:
    return model_cfg.vocab_size
  if tokenizer is None:
    raise ValueError("model.kind='bpe' needs model.vocab_size > 0 or a tokenizer")
  for name in ("vocab_size", "get_piece_size"):
    size = getattr(tokenizer, name, None)
    if size is not None:
      return int(size() if callable(size) else size)
  return len(tokenizer)


def build_model(model_cfg: ModelConfig, *, vocab_size: int, rngs: nnx.Rngs,
                row_len: int | None = None) -> nnx.Module:
  """Builds the model of `model_cfg.kind`; HAT also needs the packed row length (data.row_len)."""
  if model_cfg.kind == "hat":
    if vocab_size != BYTE_VOCAB_SIZE:
      raise ValueError(f"HAT predicts the {BYTE_VOCAB_SIZE} byte symbols, got vocab_size="
                       f"{vocab_size}")
    if model_cfg.gate.kind == "delete":
      return GatedHAT(model_cfg, row_len=row_len, rngs=rngs)
    if model_cfg.gate.kind == "merge":
      return MergeHAT(model_cfg, rngs=rngs)
    return HAT(model_cfg, row_len=row_len, rngs=rngs)
  if model_cfg.kind in ("bpe", "byte"):
    return TokenLM(model_cfg, vocab_size=vocab_size, rngs=rngs)
  raise ValueError(f"model.kind must be hat|bpe|byte, got {model_cfg.kind!r}")
