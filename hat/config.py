"""Typed, frozen run configuration.

Config files (`configs/*.py`) build an `ml_collections.ConfigDict` with a `get_config()`.
`from_config_dict` converts it once into the frozen dataclasses below and validates it;
an unknown key, a wrong type or an inconsistent value raises `ConfigError` naming the
dotted key. Everything downstream takes these dataclasses, never the ConfigDict.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import pathlib
import types
import typing
from typing import Any

import ml_collections

from hat.cli import UserError


class ConfigError(UserError, ValueError):
  """A config key is unknown, mistyped or inconsistent; the message names the key."""


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """One transformer stack (backbone, byte encoder or byte decoder)."""

  num_layers: int = 2
  d_model: int = 64
  num_heads: int = 4
  num_kv_heads: int = 4  # < num_heads gives grouped-query attention
  head_dim: int = 16
  mlp_dim: int = 176  # SwiGLU hidden width
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class DeleteGateConfig:
  """MrT5 delete gate in the word backbone (family `hat_delete`).

  A gate after backbone layer `layer` scores every word; training adds the score to
  later layers' attention logits (soft deletion), inference drops the K/V of words
  scoring below k/2 (hard deletion, at most `capacity` kept words per sequence).
  """

  layer: int = 1  # the gate sits after this many backbone layers (0 = on the word inputs)
  k: float = -30.0  # gate range (k, 0); a word is deleted when G < k/2
  bias_init: float = 1.0  # initial gate bias (G = k*sigmoid(-(w.h + b)))
  target_ratio: float = 0.5  # target deletion ratio delta
  # alpha may go negative (the regulariser then rewards keeping words). MrT5 clamps
  # alpha at 0, but a deleted word gets no language-model gradient (nobody attends to
  # it), so a clamped controller cannot undo an overshoot; see hat/models/gates.
  two_sided: bool = True
  # The gate reads stop_gradient(h), so its regulariser cannot reshape the word states
  # below it (with gradient, every word is deleted within ~10 steps at the tiny config:
  # the lower layers shift all scores at once).
  detach_input: bool = True
  # The gate's own parameters train with plain SGD at lr = sgd_lr / d_model, so alpha's
  # size sets how hard the regulariser pulls (AdamW moves each parameter by ~lr whatever
  # alpha is, which makes the controller bang-bang). 0 = train with AdamW.
  sgd_lr: float = 0.04
  capacity: int = 0  # kept words per sequence; 0 = (1-delta)*max_units*1.25, set at validation


@dataclasses.dataclass(frozen=True)
class MergeGateConfig:
  """Learned byte chunks instead of words (family `hat_merge`, no splitter).

  A causal byte encoder and a boundary gate cut the byte stream into chunks that become
  the backbone's positions (at most `capacity` per sequence).
  """

  target_bytes_per_chunk: float = 5.0  # target mean chunk length in bytes
  max_chunk_bytes: int = 31  # a chunk is cut after this many bytes (online too)
  ratio_loss_weight: float = 0.03  # controller=ratio: fixed loss weight
  capacity: int = 0  # chunks per sequence; 0 = 1.25*max_tokens/target, set at validation


@dataclasses.dataclass(frozen=True)
class GateConfig:
  """Dynamic gates (MrT5-style): `kind` picks the gate, its own section configures it."""

  kind: str = "none"  # none | delete | merge
  controller: str = "pi"  # pi (MrT5 PI controller on alpha) | ratio (H-Net ratio loss; merge)
  kp: float = 0.5  # PI controller gains
  ki: float = 1e-5
  delete: DeleteGateConfig = DeleteGateConfig()
  merge: MergeGateConfig = MergeGateConfig()


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Which model, its stacks and its numerics."""

  kind: str = "hat"  # hat | bpe | byte
  backbone: TransformerConfig = TransformerConfig()
  encoder: TransformerConfig = TransformerConfig(num_layers=1, d_model=32, num_heads=2,
                                                 num_kv_heads=2, head_dim=16, mlp_dim=88)
  decoder: TransformerConfig = TransformerConfig(num_layers=1, d_model=32, num_heads=2,
                                                 num_kv_heads=2, head_dim=16, mlp_dim=88)
  vocab_size: int = 0  # bpe only; 0 = take it from the tokenizer
  tie_byte_embeddings: bool = False  # HAT: share encoder and decoder byte tables
  compute_dtype: str = "float32"  # float32 | bfloat16
  param_dtype: str = "float32"
  # auto: cudnn on GPU, splash on TPU, xla on CPU; a choice that cannot serve a call
  # (dtype, head_dim, an additive bias) runs xla for it, with one logged line.
  attention_impl: str = "auto"  # auto | xla | cudnn | splash
  remat: str = "none"  # none | full | dots
  scan_layers: bool = True
  gate: GateConfig = GateConfig()


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where text comes from and how it is laid out into static-shape batches.

  Sources are strings (see `hat.data.sources`): `builtin`, `text:<path>`,
  `tfds:<name>[:<split>]`; a mixture is `spec=weight,spec=weight`.
  """

  train: str = "builtin"
  eval: str = ""  # name=spec,name=spec ; empty = the train source's validation split
  doc_mode: str = "blank_line"  # file | blank_line | line : how text files become documents
  validation_fraction: float = 0.02
  splitter: str = "whitespace"  # whitespace | unicode
  max_word_bytes: int = 31
  window_bytes: int = 512  # byte budget per training sequence (paper: 16,384)
  max_units: int = 160  # HAT: backbone positions per sequence (start/end units included)
  row_len: int = 64  # HAT: byte slots per packed row (units never straddle rows)
  num_rows: int = 10  # HAT: packed rows per sequence
  max_tokens: int = 192  # BPE / byte LM: token positions per sequence
  overflow: str = "carry"  # carry | error : what a window that exceeds capacity does
  tokenizer: str = ""  # BPE: path to a SentencePiece model
  batch_size: int = 8  # global batch, sequences
  seed: int = 0
  num_workers: int = 0  # grain worker processes; 0 = in-process
  cache_dir: str = ""  # built corpora; empty = $HAT_CACHE or ~/.cache/hat


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with warmup + cosine decay; defaults are the paper's recipe."""

  lr: float = 0.0  # 0 = paper rule 3e-4 * 32 / backbone heads
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  warmup_steps: int = 500
  final_lr_fraction: float = 0.1
  grad_clip: float = 1.0
  grad_accum: int = 1
  z_loss: float = 0.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The whole run."""

  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  steps: int = 1000
  log_every: int = 10
  eval_every: int = 200
  eval_batches: int = 8
  ckpt_every: int = 500  # 0 = save only at the end (and on SIGTERM)
  keep_checkpoints: int = 3
  seed: int = 0
  mesh: str = "data=-1,fsdp=1,tensor=1"
  init_from: str = ""
  reset_optimizer: bool = True
  sample_prompt: str = "The "
  sample_bytes: int = 120
  # Every process reads the whole global batch stream and keeps its own slice: the data
  # order no longer depends on the process count (exact multi-process tests, resuming
  # on another process count), at process_count times the host-side data work.
  global_data_stream: bool = False


_CHOICES = {
    "model.kind": ("hat", "bpe", "byte"),
    "model.compute_dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.attention_impl": ("auto", "xla", "cudnn", "splash"),
    "model.remat": ("none", "full", "dots"),
    "data.doc_mode": ("file", "blank_line", "line"),
    "data.splitter": ("whitespace", "unicode"),
    "data.overflow": ("carry", "error"),
    "model.gate.kind": ("none", "delete", "merge"),
    "model.gate.controller": ("pi", "ratio"),
}


def _convert(cls: type, value: Any, path: str) -> Any:
  """Recursively builds dataclass `cls` from a mapping, naming any bad key."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if dataclasses.is_dataclass(value):
    value = dataclasses.asdict(value)
  if not isinstance(value, dict):
    raise ConfigError(f"{path or 'config'}: expected a mapping, got {value!r}")
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(value) - set(fields))
  if unknown:
    where = ", ".join(f"{path}.{k}" if path else k for k in unknown)
    raise ConfigError(f"unknown config key(s): {where}; valid keys here: {sorted(fields)}")
  kwargs = {}
  for name, raw in value.items():
    key = f"{path}.{name}" if path else name
    hint = hints[name]
    if dataclasses.is_dataclass(hint):
      kwargs[name] = _convert(hint, raw, key)
      continue
    kwargs[name] = _coerce(hint, raw, key)
  return cls(**kwargs)


