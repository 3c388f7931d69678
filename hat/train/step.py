"""The jitted train and eval steps: pure functions of (state, batch) with explicit shardings.

Gradient accumulation scans over `optim.grad_accum` micro-batches inside one step. Each
micro-batch's loss is weighted by its share of the whole batch's targets, so the
accumulated gradient is exactly that of the mean loss over the full batch, whatever the
split. Metrics are sums (see `hat.models.losses`) plus `loss`, `grad_norm` and `lr`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from hat.config import TrainConfig
from hat.models import loss_and_metrics
from hat.sharding import batch_sharding, constrain
from hat.train.optim import lr_schedule
from hat.train.state import MODEL, StateSpec


def batch_shardings(mesh: Mesh, batch_like: dict) -> dict:
  """Leading-axis data-parallel sharding for every array of a batch dict."""
  return {k: batch_sharding(mesh, len(v.shape)) for k, v in batch_like.items()}


def _num_targets(batch: dict) -> jax.Array:
  mask = batch["target_mask_BxS"] if "target_mask_BxS" in batch else batch["target_mask_BxT"]
  return jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)


def _micro_batches(batch: dict, accum: int) -> dict:
  """(B, ...) -> (A, B/A, ...), micro-batch a = rows a, a+A, ... so every shard contributes."""

  def split(x):
    x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
    return constrain(x, (None, "batch") + (None,) * (x.ndim - 2))

  return jax.tree.map(split, batch)


class _TrainStep:
  """The jitted step with `gate_alpha` optional (0.0: no gate, or a fixed-weight gate)."""

  def __init__(self, jitted: Callable):
    self.jitted = jitted

  def __call__(self, state, batch, loss_scale, gate_alpha=None):
    alpha = np.float32(0.0) if gate_alpha is None else np.float32(gate_alpha)
    return self.jitted(state, batch, loss_scale, alpha)

  def lower(self, state, batch, loss_scale, gate_alpha=None):
    """AOT lowering; alpha is a traced fp32 scalar either way."""
    alpha = jax.ShapeDtypeStruct((), jnp.float32) if gate_alpha is None else gate_alpha
    return self.jitted.lower(state, batch, loss_scale, alpha)


def make_train_step(cfg: TrainConfig, spec: StateSpec, mesh: Mesh,
                    batch_like: dict) -> Callable:
  """jit((state, batch, loss_scale[, gate_alpha]) -> (state, metrics)), the state donated.

  `loss_scale` multiplies the loss (1.0 normally); a NaN there is the fault-injection
  hook that tests the non-finite guard. `gate_alpha` weights a gated model's regulariser;
  it is traced, so the host-side controller changes it every step without recompiling.
  """
  accum, z_loss = cfg.optim.grad_accum, cfg.optim.z_loss
  schedule = lr_schedule(cfg)

  def train_step(state, batch, loss_scale, gate_alpha):
    model, optimizer = nnx.merge(spec.graphdef, state)
    model_def, params = nnx.split(model, nnx.Param)
    total_targets = _num_targets(batch)

    def loss_fn(params, micro):
      loss, metrics = loss_and_metrics(nnx.merge(model_def, params), micro, z_loss=z_loss,
                                       gate_alpha=gate_alpha)
      # Re-weight the micro-batch mean to its share of the full batch's mean.
      share = jnp.maximum(metrics["num_targets"], 1.0) / total_targets
      return loss * share * loss_scale, metrics

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
      (loss, metrics), grads = grad_fn(params, batch)
    else:
      def body(carry, micro):
        (loss, metrics), grads = grad_fn(params, micro)
        return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

      zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
      first = jax.tree.map(lambda x: x[0], _micro_batches(batch, accum))
      zero_metrics = jax.tree.map(jnp.zeros_like,
                                  jax.eval_shape(lambda p, m: loss_fn(p, m)[1], params, first))
      (loss, metrics, grads), _ = jax.lax.scan(
          body, (jnp.zeros((), jnp.float32), zero_metrics, zero_grads),
          _micro_batches(batch, accum))
      grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                   lr=schedule(optimizer.step[...]))
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), metrics

  in_batch = batch_shardings(mesh, batch_like)
  return _TrainStep(jax.jit(train_step, in_shardings=(spec.shardings, in_batch, None, None),
                            out_shardings=(spec.shardings, None), donate_argnums=(0,)))


def make_eval_step(cfg: TrainConfig, spec: StateSpec, mesh: Mesh, batch_like: dict) -> Callable:
  """jit((model_state, batch) -> summed metrics) for evaluation (no z-loss)."""

  def eval_step(model_state, batch):
    _, metrics = loss_and_metrics(nnx.merge(spec.model_graphdef, model_state), batch)
    return metrics

  in_batch = batch_shardings(mesh, batch_like)
  return jax.jit(eval_step, in_shardings=(spec.shardings[MODEL], in_batch), out_shardings=None)

