"""Analytic training FLOPs per module, FLOPs per byte, compute matching and MFU.

Conventions: a matmul of (m x k) by (k x n) costs 2·m·n·k; training costs 3x the
forward pass (backward = 2x forward); embedding gathers, norms, RoPE and softmax are
not counted (they are not matmuls and are a rounding error at scale). Attention per
layer costs 4·Lq·Lk·heads·head_dim (scores and weighted sum); causal attention is
counted as half of the square, bidirectional attention as the whole square. A gate
(delete or merge) costs one dot per position.

Model vs hardware FLOPs: the counts above are *model* FLOPs (MFU's numerator).
`hardware_train_flops_per_sequence` adds what the device really runs on top: the masked
half of causal squares that XLA's dense attention computes (flash kernels skip most of
it), flash backward's recomputed scores, and the forward work that `model.remat`
recomputes in the backward pass; its ratio to peak is HFU. docs/scale.md reconciles
both with XLA's compiled counts module by module (`tools/flops_check.py`).

Two views:
- *padded*: what the accelerator executes for the static batch shapes in `DataConfig`
  (W units, S = num_rows·row_len slots with C x C attention per row, T tokens). This is
  the numerator of MFU.
- *real*: the work a perfectly packed layout would do for a full window of
  `window_bytes` bytes of a corpus with the given bytes/word and bytes/token
  (HAT byte modules run on bytes + one marker slot per word). This is what
  compute-matching compares, independent of padding choices.
"""

from __future__ import annotations

import dataclasses

from hat.config import TrainConfig, TransformerConfig
from hat.family import family_of
from hat.params import default_vocab_size, stack_matmul_params

TRAIN_MULTIPLIER = 3  # forward + backward

