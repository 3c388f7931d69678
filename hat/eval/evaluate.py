"""Evaluation of a model on named text sets: bpb, loss, word accuracy.

bpb is the summed NLL over every predicted symbol (the `[W]`/`[S]`/EOS included) divided
by ln 2 times the UTF-8 bytes of the text, so HAT, BPE and byte-level numbers on the same
set are directly comparable.
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hat.cli import UserError
from hat.models.losses import derived_metrics, metrics_from_logits


def make_eval_step(model: nnx.Module) -> Callable[[dict], dict]:
  """A jit-compiled batch -> summed-metrics function (compiled once per batch shape)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, batch):
    return metrics_from_logits(nnx.merge(graphdef, state)(batch)[0], batch)

  return lambda batch: step(state, batch)


def summarize(sums: dict[str, float]) -> dict[str, float]:
  """Summed metrics -> bpb, nll, accuracies, plus the byte and target counts."""
  return {**derived_metrics(sums), "bytes": sums["num_bytes"], "targets": sums["num_targets"]}


def evaluate_batches(step: Callable[[dict], dict], batches: Iterable[dict]) -> dict:
  """Runs `step` over batches, adding the summed metrics on the host at the end."""
  pending = [step({k: jnp.asarray(v) for k, v in b.items()}) for b in batches]
  if not pending:
    raise UserError("evaluation set produced no batches (is it empty?)")
  sums = jax.tree.map(lambda *xs: float(np.sum(xs)), *jax.device_get(pending))
  return summarize(sums)


def evaluate_sets(model: nnx.Module, cfg, tokenizer, sets: Iterable[str],
                  max_batches: int | None = None) -> dict[str, dict]:
  """{name: metrics} for each eval set name (from `data.eval`) or source spec."""
  from hat.data.pipeline import make_eval_iterator

  step = make_eval_step(model)
  return {name: evaluate_batches(step, make_eval_iterator(cfg, name, tokenizer,
                                                          max_batches=max_batches))
          for name in sets}