def _coerce(hint: Any, raw: Any, key: str) -> Any:
  if hint is bool:
    if isinstance(raw, bool):
      return raw
    raise ConfigError(f"{key}: expected a bool, got {raw!r}")
  if hint is int:
    if isinstance(raw, bool) or not isinstance(raw, int):
      raise ConfigError(f"{key}: expected an int, got {raw!r}")
    return raw
  if hint is float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
      raise ConfigError(f"{key}: expected a number, got {raw!r}")
    return float(raw)
  if hint is str:
    if not isinstance(raw, str):
      raise ConfigError(f"{key}: expected a string, got {raw!r}")
    return raw
  if typing.get_origin(hint) in (types.UnionType, typing.Union):
    return raw
  return raw


def _check(cond: bool, key: str, msg: str) -> None:
  if not cond:
    raise ConfigError(f"{key}: {msg}")


def _validate_stack(t: TransformerConfig, key: str) -> None:
  for name in ("num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "mlp_dim"):
    _check(getattr(t, name) > 0, f"{key}.{name}", "must be positive")
  _check(t.num_heads % t.num_kv_heads == 0, f"{key}.num_kv_heads",
         f"must divide num_heads={t.num_heads}, got {t.num_kv_heads}")
  _check(t.head_dim % 2 == 0, f"{key}.head_dim", "must be even for rotary embeddings")


def delete_capacity(g: DeleteGateConfig, max_units: int) -> int:
  """Kept words per sequence: the config's, else (1-delta)*W*1.25 rounded up to 8."""
  if g.capacity:
    return g.capacity
  return min(max_units, int(math.ceil((1.0 - g.target_ratio) * max_units * 1.25 / 8)) * 8)


def merge_capacity(g: MergeGateConfig, positions: int) -> int:
  """Chunks per sequence: the config's, else 1.25*T/target rounded up to 8."""
  if g.capacity:
    return g.capacity
  return min(positions, int(math.ceil(1.25 * positions / g.target_bytes_per_chunk / 8)) * 8)


def _validate_gate(cfg: TrainConfig, gate: str) -> TrainConfig:
  """Checks the section of the family's gate; resolves its derived capacity."""
  g, bb, d = cfg.model.gate, cfg.model.backbone, cfg.data
  _check(g.kp >= 0 and g.ki >= 0, "model.gate.kp", "controller gains must be >= 0")
  if gate == "delete":
    dg = g.delete
    _check(dg.k < 0, "model.gate.delete.k", f"must be negative, got {dg.k}")
    _check(0 <= dg.layer < bb.num_layers, "model.gate.delete.layer",
           f"must be in [0, model.backbone.num_layers={bb.num_layers}), got {dg.layer}")
    _check(0.0 <= dg.target_ratio < 1.0, "model.gate.delete.target_ratio", "must be in [0, 1)")
    _check(g.controller == "pi", "model.gate.controller", "the delete gate uses 'pi'")
    _check(dg.sgd_lr >= 0, "model.gate.delete.sgd_lr", f"must be >= 0, got {dg.sgd_lr}")
    _check(dg.capacity >= 0, "model.gate.delete.capacity", "must be >= 0 (0 = derived)")
    dg = dataclasses.replace(dg, capacity=delete_capacity(dg, d.max_units))
    g = dataclasses.replace(g, delete=dg)
  if gate == "merge":
    mg = g.merge
    _check(mg.target_bytes_per_chunk >= 1.0, "model.gate.merge.target_bytes_per_chunk",
           "must be >= 1")
    _check(mg.max_chunk_bytes >= 2, "model.gate.merge.max_chunk_bytes", "must be >= 2")
    _check(mg.ratio_loss_weight >= 0, "model.gate.merge.ratio_loss_weight", "must be >= 0")
    _check(mg.capacity >= 0, "model.gate.merge.capacity", "must be >= 0 (0 = derived)")
    mg = dataclasses.replace(mg, capacity=merge_capacity(mg, d.max_tokens))
    g = dataclasses.replace(g, merge=mg)
  return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, gate=g))


