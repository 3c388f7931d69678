"""Shared test setup: strict numpy rank promotion, tiny model configs, small batches."""

from __future__ import annotations

import dataclasses
import functools
import os

# Tests are sized for CPU; skip probing for accelerators (libtpu alone costs seconds).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest
from flax import nnx

from hat.config import ModelConfig, TransformerConfig
from hat.models.losses import loss_and_metrics

jax.config.update("jax_numpy_rank_promotion", "raise")

TINY_STACK = TransformerConfig(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                               head_dim=8, mlp_dim=64)
TINY_BYTE_STACK = TransformerConfig(num_layers=1, d_model=16, num_heads=2, num_kv_heads=1,
                                    head_dim=8, mlp_dim=32)


def tiny_model_config(kind: str = "hat", **overrides) -> ModelConfig:
  """A 2-layer backbone and 1-layer byte stacks with GQA, fp32, for fast tests.

  Layers are unscanned by default: on CPU a scanned stack's gradient compiles ~3x slower,
  and scan == loop is tested once; tests of the production path ask for scan_layers=True.
  """
  cfg = ModelConfig(kind=kind, backbone=TINY_STACK, encoder=TINY_BYTE_STACK,
                    decoder=TINY_BYTE_STACK, scan_layers=False)
  return dataclasses.replace(cfg, **overrides)


def rngs(seed: int = 0) -> nnx.Rngs:
  """Rngs on the 'rbg' PRNG: its init compiles in a fraction of threefry's time on CPU."""
  return nnx.Rngs(params=jax.random.key(seed, impl="rbg"))


@pytest.fixture
def tiny_config():
  """Factory fixture for `tiny_model_config`."""
  return tiny_model_config


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, batch):
  return nnx.merge(graphdef, state)(batch)[0]


@functools.partial(jax.jit, static_argnums=(0, 3))
def _loss(graphdef, state, batch, z_loss):
  return loss_and_metrics(nnx.merge(graphdef, state), batch, z_loss=z_loss)


def forward(model, batch):
  """Jitted model(batch) logits: tests compile once instead of dispatching op by op."""
  return _forward(*nnx.split(model), batch)


def loss(model, batch, z_loss: float = 0.0):
  """Jitted loss_and_metrics(model, batch)."""
  return _loss(*nnx.split(model), batch, z_loss)
