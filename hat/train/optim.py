"""The optimiser: AdamW with linear warmup, cosine decay and global-norm clipping.

Defaults are the paper's recipe (AdamW β=(0.9, 0.95), ε=1e-8, weight decay 0.1, 500
warmup steps, cosine decay to 10% of the peak, peak lr = 3e-4·32/H for H backbone heads).

Weight decay applies to the matmul weights only. Norm scales are excluded because
decaying them pulls every activation towards zero rather than regularising a mapping.
Embedding tables are excluded because decoupled decay shrinks every row each step while
a row only gets gradient when its symbol occurs: rare BPE tokens of a 64k vocabulary
would be pulled to zero while HAT's 259 byte rows (all frequent) would not, which would
bias exactly the comparison this project makes. Output heads are ordinary matmuls and
are decayed.

A delete gate's own parameters (`gate.*`) can train with plain SGD instead
(`model.gate.delete.sgd_lr`): its regulariser weight alpha is set by a controller, and only an
optimiser whose step scales with the gradient lets alpha's size set the pull. AdamW
normalises each coordinate, so any net push moves the gate by ~lr per step and the
controller degenerates to bang-bang (measured: the deletion ratio swings 0 <-> 1).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from hat.config import TrainConfig


def peak_lr(cfg: TrainConfig) -> float:
  """`optim.lr`, or the paper's rule 3e-4·32/H (H = backbone heads) when it is 0."""
  if cfg.optim.lr > 0:
    return cfg.optim.lr
  return 3e-4 * 32 / cfg.model.backbone.num_heads


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then cosine decay to `final_lr_fraction` at `steps`."""
  o, peak = cfg.optim, peak_lr(cfg)
  warmup = min(o.warmup_steps, cfg.steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(cfg.steps, warmup + 1), end_value=peak * o.final_lr_fraction)


def _key_name(entry: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def decays(path: tuple) -> bool:
  """Whether the parameter at a pytree key path gets weight decay (see module docstring)."""
  names = [_key_name(k) for k in path]
  return not any(n.endswith("embed") or "norm" in n for n in names)


def decay_mask(params: Any) -> Any:
  """Pytree of bools matching `params`: True where weight decay applies."""
  return jax.tree_util.tree_map_with_path(lambda path, _: decays(path), params)


def is_gate_param(path: tuple) -> bool:
  """Whether the parameter at a key path belongs to a model's gate module (`gate.*`)."""
  return bool(path) and _key_name(path[0]) == "gate"


def gate_sgd_lr(cfg: TrainConfig) -> float:
  """Plain-SGD learning rate of the delete gate's parameters; 0 when they use AdamW."""
  from hat.family import family_of  # pylint: disable=g-import-not-at-top

  sgd_lr = cfg.model.gate.delete.sgd_lr
  if family_of(cfg).gate != "delete" or sgd_lr <= 0:
    return 0.0
  # The score w·RMSNorm(h) sums d_model unit-scale terms, so an SGD step on w moves it by
  # ~lr·d_model·grad: dividing by d_model keeps the gate's speed independent of width.
  return sgd_lr / cfg.model.backbone.d_model


def with_gate_sgd(base: optax.GradientTransformation,
                  lr: float) -> optax.GradientTransformation:
  """`base` for every parameter except the gate's, which get `-lr · gradient`.

  The gate's slots in `base`'s state are kept (a few hundred floats) so that the state
  has one layout whichever way a parameter is trained. The gate's gradient is not
  clipped: its step must follow alpha, not the global norm of the rest of the model.
  """

  def update(grads, state, params=None):
    updates, state = base.update(grads, state, params)
    updates = jax.tree_util.tree_map_with_path(
        lambda path, u, g: -lr * g if is_gate_param(path) else u, updates, grads)
    return updates, state

  return optax.GradientTransformation(base.init, update)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """Clip by global norm, then AdamW on the schedule with the decay mask (gate: SGD)."""
  o = cfg.optim
  parts = []
  if o.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(o.grad_clip))
  parts.append(optax.adamw(lr_schedule(cfg), b1=o.b1, b2=o.b2, eps=o.eps,
                           weight_decay=o.weight_decay, mask=decay_mask))
  tx = optax.chain(*parts)
  lr = gate_sgd_lr(cfg)
  return with_gate_sgd(tx, lr) if lr > 0 else tx