def _validate_layout(cfg: TrainConfig, family) -> None:
  """Checks the stacks and data capacities that the family's layout uses."""
  m, d = cfg.model, cfg.data
  if family.hierarchical:
    _validate_stack(m.encoder, "model.encoder")
    _validate_stack(m.decoder, "model.decoder")
    if m.tie_byte_embeddings:
      _check(m.encoder.d_model == m.decoder.d_model, "model.tie_byte_embeddings",
             "needs model.encoder.d_model == model.decoder.d_model")
  if family.words:
    _check(d.max_word_bytes >= 4, "data.max_word_bytes",
           "must be >= 4 so that any UTF-8 character fits in one piece")
    _check(d.row_len >= d.max_word_bytes + 1, "data.row_len",
           f"must be >= max_word_bytes + 1 = {d.max_word_bytes + 1} so any word fits a row")
    _check(d.max_units >= 3, "data.max_units", "must be >= 3")
    _check(d.num_rows >= 2 or d.row_len >= d.max_word_bytes + 2, "data.num_rows",
           "one row must hold a START unit and the longest word: use >= 2 rows or "
           "row_len >= max_word_bytes + 2")
  else:
    _check(d.max_tokens >= 2, "data.max_tokens", "must be >= 2")
  if family.tokenizer == "bpe":
    _check(bool(d.tokenizer) or m.vocab_size > 0, "data.tokenizer",
           "a BPE model needs a SentencePiece model path (tools/train_tokenizer.py)")


