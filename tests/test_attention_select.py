"""attention_impl="auto": which implementation serves which call, and one-line fallbacks."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hat.config import ModelConfig, TransformerConfig
from hat.models import layers


@pytest.fixture(autouse=True)
def _fresh_log_cache():
  layers._log_fallback.cache_clear()
  yield
  layers._log_fallback.cache_clear()


def select(impl, backend, dtype=jnp.bfloat16, head_dim=128, length=256, bias=False):
  return layers.select_attention_impl(impl, dtype=dtype, head_dim=head_dim, length=length,
                                      dense_bias=bias, backend=backend)


def test_default_is_auto():
  assert ModelConfig().attention_impl == "auto"


def test_auto_per_backend():
  assert select("auto", "gpu") == "cudnn"
  assert select("auto", "tpu") == "splash"
  assert select("auto", "cpu") == "xla"
  # The HAT row attention (C = 128, same-word mask as segments) on both accelerators.
  assert select("auto", "gpu", length=128) == "cudnn"
  assert select("auto", "tpu", length=128) == "splash"
  assert select("auto", "tpu", length=2944) == "splash"  # 23 blocks of 128


def test_fallbacks_log_one_line(caplog):
  cases = [("auto", "gpu", dict(dtype=jnp.float32)),  # cuDNN flash is bf16/fp16 only
           ("auto", "gpu", dict(head_dim=160)),
           ("auto", "tpu", dict(bias=True)),  # MrT5 soft deletion: additive bias
           ("auto", "tpu", dict(length=200)),
           ("cudnn", "cpu", {}), ("splash", "cpu", {})]
  for impl, backend, kw in cases:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hat.models.layers"):
      assert select(impl, backend, **kw) == "xla"
      assert select(impl, backend, **kw) == "xla"  # the same case again: no second line
    assert len(caplog.records) == 1, (impl, backend, kw)
    assert "-> 'xla'" in caplog.records[0].getMessage()
  with pytest.raises(ValueError, match="attention_impl"):
    select("flash", "gpu")


def test_cpu_auto_and_explicit_choices_run_xla():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(2, 8, 2, 8)), jnp.float32)
  seg = jnp.asarray([[1] * 5 + [2] * 3, [1] * 8], jnp.int32)
  ref = layers.dot_product_attention(q, q, q, segment_BxL=seg, causal=True, impl="xla")
  for impl in ("auto", "cudnn", "splash"):
    out = layers.dot_product_attention(q, q, q, segment_BxL=seg, causal=True, impl=impl)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_stack_with_auto_matches_xla():
  cfg = TransformerConfig(num_layers=1, d_model=16, num_heads=2, num_kv_heads=1, head_dim=8,
                          mlp_dim=32)
  from flax import nnx
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 16)), jnp.float32)
  seg = jnp.ones((2, 8), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(8)[None], (2, 8))
  outs = []
  for impl in ("xla", "auto"):
    stack = layers.TransformerStack(cfg, causal=True, attention_impl=impl, rngs=nnx.Rngs(0))
    outs.append(np.asarray(stack(x, segment_BxL=seg, pos_BxL=pos,
                                 key_bias_BxL=jnp.zeros((2, 8)))))
  np.testing.assert_array_equal(outs[0], outs[1])
  if jax.default_backend() == "cpu":
    assert layers.select_attention_impl("auto", dtype=jnp.float32, head_dim=8,
                                        length=8) == "xla"
