"""Train state: model + optimizer as one nnx.State, created already sharded on the mesh.

The state is `nnx.split((model, optimizer))[1]`: key 0 holds the model's parameters,
key 1 the optimizer (`step` and `opt_state`). Every variable carries the `logical_axes`
of its parameter (nnx copies them into the optimizer moments), so one call to
`hat.sharding.state_shardings` shards parameters and moments alike, and `jax.jit(init,
out_shardings=...)` materialises each shard on its own device: no host ever holds the
whole model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from hat.config import TrainConfig
from hat.models import build_model
from hat.sharding import state_shardings
from hat.train.optim import make_optimizer

MODEL, OPTIM = 0, 1  # keys of the two halves of the train state


@dataclasses.dataclass(frozen=True)
class StateSpec:
  """What is static about a train state: its graph, its abstract arrays and shardings."""

  graphdef: Any  # of the (model, optimizer) pair
  model_graphdef: Any  # of the model alone, to merge with state[MODEL]
  abstract: nnx.State  # ShapeDtypeStructs, with shardings
  shardings: Any  # NamedSharding per variable, same tree as `abstract`


def _build(cfg: TrainConfig, vocab_size: int, seed: int) -> tuple[nnx.Module, nnx.Optimizer]:
  model = build_model(cfg, vocab_size=vocab_size, rngs=nnx.Rngs(seed))
  return model, nnx.Optimizer(model, make_optimizer(cfg), wrt=nnx.Param)


def state_spec(cfg: TrainConfig, vocab_size: int, mesh: Mesh) -> StateSpec:
  """Graph, abstract state and shardings, without allocating any parameter."""
  with jax.set_mesh(mesh):
    model, optimizer = nnx.eval_shape(lambda: _build(cfg, vocab_size, cfg.seed))
    model_graphdef = nnx.graphdef(model)
    graphdef, abstract = nnx.split((model, optimizer))
    shardings = state_shardings(abstract, mesh)
  abstract = jax.tree.map(
      lambda v, s: v.replace(jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype,
                                                 sharding=s)),
      abstract, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return StateSpec(graphdef, model_graphdef, abstract, shardings)


def init_state(cfg: TrainConfig, vocab_size: int, mesh: Mesh, spec: StateSpec) -> nnx.State:
  """Fresh parameters and optimizer state, each created directly in its shards."""

  def init():
    return nnx.split(_build(cfg, vocab_size, cfg.seed))[1]

  with jax.set_mesh(mesh):
    return jax.jit(init, out_shardings=spec.shardings)()


def step_of(state: nnx.State) -> jax.Array:
  """The optimizer step counter held in the state."""
  return state[OPTIM]["step"][...]


def model_from_state(spec: StateSpec, state: nnx.State) -> nnx.Module:
  """The nnx model (sharing the state's arrays) for evaluation or sampling."""
  return nnx.merge(spec.model_graphdef, state[MODEL])


def count_parameters(state: nnx.State) -> int:
  """Number of model parameters in a (possibly abstract) state."""
  return sum(int(x.size) for x in jax.tree.leaves(state[MODEL]))