def validate(cfg: TrainConfig) -> TrainConfig:
  """Checks choices and cross-field consistency; returns cfg with derived settings resolved.

  Raises ConfigError naming the key. Derived settings (gate capacities) are filled in
  here, once, so every later reader sees the values the run really uses.
  """
  from hat.family import family_of  # pylint: disable=g-import-not-at-top  (family needs config)

  flat = {"model": cfg.model, "data": cfg.data, "model.gate": cfg.model.gate}
  for key, choices in _CHOICES.items():
    section, name = key.rsplit(".", 1)
    value = getattr(flat[section], name)
    _check(value in choices, key, f"must be one of {choices}, got {value!r}")
  m, d = cfg.model, cfg.data
  _validate_stack(m.backbone, "model.backbone")
  family = family_of(cfg)
  cfg = _validate_gate(cfg, family.gate)
  _validate_layout(cfg, family)
  _check(d.window_bytes >= d.max_word_bytes, "data.window_bytes",
         f"must be >= data.max_word_bytes={d.max_word_bytes} so every word fits a window")
  _check(d.batch_size >= 1, "data.batch_size", "must be positive")
  _check(0.0 <= d.validation_fraction < 1.0, "data.validation_fraction", "must be in [0, 1)")
  _check(cfg.steps >= 1, "steps", "must be positive")
  _check(cfg.log_every >= 1, "log_every", "must be positive")
  for key in ("eval_every", "ckpt_every"):
    _check(getattr(cfg, key) >= 0, key, "must be >= 0 (0 = only at the end)")
  _check(cfg.optim.grad_accum >= 1, "optim.grad_accum", "must be >= 1")
  _check(0.0 <= cfg.optim.final_lr_fraction <= 1.0, "optim.final_lr_fraction", "must be in [0, 1]")
  _validate_locations(cfg)
  return cfg


def _validate_locations(cfg: TrainConfig) -> None:
  """Remote locations (gs://) need their client library; say which extra, naming the key."""
  from hat import storage  # pylint: disable=g-import-not-at-top

  d = cfg.data
  where = {"init_from": cfg.init_from, "data.cache_dir": d.cache_dir,
           "data.tokenizer": d.tokenizer}
  for key in ("train", "eval"):
    for part in getattr(d, key).split(","):
      _, sep, rest = part.strip().partition("text:")
      if sep:
        where[f"data.{key}"] = rest.rpartition("=")[0] if "=" in rest else rest
  for key, value in where.items():
    try:
      storage.require_backend(value)
    except storage.StorageError as e:
      raise ConfigError(f"{key}: {e}") from None


def from_config_dict(cd: ml_collections.ConfigDict | dict) -> TrainConfig:
  """Converts and validates a ConfigDict (or nested dict) into a frozen TrainConfig."""
  return validate(_convert(TrainConfig, cd, ""))


def default_config_dict() -> ml_collections.ConfigDict:
  """A ConfigDict holding every key with its default; config files start from it."""
  return ml_collections.ConfigDict(dataclasses.asdict(TrainConfig()))


def load_config_file(path: str | pathlib.Path) -> ml_collections.ConfigDict:
  """Imports `path` and returns its `get_config()`."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConfigError(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location(f"_hat_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} has no get_config()")
  return module.get_config()


def apply_overrides(cd: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
  """Applies `key.path=value` strings (the `--config.` prefix optional), typed by the default."""
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.removeprefix("--").removeprefix("config.")
    node, parts = cd, key.split(".")
    for p in parts[:-1]:
      if p not in node:
        raise ConfigError(f"unknown config key: {key}")
      node = node[p]
    if parts[-1] not in node:
      raise ConfigError(f"unknown config key: {key}")
    old = node[parts[-1]]
    node[parts[-1]] = _parse_like(old, raw, key)
  return cd


def _parse_like(old: Any, raw: str, key: str) -> Any:
  try:
    if isinstance(old, bool):
      if raw.lower() not in ("true", "false", "1", "0"):
        raise ValueError(raw)
      return raw.lower() in ("true", "1")
    if isinstance(old, int):
      return int(raw)
    if isinstance(old, float):
      return float(raw)
  except ValueError:
    raise ConfigError(f"{key}: cannot parse {raw!r} as {type(old).__name__}") from None
  return raw


def to_dict(cfg: TrainConfig) -> dict:
  """Plain nested dict, for JSON in run directories."""
  return dataclasses.asdict(cfg)


def resolve(config_path: str | None, overrides: list[str]) -> TrainConfig:
  """Config file (or defaults) + overrides -> validated TrainConfig."""
  cd = load_config_file(config_path) if config_path else default_config_dict()
  return from_config_dict(apply_overrides(cd, overrides))
