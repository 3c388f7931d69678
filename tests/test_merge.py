"""Merge-gated HAT: shapes, chunk bookkeeping, causality (generation: test_generate_families)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conftest import rngs, tiny_model_config
from hat.config import GateConfig, MergeGateConfig
from hat.data.merge_layout import merge_batch_from_texts
from hat.models import build_model, loss_and_metrics
from hat.models.merge_hat import chunk_boundaries

DOCS = [b"the quick brown fox jumps over the lazy dog. ", b"hello world, hi there."]


def _model(seed=0, controller="ratio", **merge):
  merge = {"max_chunk_bytes": 6, **merge}
  cfg = tiny_model_config(gate=GateConfig(kind="merge", controller=controller,
                                          merge=MergeGateConfig(**merge)))
  return build_model(cfg, vocab_size=259, rngs=rngs(seed))


def _batch(docs=DOCS, max_tokens=64):
  b = merge_batch_from_texts(docs, max_tokens=max_tokens, overflow="error")
  return {k: jnp.asarray(v) for k, v in b.items()}


@jax.jit
def _fwd(state, graphdef, batch):
  return nnx.merge(graphdef, state)(batch, with_boundaries=True)


def test_boundaries_bos_forced_and_max_chunk():
  p = jnp.array([[0.9, 0.1, 0.1, 0.1, 0.9, 0.1, 0.1, 0.1, 0.1, 0.0]])
  seg = jnp.array([[1, 1, 1, 1, 1, 1, 2, 2, 2, 0]])
  pos = jnp.array([[0, 1, 2, 3, 4, 5, 0, 1, 2, 0]])
  ends = chunk_boundaries(p, seg, pos, max_chunk=3)
  np.testing.assert_array_equal(ends[0], [1, 0, 0, 1, 1, 0, 1, 0, 0, 0])


def test_forward_metrics_and_loss():
  model = _model(capacity=64)
  batch = _batch()
  graphdef, state = nnx.split(model)
  logits, aux = _fwd(state, graphdef, batch)
  assert logits.shape == batch["tokens_BxT"].shape + (259,)
  ends = np.asarray(aux["boundary_BxT"])
  assert float(aux["chunks"]) == ends.sum()
  assert float(aux["chunk_overflow"]) == 0.0
  # A chunk never exceeds max_chunk_bytes: at most 5 non-ends between ends.
  for row, seg in zip(ends, np.asarray(batch["segment_BxT"])):
    run = 0
    for e, s in zip(row, seg):
      run = 0 if e else run + (s > 0)
      assert run < 6
  loss, metrics = loss_and_metrics(model, batch, gate_alpha=0.1)
  assert np.isfinite(float(loss)) and "gate_fixed_loss" not in metrics


def test_capacity_overflow_is_counted():
  model = _model(capacity=4)
  _, aux = model(_batch(), with_boundaries=True)
  ends = np.asarray(aux["boundary_BxT"]).sum(1)
  assert float(aux["chunk_overflow"]) == np.maximum(ends - 4, 0).sum() > 0


def test_merge_model_is_causal_over_bytes():
  model = _model(seed=1)
  graphdef, state = nnx.split(model)
  a = _batch([b"hello world, hi there. and more"])
  la, aa = _fwd(state, graphdef, a)
  for cut in (5, 12, 20):
    tokens = np.asarray(a["tokens_BxT"]).copy()
    tokens[0, cut:32] = (tokens[0, cut:32] + 7) % 256
    lb, ab = _fwd(state, graphdef, dict(a, tokens_BxT=jnp.asarray(tokens)))
    np.testing.assert_allclose(np.asarray(la)[0, :cut], np.asarray(lb)[0, :cut], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(aa["boundary_BxT"])[0, :cut],
                                  np.asarray(ab["boundary_BxT"])[0, :cut])
