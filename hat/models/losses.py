"""Cross-entropy loss and summable metrics for HAT and token LMs.

Every metric is a SUM over the batch (never a mean), so it can be added across
micro-batches, devices and eval batches, and divided once at the end.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp


def _targets(batch: dict) -> tuple[jax.Array, jax.Array]:
  if "targets_BxS" in batch:
    return batch["targets_BxS"], batch["target_mask_BxS"]
  return batch["targets_BxT"], batch["target_mask_BxT"]


def word_accuracy_sums(correct_BxS: jax.Array, mask_BxS: jax.Array, slot_unit_BxS: jax.Array,
                       num_units: int) -> tuple[jax.Array, jax.Array]:
  """(words_correct, num_words): a unit counts if it has targets and all are the argmax."""
  batch = slot_unit_BxS.shape[0]
  counted_BxS = mask_BxS & (slot_unit_BxS >= 0)
  # Flat (b, unit) ids; uncounted slots go to an extra overflow bucket that is dropped.
  flat_BxS = jnp.arange(batch)[:, None] * num_units + jnp.maximum(slot_unit_BxS, 0)
  flat_BxS = jnp.where(counted_BxS, flat_BxS, batch * num_units)
  n = batch * num_units + 1
  targets_N = jax.ops.segment_sum(counted_BxS.astype(jnp.int32).ravel(), flat_BxS.ravel(), n)
  wrong_N = jax.ops.segment_sum((counted_BxS & ~correct_BxS).astype(jnp.int32).ravel(),
                                flat_BxS.ravel(), n)
  has_N = targets_N[:-1] > 0
  words_correct = jnp.sum(has_N & (wrong_N[:-1] == 0)).astype(jnp.float32)
  return words_correct, jnp.sum(has_N).astype(jnp.float32)


def metrics_from_logits(logits_BxLxV: jax.Array, batch: dict) -> dict[str, jax.Array]:
  """Summed metrics from fp32 logits and the batch's targets and target mask."""
  targets_BxL, mask_BxL = _targets(batch)
  mask_BxL = mask_BxL.astype(jnp.bool_)
  logits_BxLxV = logits_BxLxV.astype(jnp.float32)
  lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  nll_BxL = lse_BxL - target_logit_BxL
  m_BxL = mask_BxL.astype(jnp.float32)
  correct_BxL = (jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL) & mask_BxL
  metrics = {
      "nll_sum": jnp.sum(nll_BxL * m_BxL),
      "num_targets": jnp.sum(m_BxL),
      "num_bytes": jnp.sum(batch["num_bytes_B"]).astype(jnp.float32),
      "correct_targets": jnp.sum(correct_BxL).astype(jnp.float32),
      "z_loss_sum": jnp.sum(lse_BxL * lse_BxL * m_BxL),
  }
  if "slot_unit_BxS" in batch:
    num_units = batch["unit_segment_BxW"].shape[1]
    metrics["words_correct"], metrics["num_words"] = word_accuracy_sums(
        correct_BxL, mask_BxL, batch["slot_unit_BxS"], num_units)
  return metrics


def loss_and_metrics(model: Callable[[dict], jax.Array], batch: dict, *,
                     z_loss: float = 0.0,
                     gate_alpha: Any = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean NLL over counted targets (+ z_loss * mean logsumexp^2) and summed metrics.

  Every model returns `(logits, aux)`. A gated model's aux holds `gate_loss`, added as
  `gate_alpha * gate_loss` (a traced scalar set by the host-side controller), an
  optional fixed-weight `gate_fixed_loss`, and summed gate statistics for the metrics.
  """
  logits, aux = model(batch)
  metrics = metrics_from_logits(logits, batch)
  denom = jnp.maximum(metrics["num_targets"], 1.0)
  loss = metrics["nll_sum"] / denom
  if z_loss:
    loss = loss + z_loss * metrics["z_loss_sum"] / denom
  if "gate_loss" in aux:
    loss = loss + gate_alpha * aux["gate_loss"] + aux.get("gate_fixed_loss", 0.0)
    metrics.update({k: v for k, v in aux.items() if k not in ("gate_loss", "gate_fixed_loss")})
  return loss, metrics


def bits_per_byte(nll_sum: Any, num_bytes: Any) -> Any:
  """Total NLL in nats over (ln 2 * UTF-8 bytes): the HAT-vs-BPE comparison metric."""
  return nll_sum / (math.log(2.0) * num_bytes)


def derived_metrics(sums: dict[str, float], prefix: str = "") -> dict[str, float]:
  """bpb, per-target loss (nll) and accuracies from summed metrics, keys prefixed."""
  out = {}
  if sums.get("num_bytes"):
    out["bpb"] = float(bits_per_byte(sums["nll_sum"], sums["num_bytes"]))
  if sums.get("num_targets"):
    out["nll"] = sums["nll_sum"] / sums["num_targets"]
    out["target_acc"] = sums["correct_targets"] / sums["num_targets"]
  if sums.get("num_words"):
    out["word_acc"] = sums["words_correct"] / sums["num_words"]
  if sums.get("gate_units"):  # gated models: the controlled ratio and its side effects
    out["gate_ratio"] = sums["gate_deleted"] / sums["gate_units"]
    for k in ("kv_overflow", "chunk_overflow"):
      if k in sums:
        out[k] = sums[k]
  if sums.get("chunks"):
    out["bytes_per_chunk"] = sums["num_bytes"] / sums["chunks"]
  return {prefix + k: float(v) for k, v in out.items()}
