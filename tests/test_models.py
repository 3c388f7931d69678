"""Model tests: shapes, scan vs loop, remat, attention, padding invariance, overfitting, metrics."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import forward, loss, rngs, tiny_model_config
from hat.data.layout import hat_batch_from_texts, token_batch_from_texts
from hat.models import build_model, layers, loss_and_metrics, model_vocab_size
from hat.models.losses import bits_per_byte, metrics_from_logits
from hat.text.codec import BYTE_VOCAB_SIZE, PAD_ID, S_ID, W_ID
from hat.text.tokenizers import ByteTokenizer

DOCS = [b"the quick brown fox jumps over the lazy dog. ", b"hello world, hi there."]


def _jnp(batch):
  return {k: jnp.asarray(v) for k, v in batch.items()}


def hat_batch(docs=DOCS, max_units=16, num_rows=6, row_len=16):
  return _jnp(hat_batch_from_texts(docs, max_word_bytes=15, max_units=max_units,
                                   num_rows=num_rows, row_len=row_len, overflow="error"))


def byte_batch(docs=DOCS, max_tokens=64):
  return _jnp(token_batch_from_texts(docs, ByteTokenizer(), max_tokens=max_tokens,
                                     overflow="error"))


def bpe_batch(seed=0, batch=2, length=24, vocab=48, pad_to=None):
  """Synthetic BPE-layout batch: two packed segments per row, random ids."""
  rng = np.random.default_rng(seed)
  pad_to = pad_to or length
  tokens = rng.integers(0, vocab, size=(batch, length), dtype=np.int32)
  cut = length // 3
  seg = np.where(np.arange(length) < cut, 1, 2)[None].repeat(batch, 0).astype(np.int32)
  pos = np.where(np.arange(length) < cut, np.arange(length), np.arange(length) - cut)
  targets = np.roll(tokens, -1, axis=1)
  mask = np.ones_like(tokens)
  mask[:, cut - 1] = 0  # the last token of segment 1 has no in-segment successor
  mask[:, -1] = 0
  out = {"tokens_BxT": tokens, "targets_BxT": targets, "target_mask_BxT": mask,
         "segment_BxT": seg, "pos_BxT": pos[None].repeat(batch, 0).astype(np.int32)}
  extra = pad_to - length
  out = {k: np.pad(v, ((0, 0), (0, extra))) for k, v in out.items()}
  out["num_bytes_B"] = np.full((batch,), 3 * length, np.int32)
  return _jnp(out)


def make(kind, row_len=16, vocab=None, **overrides):
  if kind == "bpe":
    overrides["vocab_size"] = vocab or 48
  cfg = tiny_model_config(kind, **overrides)
  vocab = model_vocab_size(cfg)
  return build_model(cfg, vocab_size=vocab, rngs=rngs(0), row_len=row_len)


@pytest.mark.parametrize("kind", ["hat", "byte", "bpe"])
def test_shapes_and_fp32_logits_with_bf16_compute(kind):
  model = make(kind, compute_dtype="bfloat16")
  batch = {"hat": hat_batch, "byte": byte_batch, "bpe": bpe_batch}[kind]()
  logits = forward(model, batch)
  key = "targets_BxS" if kind == "hat" else "targets_BxT"
  vocab = 48 if kind == "bpe" else BYTE_VOCAB_SIZE
  assert logits.shape == batch[key].shape + (vocab,)
  assert logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))


def test_tied_byte_embeddings_share_one_table():
  tied, untied = make("hat", tie_byte_embeddings=True), make("hat")
  assert not hasattr(tied, "dec_embed") and hasattr(untied, "dec_embed")
  count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert count(untied) - count(tied) == untied.dec_embed[...].size
  assert bool(jnp.all(jnp.isfinite(forward(tied, hat_batch()))))


def test_every_param_has_logical_axes():
  model = make("hat")
  for path, var in jax.tree_util.tree_leaves_with_path(
      nnx.state(model, nnx.Param), is_leaf=lambda v: isinstance(v, nnx.Variable)):
    axes = var.get_metadata().get("logical_axes")
    assert axes is not None, path
    assert len(axes) in (var[...].ndim, var[...].ndim - 1), path


def test_scan_matches_unscanned_layers():
  scanned, looped = make("byte", scan_layers=True), make("byte")
  stacked = nnx.state(scanned.backbone.layers)
  for i, block in enumerate(looped.backbone.blocks):
    nnx.update(block, jax.tree.map(lambda a: a[i], stacked))
  nnx.update(looped, nnx.state(scanned, nnx.Not(nnx.PathContains("layers"))))
  batch = byte_batch()
  np.testing.assert_allclose(forward(looped, batch), forward(scanned, batch), atol=1e-5,
                             rtol=1e-5)


def test_remat_policies_same_loss_and_grads():
  batch = byte_batch()

  @nnx.jit
  def loss_grad(model):
    return nnx.value_and_grad(lambda m: loss_and_metrics(m, batch)[0])(model)

  loss0, g0 = loss_grad(make("byte"))
  for remat in ("full", "dots"):
    loss1, g1 = loss_grad(make("byte", remat=remat))
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)


def test_gqa_equals_mha_with_repeated_kv_and_masked_rows_are_finite():
  attend = jax.jit(layers.dot_product_attention, static_argnames=("causal", "impl"))
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(2, 6, 4, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(2, 6, 2, 8)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(2, 6, 2, 8)), jnp.float32)
  seg = jnp.asarray([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]], jnp.int32)
  gqa = attend(q, k, v, segment_BxL=seg, causal=True)
  mha = attend(q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2), segment_BxL=seg,
               causal=True)
  np.testing.assert_allclose(gqa, mha, atol=1e-6)
  # A reference softmax per (b, query) over its visible keys.
  mask = np.asarray(layers.segment_mask(seg, True))
  logits = np.einsum("bqhk,bshk->bhqs", q, np.repeat(k, 2, axis=2)) / math.sqrt(8)
  logits = np.where(mask[:, None], logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  ref = np.einsum("bhqs,bshk->bqhk", probs, np.repeat(v, 2, axis=2))
  np.testing.assert_allclose(gqa, ref, atol=1e-5)
  none_visible = jnp.zeros((2, 6, 6), jnp.bool_)
  out = attend(q, k, v, segment_BxL=seg, causal=True, mask_BxLxL=none_visible)
  assert bool(jnp.all(out == 0))
  grad = jax.jit(jax.grad(lambda q: attend(
      q, k, v, segment_BxL=seg, causal=True, mask_BxLxL=none_visible).sum()))(q)
  assert bool(jnp.all(jnp.isfinite(grad)))


def test_splash_kernel_refuses_non_tpu_backend():
  if jax.default_backend() == "tpu":
    pytest.skip("on TPU splash runs")
  q = jnp.zeros((1, 8, 2, 8))
  # The kernel itself refuses; the dispatcher falls back to XLA (tests/test_attention_select).
  with pytest.raises(NotImplementedError, match="TPU"):
    layers._splash_attention(q, q, q, jnp.ones((1, 8), jnp.int32), causal=True)


def test_hat_padding_invariance():
  model = make("hat", row_len=16)
  loss_small, m_small = loss(model, hat_batch(max_units=16, num_rows=6,
                                                          row_len=16))
  model_wide = make("hat", row_len=24)  # same params: rows are only a layout choice
  loss_big, m_big = loss(model_wide, hat_batch(max_units=40, num_rows=7,
                                                           row_len=24))
  np.testing.assert_allclose(loss_big, loss_small, rtol=1e-5, atol=1e-5)
  for key in ("num_targets", "num_bytes", "num_words"):
    assert float(m_big[key]) == float(m_small[key])


def test_token_padding_invariance():
  model = make("byte")
  loss_small, _ = loss(model, byte_batch(max_tokens=48))
  loss_big, _ = loss(model, byte_batch(max_tokens=80))
  np.testing.assert_allclose(loss_big, loss_small, rtol=1e-5, atol=1e-5)
  bpe = make("bpe")
  loss_small, _ = loss(bpe, bpe_batch())
  loss_big, _ = loss(bpe, bpe_batch(pad_to=40))
  np.testing.assert_allclose(loss_big, loss_small, rtol=1e-5, atol=1e-5)


def _overfit(model, batch, steps, lr=1e-2):
  optimizer = nnx.Optimizer(model, optax.adamw(lr, weight_decay=0.0), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))

  @jax.jit
  def run(state):
    def step(_, state):
      model, optimizer = nnx.merge(graphdef, state)
      grads = nnx.grad(lambda m: loss_and_metrics(m, batch)[0])(model)
      optimizer.update(model, grads)
      return nnx.state((model, optimizer))
    state = jax.lax.fori_loop(0, steps, step, state)
    model, _ = nnx.merge(graphdef, state)
    return loss_and_metrics(model, batch)

  return run(state)


@pytest.mark.parametrize("kind", ["hat", "byte", "bpe"])
def test_overfits_short_text(kind):
  batch = {"hat": lambda: hat_batch(DOCS[:1]), "byte": lambda: byte_batch(DOCS[:1]),
           "bpe": lambda: bpe_batch(batch=1)}[kind]()
  loss, metrics = _overfit(make(kind), batch, steps=120)
  assert float(loss) < 0.05, float(loss)
  assert float(metrics["correct_targets"]) == float(metrics["num_targets"])
  if kind == "hat":
    assert float(metrics["words_correct"]) == float(metrics["num_words"])


def test_bits_per_byte_hand_computed():
  # Two targets over a 3-symbol vocab, uniform logits: nll = 2 ln 3 over 4 text bytes.
  batch = {"targets_BxT": jnp.asarray([[0, 2, 1]]), "target_mask_BxT": jnp.asarray([[1, 1, 0]]),
           "num_bytes_B": jnp.asarray([4])}
  metrics = jax.jit(metrics_from_logits)(jnp.zeros((1, 3, 3)), batch)
  np.testing.assert_allclose(metrics["nll_sum"], 2 * math.log(3), rtol=1e-6)
  bpb = bits_per_byte(metrics["nll_sum"], metrics["num_bytes"])
  np.testing.assert_allclose(bpb, 2 * math.log2(3) / 4, rtol=1e-6)
  assert bits_per_byte(8 * math.log(2), 8) == pytest.approx(1.0)


def test_word_accuracy_hand_constructed():
  # Units: 0 START (no targets), 1 "ab" (3 targets), 2 "c" (2 targets), 3 END (1), pad.
  slot_unit = [[0, 1, 1, 1, 2, 2, 3, -1]]
  targets = [[PAD_ID, ord("a"), ord("b"), W_ID, ord("c"), W_ID, S_ID, PAD_ID]]
  mask = [[0, 1, 1, 1, 1, 1, 1, 0]]
  predicted = [[5, ord("a"), ord("b"), W_ID, ord("c"), ord("x"), S_ID, 7]]
  logits = jax.nn.one_hot(jnp.asarray(predicted), BYTE_VOCAB_SIZE) * 10.0
  batch = {"targets_BxS": jnp.asarray(targets), "target_mask_BxS": jnp.asarray(mask),
           "slot_unit_BxS": jnp.asarray(slot_unit), "unit_segment_BxW": jnp.ones((1, 5)),
           "num_bytes_B": jnp.asarray([3])}
  metrics = jax.jit(metrics_from_logits)(logits, batch)
  # "ab" + [W] right, "c" wrong at [W], END right; START and padding are not words.
  assert float(metrics["num_words"]) == 3.0
  assert float(metrics["words_correct"]) == 2.0
  assert float(metrics["correct_targets"]) == 5.0
  assert float(metrics["num_targets"]) == 6.0


def test_z_loss_adds_mean_squared_logsumexp():
  model = make("byte")
  batch = byte_batch()
  loss0, metrics = loss(model, batch)
  loss1, _ = loss(model, batch, z_loss=1e-2)
  expected = loss0 + 1e-2 * metrics["z_loss_sum"] / metrics["num_targets"]
  np.testing.assert_allclose(loss1, expected, rtol=1e-6)
