"""Cached generation of the gated families, and input handling of every sampler.

- Delete gate: the cached backbone equals the batched hard-deletion pass step by step,
  its upper caches hold only the kept words, and cached greedy output equals the
  reference sampler running `model(batch, hard=True)`.
- Merge HAT: online chunk boundaries equal the full forward pass; greedy output equals
  the reference.
- Inputs: empty and invalid-UTF-8 prompts, prompts longer than the context, no new
  bytes, stop strings never produced.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import rngs, tiny_model_config
from hat import config as C
from hat.data.layout import CapacityError, hat_batch_from_texts
from hat.data.merge_layout import merge_batch_from_texts
from hat.generate import SampleOptions, make_sampler
from hat.generate.hat_sampler import DeleteGatedBackbone, HATSampler
from hat.generate.word_encoder import encode_units
from hat.models import build_model
from hat.text.codec import W_ID
from hat.text.tokenizers import ByteTokenizer

GREEDY = SampleOptions(temperature=0.0, max_new_bytes=24)
PROMPTS = [b"the quick bro", b"", b"Once upon a time there was a small model. ", b"word "]
DOC = b"the quick brown fox jumps over the lazy dog. "


def _cfg(gate: C.GateConfig | None = None, **data):
  model = tiny_model_config("hat")
  if gate:
    model = dataclasses.replace(model, gate=gate)
  base = dict(max_word_bytes=8, max_units=40, row_len=16, num_rows=16, max_tokens=128)
  cfg = C.TrainConfig()
  return dataclasses.replace(cfg, model=model,
                             data=dataclasses.replace(cfg.data, **{**base, **data}))


@pytest.fixture(scope="module")
def delete_model():
  cfg = _cfg(C.GateConfig(kind="delete", delete=C.DeleteGateConfig(layer=1)))
  # rngs(2): a seed whose saturated gate deletes some generated words and keeps others.
  model = build_model(cfg.model, vocab_size=259, rngs=rngs(2), row_len=cfg.data.row_len)
  # Saturated gate: G is 0 or k at every word, about half each; words of a few bytes.
  model.gate.w[...] = model.gate.w[...] * 1e4
  model.gate.b[...] = jnp.zeros(())
  model.head[...] = model.head[...].at[:, W_ID].multiply(3.0)
  return model, cfg


def test_delete_gate_cache_matches_hard_pass_and_holds_only_kept_words(delete_model):
  model, _ = delete_model
  batch = {k: jnp.asarray(v) for k, v in hat_batch_from_texts(
      [DOC], max_word_bytes=15, max_units=16, num_rows=6, row_len=16, overflow="error").items()}
  units, aux = model.encode(batch, {}), {}
  words_1xWxD, pos_1xW = units.x_BxWxD, batch["unit_pos_BxW"]
  p_full = model.backbone_stage(units, aux, hard=True)
  n = int(batch["num_units_B"][0])
  kept = n - int(aux["gate_deleted"])
  assert 0 < kept < n
  runner = DeleteGatedBackbone(capacity=32, kept_capacity=16)
  step = jax.jit(lambda c, x, p: runner.run(model, x, p, c, jnp.ones((1, 1), bool),
                                            jnp.zeros(1, jnp.int32)))
  caches = runner.init(model, 1)
  for j in range(n):
    p_j, caches = step(caches, words_1xWxD[:, j:j + 1], pos_1xW[:, j:j + 1])
    np.testing.assert_allclose(p_j[0, 0], p_full[0, j], atol=1e-5)
  assert int(caches["lower"]["length_B"][0]) == n
  assert int(caches["upper"]["length_B"][0]) == kept  # deleted words left no K/V entry
  assert int(caches["deleted_B"][0]) == n - kept
  # A prefill of all words at once (compacted writes) gives the same.
  keep = jnp.arange(words_1xWxD.shape[1])[None] < n
  p_pre, pre = runner.run(model, words_1xWxD, pos_1xW, runner.init(model, 1), keep,
                          jnp.zeros(1, jnp.int32))
  np.testing.assert_allclose(p_pre[0, :n], p_full[0, :n], atol=1e-5)
  assert int(pre["upper"]["length_B"][0]) == kept
  for k_pre, k_step in zip(pre["upper"]["k"], caches["upper"]["k"], strict=True):
    np.testing.assert_allclose(k_pre[0, :, :kept], k_step[0, :, :kept], atol=1e-5)


def test_delete_gate_cached_greedy_equals_hard_forward_reference(delete_model):
  model, cfg = delete_model
  cached, ref = make_sampler(model, cfg), make_sampler(model, cfg, cached=False)
  assert isinstance(cached, HATSampler)
  batched = cached.generate_batch(PROMPTS, GREEDY)
  for prompt, got in zip(PROMPTS, batched):
    assert got == ref.generate(prompt, GREEDY), prompt
  st = cached.last_state
  units, lower = np.asarray(st["units_B"]), np.asarray(st["bb"]["lower"]["length_B"])
  upper, deleted = np.asarray(st["bb"]["upper"]["length_B"]), np.asarray(st["bb"]["deleted_B"])
  np.testing.assert_array_equal(lower, units)  # every committed unit below the gate
  np.testing.assert_array_equal(upper, units - deleted)  # only the kept ones above it
  assert deleted.sum() > 0 and (upper > 0).all()
  assert cached.compile_counts() == {"init": 1, "prefill": 1, "chunk": 1}
  # The gate's decisions do not depend on how the prompt is cut into prefill blocks.
  assert make_sampler(model, cfg, prefill_block=3).generate_batch(PROMPTS, GREEDY) == batched


@pytest.fixture(scope="module")
def merge_model():
  cfg = _cfg(C.GateConfig(kind="merge", controller="ratio",
                          merge=C.MergeGateConfig(capacity=64, max_chunk_bytes=6)),
             max_tokens=96)
  return build_model(cfg.model, vocab_size=259, rngs=rngs(2)), cfg


def test_merge_online_boundaries_equal_full_pass_and_greedy_equals_reference(merge_model):
  model, cfg = merge_model
  tok = ByteTokenizer()
  cached, ref = make_sampler(model, cfg, tok), make_sampler(model, cfg, tok, cached=False)
  batched = cached.generate_batch(PROMPTS, GREEDY)
  for prompt, got in zip(PROMPTS, batched):
    assert got == ref.generate(prompt, GREEDY), prompt
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda s, b: nnx.merge(graphdef, s)(b, with_boundaries=True)[1]["boundary_BxT"])
  for new_bytes in (3, 11, 24):  # chunk counts at several prefixes of the same stream
    out = cached.generate(PROMPTS[0], dataclasses.replace(GREEDY, max_new_bytes=new_bytes))
    seen = int(cached.last_state["t_B"][0])  # stream positions through the encoder
    batch = merge_batch_from_texts([PROMPTS[0] + out], max_tokens=96, overflow="error")
    ends = np.asarray(fwd(state, {k: jnp.asarray(v) for k, v in batch.items()}))[0, :seen]
    assert int(cached.last_state["bb"]["length_B"][0]) == ends.sum() > 1


def _hat_model(seed=1, **data):
  cfg = _cfg(**data)
  model = build_model(cfg.model, vocab_size=259, rngs=rngs(seed), row_len=cfg.data.row_len)
  model.head[...] = model.head[...].at[:, W_ID].multiply(3.0)
  return model, cfg


def test_prompt_edge_cases_every_sampler(merge_model):
  hat_model, hat_cfg = _hat_model()
  byte_cfg = _cfg(max_tokens=48)
  byte_cfg = dataclasses.replace(byte_cfg, model=tiny_model_config("byte"))
  byte_model = build_model(byte_cfg.model, vocab_size=259, rngs=rngs(3))
  cases = [(hat_model, hat_cfg, None), (byte_model, byte_cfg, ByteTokenizer()),
           (*merge_model, ByteTokenizer())]
  invalid = b"caf\xc3 \xff\xfe na\xc3\xafve \xe2\x82"
  long_prompt = b"many words in a prompt that is longer than the context " * 8
  for model, cfg, tok in cases:
    cached = make_sampler(model, cfg, tok)
    ref = make_sampler(model, cfg, tok, cached=False)
    # No new bytes: nothing is compiled or run.
    assert cached.generate_batch([b"a", b""], dataclasses.replace(GREEDY, max_new_bytes=0)) \
        == [b"", b""]
    assert cached.compile_counts() == {"init": 0, "prefill": 0, "chunk": 0}
    # Empty and invalid UTF-8 prompts continue like the reference.
    for prompt in (b"", invalid):
      assert cached.generate(prompt, GREEDY) == ref.generate(prompt, GREEDY), (cfg, prompt)
    # A prompt longer than the context slides (or raises with overflow="error").
    out = cached.generate(long_prompt, GREEDY)
    assert 0 < len(out) <= GREEDY.max_new_bytes
    with pytest.raises(CapacityError):
      make_sampler(model, cfg, tok, overflow="error").generate(long_prompt, GREEDY)
    # A stop string that never appears, or an empty one, changes nothing.
    plain = cached.generate(PROMPTS[0], GREEDY)
    assert cached.generate(PROMPTS[0], dataclasses.replace(
        GREEDY, stop=("\x00never\x00", ""))) == plain
    assert cached.compile_counts() == {"init": 1, "prefill": 1, "chunk": 1}


def test_generate_many_equals_one_batch_every_family(delete_model, merge_model):
  """Prompts decoded `batch_size` rows at a time (batches of similar length, a short,
  idle-padded last batch) give the bytes of one batch of all, sampled too: prompt i
  keeps the stream of (seed, i). One compiled step serves every batch."""
  byte_cfg = dataclasses.replace(_cfg(max_tokens=48), model=tiny_model_config("byte"))
  byte_model = build_model(byte_cfg.model, vocab_size=259, rngs=rngs(3))
  prompts = PROMPTS + [b"a second batch ", b"caf\xc3 \xff", b"the lazy dog"]
  opts = SampleOptions(temperature=1.0, top_k=0, max_new_bytes=20, stop=("g",), seed=5)
  for model, cfg, tok in [(*_hat_model(), None), (*delete_model, None),
                          (*merge_model, ByteTokenizer()), (byte_model, byte_cfg,
                                                            ByteTokenizer())]:
    sampler = make_sampler(model, cfg, tok)
    many = sampler.generate_many(prompts, opts, batch_size=3)
    assert sampler.compile_counts() == {"init": 1, "prefill": 1, "chunk": 1}, cfg.model.kind
    assert many == sampler.generate_batch(prompts, opts), cfg.model.kind
    assert len(set(many)) > 3  # sampled, not one continuation for all
    assert sampler.generate_many(prompts[:2], opts, batch_size=8) == many[:2]
  with pytest.raises(ValueError, match="batch_size"):
    sampler.generate_many(prompts, opts, batch_size=0)


def test_long_prompt_keeps_half_the_cache_and_is_prefilled_once():
  """A prompt longer than the cache keeps its most recent half (as a full cache slides),
  so generation does not fill the cache at its first word and prefill again."""
  from hat.generate.device import kept_context
  assert [kept_context(n, 8, False) for n in (0, 7, 8, 30)] == [0, 7, 4, 4]
  assert [kept_context(n, 8, True) for n in (3, 7, 30)] == [3, 4, 4]
  model, cfg = _hat_model(max_units=12)
  byte_cfg = dataclasses.replace(_cfg(max_tokens=24), model=tiny_model_config("byte"))
  byte_model = build_model(byte_cfg.model, vocab_size=259, rngs=rngs(3))
  long_prompt = b"many words in a prompt that is longer than the context " * 3
  for model, cfg, tok in [(model, cfg, None), (byte_model, byte_cfg, ByteTokenizer())]:
    sampler = make_sampler(model, cfg, tok)
    calls = []
    prefill = sampler.prefill_fn
    sampler.prefill_fn = lambda *a, _f=prefill: calls.append(1) or _f(*a)
    out = sampler.generate(long_prompt, dataclasses.replace(GREEDY, max_new_bytes=4))
    assert len(out) == 4 and len(calls) == 1, cfg.model.kind