# Dense bf16 peak FLOP/s per chip, keyed on `jax.Device.device_kind`.
PEAK_FLOPS: dict[str, float] = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5": 459e12,  # v5p reports itself as "TPU v5"
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
}
# Fallbacks for device kinds spelled differently by other drivers (substring match).
_PEAK_BY_SUBSTRING = (("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one device, or None when unknown (e.g. CPU)."""
  if device_kind in PEAK_FLOPS:
    return PEAK_FLOPS[device_kind]
  for key, value in _PEAK_BY_SUBSTRING:
    if key in device_kind:
      return value
  return None


def mfu(flops_per_s_per_device: float, device_kind: str) -> float | None:
  """Model FLOPs utilisation in [0, 1], or None when the device's peak is unknown."""
  peak = peak_flops(device_kind)
  return None if peak is None else flops_per_s_per_device / peak


def hfu(flops_per_s_per_device: float, device_kind: str) -> float | None:
  """Hardware FLOPs utilisation (remat recompute and masked attention counted), or None."""
  return mfu(flops_per_s_per_device, device_kind)


def _target_bytes_per_chunk(cfg: TrainConfig) -> float:
  return cfg.model.gate.merge.target_bytes_per_chunk


def _stack_matmul_fwd(t: TransformerConfig, positions: float) -> float:
  return 2.0 * positions * stack_matmul_params(t)


def _stack_attn_fwd(t: TransformerConfig, attn_pairs: float) -> float:
  return 4.0 * attn_pairs * t.num_heads * t.head_dim * t.num_layers


def _stack_fwd(t: TransformerConfig, positions: float, attn_pairs: float) -> float:
  """Forward FLOPs of a stack over `positions` with `attn_pairs` query-key pairs per layer."""
  return _stack_matmul_fwd(t, positions) + _stack_attn_fwd(t, attn_pairs)


def _hat_fwd(cfg: TrainConfig, units: float, slots: float, enc_pairs: float,
             dec_pairs: float, unit_pairs: float) -> dict[str, float]:
  m, fam = cfg.model, family_of(cfg)
  enc, dec, bb = m.encoder, m.decoder, m.backbone
  out = {
      "encoder": _stack_fwd(enc, slots, enc_pairs),
      "w_e": 2.0 * units * enc.d_model * bb.d_model,
      "backbone": _stack_fwd(bb, units, unit_pairs),
      "w_d": 2.0 * units * bb.d_model * dec.d_model,
      "decoder": _stack_fwd(dec, slots, dec_pairs),
      "head": 2.0 * slots * dec.d_model * default_vocab_size(m),
  }
  # One dot per scored position: words on the backbone width, bytes on the encoder's.
  if fam.gate == "delete":
    out["gate"] = 2.0 * units * bb.d_model
  elif fam.gate == "merge":
    out["gate"] = 2.0 * slots * enc.d_model
  return out


def _token_fwd(cfg: TrainConfig, tokens: float, vocab_size: int | None) -> dict[str, float]:
  m = cfg.model
  v = default_vocab_size(m, vocab_size)
  return {
      "backbone": _stack_fwd(m.backbone, tokens, tokens * tokens / 2),
      "head": 2.0 * tokens * m.backbone.d_model * v,
  }


def _train(fwd: dict[str, float]) -> dict[str, float]:
  out = {k: TRAIN_MULTIPLIER * v for k, v in fwd.items()}
  out["total"] = sum(out.values())
  return out


def _merge_capacity(cfg: TrainConfig) -> int:
  from hat.config import merge_capacity  # pylint: disable=g-import-not-at-top

  return merge_capacity(cfg.model.gate.merge, cfg.data.max_tokens)


def _padded_layout(cfg: TrainConfig) -> dict[str, tuple[float, float, bool]]:
  """{stack: (positions, attention length, causal)} of one padded sequence, as executed.

  The attention length is that of one attended block: a packed row for HAT's byte
  stacks (B·R blocks of C), the whole sequence otherwise.
  """
  d, fam = cfg.data, family_of(cfg)
  if fam.gate == "merge":
    t, units = d.max_tokens, _merge_capacity(cfg)
    return {"encoder": (t, t, True), "backbone": (units, units, True),
            "decoder": (t, t, True)}
  if fam.words:
    slots, units = d.num_rows * d.row_len, d.max_units
    return {"encoder": (slots, d.row_len, False), "backbone": (units, units, True),
            "decoder": (slots, d.row_len, True)}
  return {"backbone": (d.max_tokens, d.max_tokens, True)}


def _pairs(positions: float, length: float, causal: bool) -> float:
  """Query-key pairs per layer counted as model FLOPs: causal squares count half."""
  return positions * length / (2 if causal else 1)


def train_flops_per_sequence(cfg: TrainConfig, vocab_size: int | None = None) -> dict[str, float]:
  """Training model FLOPs of one padded sequence per module (plus "total"), as executed."""
  lay = _padded_layout(cfg)
  if not family_of(cfg).hierarchical:
    return _train(_token_fwd(cfg, cfg.data.max_tokens, vocab_size))
  # Merge byte stacks run causally over the whole stream: span masks skip no work.
  fwd = _hat_fwd(cfg, units=lay["backbone"][0], slots=lay["encoder"][0],
                 enc_pairs=_pairs(*lay["encoder"]), dec_pairs=_pairs(*lay["decoder"]),
                 unit_pairs=_pairs(*lay["backbone"]))
  return _train(fwd)


FLASH_BLOCK = 128  # query/key tile of cuDNN / splash kernels; tiles above the diagonal skipped


def _executed_pairs(positions: float, length: float, causal: bool, impl: str) -> float:
  """Query-key pairs per layer the device computes: dense squares, or flash tiles."""
  if not causal or impl == "xla":
    return positions * length  # XLA's dense attention computes the masked half too
  block = min(FLASH_BLOCK, length)
  return positions * (length + block) / 2  # tiles on and below the diagonal


def hardware_train_flops_per_sequence(cfg: TrainConfig, vocab_size: int | None = None, *,
                                      impl: str = "xla") -> dict[str, float]:
  """Training FLOPs the device executes for one padded sequence, per module and "total".

  Model FLOPs plus: the masked half of causal squares (`impl="xla"`; "cudnn"/"splash"
  skip tiles above the diagonal); flash backward recomputing the scores (5 matmuls
  instead of 4); and `model.remat`'s recompute in the backward pass: "dots" recomputes
  the attention matmuls (they have batch dimensions, so the policy does not save them),
  "full" the whole forward pass of every block. Heads and projections are never remat'd.
  """
  out = dict(train_flops_per_sequence(cfg, vocab_size))
  del out["total"]
  flash = impl in ("cudnn", "splash")
  for name, (positions, length, causal) in _padded_layout(cfg).items():
    t = getattr(cfg.model, name)
    model_attn = _stack_attn_fwd(t, _pairs(positions, length, causal))
    attn = _stack_attn_fwd(t, _executed_pairs(positions, length, causal, impl))
    out[name] += TRAIN_MULTIPLIER * (attn - model_attn) + (0.5 * attn if flash else 0.0)
    if cfg.model.remat == "dots":
      out[name] += attn
    elif cfg.model.remat == "full":
      out[name] += attn + _stack_matmul_fwd(t, positions)
  out["total"] = sum(out.values())
  return out


def executed_attention_impl(cfg: TrainConfig, backend: str | None = None) -> str:
  """The attention implementation the backbone runs on this backend ("auto" resolved)."""
  from hat.models.layers import select_attention_impl  # local: jax only when asked

  positions, length, _ = _padded_layout(cfg)["backbone"]
  bb = cfg.model.backbone
  return select_attention_impl(cfg.model.attention_impl, dtype=cfg.model.compute_dtype,
                               head_dim=bb.head_dim, length=int(length),
                               dense_bias=family_of(cfg).gate == "delete", backend=backend)


def hardware_train_flops_per_step(cfg: TrainConfig, vocab_size: int | None = None, *,
                                  impl: str = "xla") -> float:
  """Executed training FLOPs of one optimizer step over the global batch (HFU numerator)."""
  return hardware_train_flops_per_sequence(cfg, vocab_size, impl=impl)["total"] * \
      cfg.data.batch_size


def train_flops_per_step(cfg: TrainConfig, vocab_size: int | None = None) -> float:
  """Training FLOPs of one optimizer step over the global batch (padded shapes)."""
  return train_flops_per_sequence(cfg, vocab_size)["total"] * cfg.data.batch_size


def positions_per_sequence(cfg: TrainConfig) -> dict[str, int]:
  """Padded positions each module runs on: units / slots for HAT, tokens otherwise."""
  lay, fam = _padded_layout(cfg), family_of(cfg)
  if not fam.hierarchical:
    return {"backbone": cfg.data.max_tokens, "head": cfg.data.max_tokens}
  units, slots = int(lay["backbone"][0]), int(lay["encoder"][0])
  out = {"encoder": slots, "w_e": units, "backbone": units, "w_d": units,
         "decoder": slots, "head": slots}
  if fam.gate != "none":
    out["gate"] = units if fam.gate == "delete" else slots
  return out


def train_flops_per_position(cfg: TrainConfig, vocab_size: int | None = None) -> dict[str, float]:
  """Padded training FLOPs per module divided by that module's padded positions."""
  seq = train_flops_per_sequence(cfg, vocab_size)
  return {k: seq[k] / n for k, n in positions_per_sequence(cfg).items()}


def real_train_flops_per_window(cfg: TrainConfig, bytes_per_word: float,
                                bytes_per_token: float,
                                vocab_size: int | None = None) -> dict[str, float]:
  """Training FLOPs per module for a full window with perfect packing (no padding)."""
  n_bytes, fam = float(cfg.data.window_bytes), family_of(cfg)
  if fam.gate == "merge":
    # Chunks of the target length stand in for words; byte stacks see one stream.
    chunk = _target_bytes_per_chunk(cfg)
    chunks = n_bytes / chunk
    fwd = _hat_fwd(cfg, units=chunks, slots=n_bytes, enc_pairs=n_bytes * n_bytes / 2,
                   dec_pairs=chunks * chunk * chunk / 2, unit_pairs=chunks * chunks / 2)
  elif fam.words:
    words = n_bytes / bytes_per_word
    unit_len = bytes_per_word + 1  # marker slot + bytes; the decoder's p_i + bytes
    fwd = _hat_fwd(cfg, units=words, slots=n_bytes + words,
                   enc_pairs=words * unit_len * unit_len,
                   dec_pairs=words * unit_len * unit_len / 2, unit_pairs=words * words / 2)
  else:
    per_token = 1.0 if fam.tokenizer == "byte" else bytes_per_token
    fwd = _token_fwd(cfg, n_bytes / per_token, vocab_size)
  return _train(fwd)


def flops_per_byte(cfg: TrainConfig, bytes_per_word: float = 5.97,
                   bytes_per_token: float = 4.12,
                   vocab_size: int | None = None) -> dict[str, float]:
  """Training FLOPs per real byte, per module ("total" = real work) and "padded_total".

  "padded_total" divides the executed (padded) FLOPs of one sequence by a full window's
  bytes, so padded_total / total is the cost of the layout's headroom.
  """
  real = real_train_flops_per_window(cfg, bytes_per_word, bytes_per_token, vocab_size)
  n_bytes = float(cfg.data.window_bytes)
  out = {k: v / n_bytes for k, v in real.items()}
  out["padded_total"] = train_flops_per_sequence(cfg, vocab_size)["total"] / n_bytes
  return out


@dataclasses.dataclass(frozen=True)
class Match:
  """A HAT backbone proposed to match a BPE model's FLOPs per byte."""

  backbone: TransformerConfig
  hat_flops_per_byte: float
  bpe_flops_per_byte: float

  @property
  def ratio(self) -> float:
    """HAT / BPE real training FLOPs per byte."""
    return self.hat_flops_per_byte / self.bpe_flops_per_byte


def backbone_shape(num_layers: int, d_model: int, like: TransformerConfig, head_dim: int = 128,
                   mlp_ratio: float = 8 / 3, mlp_multiple: int = 128) -> TransformerConfig:
  """A Llama-style backbone of the given depth/width, MHA, SwiGLU width ~ mlp_ratio·D."""
  heads = d_model // head_dim
  mlp = int(round(mlp_ratio * d_model / mlp_multiple)) * mlp_multiple
  return dataclasses.replace(like, num_layers=num_layers, d_model=d_model, num_heads=heads,
                             num_kv_heads=heads, head_dim=head_dim, mlp_dim=mlp)


def match_hat_to_bpe(bpe_cfg: TrainConfig, bytes_per_word: float = 5.97,
                     bytes_per_token: float = 4.12, hat_cfg: TrainConfig | None = None, *,
                     vocab_size: int | None = None, layers: range = range(4, 97),
                     head_dim: int = 128, mlp_ratio: float = 8 / 3,
                     aspect: float = 128.0, tolerance: float = 0.05) -> Match:
  """Proposes a HAT backbone with the BPE model's real FLOPs per byte.

  Encoder and decoder stay as in `hat_cfg` (default: `bpe_cfg` turned into a HAT with
  its own encoder/decoder settings). For each depth the width (a multiple of
  `head_dim`) closest in FLOPs is found; among depths within `tolerance`, the one whose
  d_model / num_layers is nearest `aspect` wins (the paper's HAT sizes all have 128).
  """
  target = flops_per_byte(bpe_cfg, bytes_per_word, bytes_per_token, vocab_size)["total"]
  base = hat_cfg if hat_cfg is not None else dataclasses.replace(
      bpe_cfg, model=dataclasses.replace(bpe_cfg.model, kind="hat"))
  if not family_of(base).words:
    raise ValueError(f"hat_cfg must be a word-level HAT config, got the "
                     f"{family_of(base).name} family")
  base = dataclasses.replace(base, data=dataclasses.replace(
      base.data, window_bytes=bpe_cfg.data.window_bytes))

  def cost(n_layers: int, width: int) -> tuple[float, TransformerConfig]:
    bb = backbone_shape(n_layers, width, base.model.backbone, head_dim, mlp_ratio)
    cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, backbone=bb))
    return flops_per_byte(cfg, bytes_per_word, bytes_per_token)["total"], bb

  best = None
  for n_layers in layers:
    # FLOPs grow monotonically with width: find the first width at or above target.
    width, (flops, bb) = head_dim, cost(n_layers, head_dim)
    while flops < target and width < 64 * 1024:
      prev = (flops, bb)
      width += head_dim
      flops, bb = cost(n_layers, width)
      if flops >= target and abs(prev[0] - target) < abs(flops - target):
        flops, bb = prev
    err = abs(flops / target - 1)
    if err > tolerance:
      continue
    key = (abs(bb.d_model / n_layers - aspect) / aspect, err)
    if best is None or key < best[0]:
      best = (key, Match(bb, flops, target))
  if best is None:
    raise ValueError(f"no HAT backbone within {tolerance:.0%} of {target:.3g} FLOPs/byte")
  return best[1]
