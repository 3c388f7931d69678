"""Dynamic gates (MrT5 delete gate, byte boundary gate), the PI controller, compaction.

Delete gate (MrT5): `G = k·sigmoid(-(w·RMSNorm(h) + b))` in (k, 0). In training G is
added to the attention logits of later layers on the key axis (soft deletion); at
inference a unit with `G < k/2` is dropped from later layers' K/V (hard deletion).
The regulariser `alpha·mean(G)` over real units pushes G towards k; `PIController`
sets alpha on the host each step so that the deleted fraction tracks a target.

Boundary gate (merge): `p_t = sigmoid(w·RMSNorm(h_t) + b)` on a causal byte state; a
chunk ends at byte t when `p_t > 0.5`. It reads only h_t, so generation makes the
same decision online.

Static shapes: `compact_indices` puts the selected positions first, in order, and cuts
to a fixed capacity M; selected positions beyond M are the overflow, always counted.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from hat.models.layers import RMSNorm, param, to_dtype


class DeleteGate(nnx.Module):
  """MrT5 delete gate: h_BxLxD -> G_BxL in (k, 0), fp32."""

  def __init__(self, d_model: int, *, k: float, bias_init: float, norm_eps: float = 1e-5,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    pd = to_dtype(param_dtype)
    self.k = k
    self.norm = RMSNorm(d_model, eps=norm_eps, param_dtype=param_dtype)
    self.w = param(rngs, (d_model,), ("embed",), fan_in=d_model, dtype=pd)
    self.b = nnx.Param(jnp.full((), bias_init, pd), logical_axes=())

  def __call__(self, h_BxLxD: jax.Array) -> jax.Array:
    n_BxLxD = self.norm(h_BxLxD).astype(jnp.float32)
    score_BxL = jnp.einsum("bld,d->bl", n_BxLxD, self.w[...].astype(jnp.float32))
    return self.k * jax.nn.sigmoid(-(score_BxL + self.b[...].astype(jnp.float32)))


class BoundaryGate(nnx.Module):
  """Chunk-end probability from a causal byte state: h_BxTxd -> p_BxT in (0, 1), fp32."""

  def __init__(self, d_model: int, *, norm_eps: float = 1e-5, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    pd = to_dtype(param_dtype)
    self.norm = RMSNorm(d_model, eps=norm_eps, param_dtype=param_dtype)
    self.w = param(rngs, (d_model,), ("embed",), fan_in=d_model, dtype=pd)
    self.b = nnx.Param(jnp.zeros((), pd), logical_axes=())

  def __call__(self, h_BxTxd: jax.Array) -> jax.Array:
    n_BxTxd = self.norm(h_BxTxd).astype(jnp.float32)
    score_BxT = jnp.einsum("btd,d->bt", n_BxTxd, self.w[...].astype(jnp.float32))
    return jax.nn.sigmoid(score_BxT + self.b[...].astype(jnp.float32))


def gate_params(d_model: int) -> int:
  """Parameters of one DeleteGate or BoundaryGate: norm scale, w and the scalar bias."""
  return 2 * d_model + 1


def deleted(g_BxL: jax.Array, k: float) -> jax.Array:
  """Hard deletion decision: G < k/2."""
  return g_BxL < 0.5 * k


def compact_indices(select_BxL: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array,
                                                                   jax.Array]:
  """Selected positions first (in order), cut to `capacity`.

  Returns (index_BxM, valid_BxM, overflow_B): gather indices (padding points at 0),
  which of the M slots hold a selected position, and how many selected positions did
  not fit (they are dropped; the caller counts and reports them).
  """
  length = select_BxL.shape[1]
  key_BxL = jnp.arange(length)[None, :] + jnp.where(select_BxL, 0, length)
  order_BxL = jnp.argsort(key_BxL, axis=1)
  if capacity > length:  # more slots than positions: pad with invalid slots
    order_BxL = jnp.pad(order_BxL, ((0, 0), (0, capacity - length)))
  index_BxM = order_BxL[:, :capacity]
  count_B = jnp.sum(select_BxL, axis=1)
  valid_BxM = jnp.arange(capacity)[None, :] < count_B[:, None]
  index_BxM = jnp.where(valid_BxM, index_BxM, 0)
  overflow_B = jnp.maximum(count_B - capacity, 0)
  return index_BxM, valid_BxM, overflow_B


def slot_of(select_BxL: jax.Array) -> jax.Array:
  """For each position, its slot after compaction (cumsum - 1); -1 before the first."""
  return jnp.cumsum(select_BxL.astype(jnp.int32), axis=1) - 1


def ratio_loss(p_BxT: jax.Array, boundary_BxT: jax.Array, real_BxT: jax.Array,
               target_len: float) -> jax.Array:
  """H-Net ratio loss N/(N-1)·((N-1)·F·G + (1-F)·(1-G)); minimal at F = G = 1/N."""
  n = float(target_len)
  denom = jnp.maximum(jnp.sum(real_BxT), 1.0)
  f = jnp.sum(jnp.where(real_BxT, boundary_BxT, 0).astype(jnp.float32)) / denom
  g = jnp.sum(jnp.where(real_BxT, p_BxT, 0.0)) / denom
  return n / (n - 1.0) * ((n - 1.0) * f * g + (1.0 - f) * (1.0 - g)) if n > 1 else g * 0


def straight_through(p: jax.Array) -> jax.Array:
  """1 in the forward pass, d/dp = 1 in the backward pass (confidence-scaled gradient)."""
  return 1.0 + p - jax.lax.stop_gradient(p)


@dataclasses.dataclass
class PIController:
  """MrT5's PI controller for the regulariser weight alpha (runs on the host).

  `update(measured)`: err = target - measured; p <- 0.9·p + 0.1·kp·err;
  i <- i + ki·err; alpha = max(floor, p + i). State is three floats (checkpointed).

  MrT5's floor is 0. `floor=None` lets alpha go negative, which the delete gate needs:
  a deleted word (G near k) receives almost no language-model gradient, because no
  later word attends to it, so with alpha clamped at 0 nothing pulls an over-deleted
  model back (measured at the tiny config: the ratio overshoots to 1.0 and stays there).
  """

  target: float
  kp: float = 0.5
  ki: float = 1e-5
  floor: float | None = 0.0
  p: float = 0.0
  i: float = 0.0
  alpha: float = 0.0

  def update(self, measured: float) -> float:
    """One controller step from the measured ratio; returns the new alpha."""
    err = self.target - float(measured)
    self.p = 0.9 * self.p + 0.1 * self.kp * err
    self.i = self.i + self.ki * err
    self.alpha = self.p + self.i if self.floor is None else max(self.floor, self.p + self.i)
    return self.alpha

  def state_dict(self) -> dict[str, float]:
    """The controller state, for checkpoints."""
    return {"p": self.p, "i": self.i, "alpha": self.alpha}

  def load_state_dict(self, state: dict[str, Any]) -> None:
    """Restores what `state_dict` returned."""
    self.p, self.i, self.alpha = (float(state[k]) for k in ("p", "i", "alpha"))


def delete_controller(gate_cfg) -> PIController:
  """The delete gate's PI controller towards the target deletion ratio."""
  d = gate_cfg.delete
  return PIController(target=d.target_ratio, kp=gate_cfg.kp, ki=gate_cfg.ki,
                      floor=None if d.two_sided else 0.0)


def merge_controller(gate_cfg) -> PIController | None:
  """The merge gate's PI controller (None with the fixed-weight ratio loss).

  The "deleted" bytes are those that end no chunk, so the target ratio is 1 - 1/L for a
  target chunk length L.
  """
  if gate_cfg.controller != "pi":
    return None
  target = 1.0 - 1.0 / gate_cfg.merge.target_bytes_per_chunk
  return PIController(target=target, kp=gate_cfg.kp, ki=gate_cfg.ki, floor=0.0)


def measured_ratio(metrics: dict[str, Any]) -> float | None:
  """The controlled ratio from summed step metrics (gate_deleted / gate_units)."""
  units = float(metrics.get("gate_units", 0.0))
  if units <= 0:
    return None
  return float(metrics["gate_deleted"]) / units
