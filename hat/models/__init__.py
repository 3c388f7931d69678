"""Models: HAT (plain, delete-gated, merge-gated) and token LMs on the same backbone class.

Which class a config builds is decided by `hat.family`; `build_model` asks it.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from hat.config import ModelConfig, TrainConfig
from hat.models.gated_hat import GatedHAT
from hat.models.hat_model import HAT
from hat.models.merge_hat import MergeHAT
from hat.models.losses import bits_per_byte, loss_and_metrics
from hat.models.token_lm import TokenLM

__all__ = ["HAT", "GatedHAT", "MergeHAT", "TokenLM", "build_model", "model_vocab_size",
           "loss_and_metrics", "bits_per_byte"]


def model_vocab_size(cfg: TrainConfig | ModelConfig, tokenizer: Any = None) -> int:
  """Output vocabulary of the run's family (259 byte symbols, or the BPE vocabulary)."""
  from hat.family import family_of  # pylint: disable=g-import-not-at-top

  return family_of(cfg).vocab_size(cfg, tokenizer)


def build_model(cfg: TrainConfig | ModelConfig, *, vocab_size: int, rngs: nnx.Rngs,
                row_len: int | None = None) -> nnx.Module:
  """Builds the model of the run's (or model config's) family; HAT needs the row length."""
  from hat.family import family_of  # pylint: disable=g-import-not-at-top

  return family_of(cfg).build_model(cfg, vocab_size, rngs, row_len=row_len)
