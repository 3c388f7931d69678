"""Shared test setup: strict numpy rank promotion, tiny model configs, small batches."""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import tempfile

# Tests are sized for CPU; skip probing for accelerators (libtpu alone costs seconds).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for this test session, inherited by the training
# subprocesses: many tests compile the very same tiny train step in fresh processes, and
# compiling dominates their time. A new directory per session keeps every run cold at
# its start, so suite timings stay comparable; set JAX_COMPILATION_CACHE_DIR to share one.
_SESSION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _SESSION_CACHE = tempfile.mkdtemp(prefix="hat-test-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest
from flax import nnx

from hat.config import ModelConfig, TransformerConfig
from hat.models.losses import loss_and_metrics

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_sessionfinish(session, exitstatus):  # pylint: disable=unused-argument
  """Removes this session's compilation cache."""
  if _SESSION_CACHE:
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)

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
