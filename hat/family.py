"""The model families, and the one place that decides which family a config is.

    plain HAT     model.kind="hat", gate.kind="none"    words in packed rows
    delete HAT    model.kind="hat", gate.kind="delete"  words; MrT5 gate in the backbone
    merge HAT     model.kind="hat", gate.kind="merge"   byte stream; learned chunks
    BPE LM        model.kind="bpe"                      SentencePiece tokens
    byte LM       model.kind="byte"                     flat bytes

`family_of(cfg)` is the only code that reads `model.kind` and `model.gate.kind`.
Everything else (trainer, data pipeline, eval, generation, AOT, planning, benchmarks)
asks the `Family` it returns: how to build the model, which batch layout and tokenizer
it uses, its abstract batch shapes, its parameter and FLOP counts, its sampler and its
scorer. A capability a family lacks raises `NotSupported` naming the family.

This module imports only the config: the models, layouts and samplers it names are
imported when first asked for, so the data layer can ask it without importing models.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from hat.config import ConfigError, ModelConfig, TrainConfig

BYTE_VOCAB_SIZE = 259  # 256 bytes + [W], [S], [PAD] (hat.text.codec)


class NotSupported(ValueError):
  """A capability that this model family does not have."""


def _load(ref: str) -> Any:
  """'package.module:attr' -> the attribute, imported on first use."""
  module, _, attr = ref.partition(":")
  return getattr(importlib.import_module(module), attr)


@dataclasses.dataclass(frozen=True)
class Family:
  """What is particular to one model family; every field is data, every method asks it.

  layout: "hat_rows" (words packed into rows of byte slots; `hat.data.layout`) or
    "tokens" (one token per position; BPE pieces or bytes).
  tokenizer: None (HAT reads words from the splitter), "byte" or "bpe".
  gate: "none", "delete" or "merge" (which gate controller and optimiser rules apply).
  """

  name: str
  description: str
  model: str  # "module:Class" built as Class(model_cfg, vocab_size=, rngs=)
  layout: str
  tokenizer: str | None
  gate: str
  sampler: str | None  # cached sampler "module:Class"(model, cfg, tokenizer)
  reference_sampler: str | None  # uncached oracle, same interface
  controller: str | None = None  # "module:function"(gate_cfg) -> host-side gate controller
  hierarchical: bool = True  # a byte encoder and decoder around the backbone (HAT variants)

  # ------------------------------------------------------------------ properties

  @property
  def words(self) -> bool:
    """Whether the backbone runs over splitter words (HAT's packed-row layout)."""
    return self.layout == "hat_rows"

  def unsupported(self, what: str) -> NotSupported:
    """The error for a capability this family lacks."""
    return NotSupported(f"{what} is not supported for the {self.name} family "
                        f"({self.description})")

  # ------------------------------------------------------------------ building

  def vocab_size(self, cfg: TrainConfig | ModelConfig, tokenizer: Any = None) -> int:
    """Output vocabulary: the 259 byte symbols, or the BPE tokenizer's (or config's) size."""
    if self.tokenizer != "bpe":
      return BYTE_VOCAB_SIZE
    if _model_cfg(cfg).vocab_size > 0:
      return _model_cfg(cfg).vocab_size
    if tokenizer is None:
      if not isinstance(cfg, TrainConfig) or not cfg.data.tokenizer:
        raise ValueError("a BPE model needs model.vocab_size > 0 or its tokenizer")
      tokenizer = self.load_tokenizer(cfg)
    return int(tokenizer.vocab_size)

  def build_model(self, cfg: TrainConfig | ModelConfig, vocab_size: int, rngs: Any, *,
                  row_len: int | None = None) -> Any:
    """The nnx model of this family (call under `nnx.eval_shape` for shapes only).

    A HAT needs the packed row length: `data.row_len` of a TrainConfig, or `row_len`.
    """
    if isinstance(cfg, TrainConfig):
      row_len = row_len or cfg.data.row_len
    return _load(self.model)(_model_cfg(cfg), vocab_size=vocab_size, row_len=row_len,
                             rngs=rngs)

  def load_tokenizer(self, cfg: TrainConfig, stored: bytes | None = None) -> Any:
    """The tokenizer: from `stored` SentencePiece bytes, else `data.tokenizer`; None for HAT."""
    if self.tokenizer is None:
      return None
    from hat.text import tokenizers  # pylint: disable=g-import-not-at-top

    if self.tokenizer == "byte":
      return tokenizers.ByteTokenizer()
    if stored:
      from hat.text.bpe import BPETokenizer  # pylint: disable=g-import-not-at-top

      return BPETokenizer.from_bytes(stored)
    return tokenizers.load_tokenizer("bpe", cfg.data.tokenizer)

  # ------------------------------------------------------------------ data

  def layout_fn(self, cfg: TrainConfig, tokenizer: Any = None):
    """The window -> sequences function of this family's batch layout."""
    from hat.data import layout  # pylint: disable=g-import-not-at-top

    d = cfg.data
    if self.words:
      return lambda segs: layout.hat_sequences(segs, max_units=d.max_units,
                                               num_rows=d.num_rows, row_len=d.row_len,
                                               overflow=d.overflow)
    tok = tokenizer if tokenizer is not None else self.load_tokenizer(cfg)
    return lambda segs: layout.token_sequences(segs, tok, max_tokens=d.max_tokens,
                                               overflow=d.overflow)

  def batch_shapes(self, cfg: TrainConfig, batch_size: int) -> dict[str, tuple[tuple, str]]:
    """{key: (shape, dtype name)} of one batch, exactly as the pipeline makes it."""
    from hat.data import batch as batch_lib  # pylint: disable=g-import-not-at-top

    d = cfg.data
    if self.words:
      return batch_lib.hat_shapes(batch_size, max_units=d.max_units,
                                  slots=d.num_rows * d.row_len)
    return batch_lib.token_shapes(batch_size, max_tokens=d.max_tokens)

  # ------------------------------------------------------------------ counts

  def param_counts(self, cfg: TrainConfig | ModelConfig, vocab_size: int | None = None):
    """Parameters per module and "total", equal to the built model's."""
    from hat import params  # pylint: disable=g-import-not-at-top

    return params.count_params(_model_cfg(cfg), vocab_size)

  def train_flops(self, cfg: TrainConfig, vocab_size: int | None = None) -> dict[str, float]:
    """Training FLOPs of one padded sequence per module (and "total"), as executed."""
    from hat import flops  # pylint: disable=g-import-not-at-top

    return flops.train_flops_per_sequence(cfg, vocab_size)

  def make_controller(self, cfg: TrainConfig) -> Any:
    """The host-side controller of the gate's regulariser weight alpha, or None."""
    return _load(self.controller)(cfg.model.gate) if self.controller else None

  # ------------------------------------------------------------------ inference

  def make_sampler(self, model: Any, cfg: TrainConfig, tokenizer: Any = None, *,
                   cached: bool = True, **kwargs) -> Any:
    """The cached sampler of this family (or the uncached reference oracle)."""
    ref = self.sampler if cached else self.reference_sampler
    if ref is None:
      raise self.unsupported("cached generation" if cached else "reference generation")
    return _load(ref)(model, cfg, tokenizer, **kwargs)


def _model_cfg(cfg: TrainConfig | ModelConfig) -> ModelConfig:
  return cfg.model if isinstance(cfg, TrainConfig) else cfg


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("hat", "HAT: byte encoder, word backbone, byte decoder",
           model="hat.models.hat_model:HAT", layout="hat_rows", tokenizer=None, gate="none",
           sampler="hat.generate.hat_sampler:HATSampler",
           reference_sampler="hat.generate.reference:ReferenceHATSampler"),
    Family("hat_delete", "HAT with a MrT5 delete gate in the word backbone",
           model="hat.models.gated_hat:GatedHAT", layout="hat_rows", tokenizer=None,
           gate="delete", sampler="hat.generate.hat_sampler:HATSampler",
           reference_sampler="hat.generate.reference:ReferenceHATSampler",
           controller="hat.models.gates:delete_controller"),
    Family("hat_merge", "splitter-free HAT with learned byte chunks",
           model="hat.models.merge_hat:MergeHAT", layout="tokens", tokenizer="byte",
           gate="merge", sampler="hat.generate.merge_sampler:MergeSampler",
           reference_sampler="hat.generate.reference:ReferenceTokenSampler",
           controller="hat.models.gates:merge_controller"),
    Family("bpe", "SentencePiece BPE LM on the same backbone",
           model="hat.models.token_lm:TokenLM", layout="tokens", tokenizer="bpe",
           gate="none", sampler="hat.generate.token_sampler:TokenSampler",
           reference_sampler="hat.generate.reference:ReferenceTokenSampler",
           hierarchical=False),
    Family("byte", "flat byte-level LM on the same backbone",
           model="hat.models.token_lm:TokenLM", layout="tokens", tokenizer="byte",
           gate="none", sampler="hat.generate.token_sampler:TokenSampler",
           reference_sampler="hat.generate.reference:ReferenceTokenSampler",
           hierarchical=False),
)}


def family_name(model_cfg: ModelConfig) -> str:
  """The family of a model config: the one place that reads model.kind and gate.kind."""
  if model_cfg.kind == "hat":
    return {"none": "hat", "delete": "hat_delete", "merge": "hat_merge"}[model_cfg.gate.kind]
  if model_cfg.gate.kind != "none":
    raise ConfigError(f"model.gate.kind: gates need model.kind='hat', got "
                      f"model.kind={model_cfg.kind!r}")
  return model_cfg.kind


def family_of(cfg: TrainConfig | ModelConfig) -> Family:
  """The `Family` of a run (or model) config."""
  return FAMILIES[family_name(_model_cfg(cfg))]
