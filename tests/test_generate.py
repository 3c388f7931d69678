"""Cached generation (HAT, token LMs): equal to the uncached reference, compiles, sampling, overflow.

Delete-gated and merge HAT, and input handling: tests/test_generate_families.py.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rngs, tiny_model_config
from hat import config as C
from hat.data.layout import CapacityError
from hat.generate import (HATSampler, ReferenceHATSampler, ReferenceTokenSampler,
                          SampleOptions, TokenSampler, make_sampler, sample_on_device)
from hat.models import build_model
from hat.text.codec import W_ID
from hat.text.tokenizers import ByteTokenizer

GREEDY = SampleOptions(temperature=0.0, max_new_bytes=24)
PROMPTS = [b"the quick bro",  # ends mid-word
           b"",
           b"Once upon a time there was a small model that spoke bytes. ",  # > one row
           b"word "]


def _cfg(kind, **data):
  base = dict(max_word_bytes=8, max_units=40, row_len=16, num_rows=16, max_tokens=96)
  cfg = C.TrainConfig()
  return dataclasses.replace(cfg, model=tiny_model_config(kind),
                             data=dataclasses.replace(cfg.data, **{**base, **data}))


@pytest.fixture(scope="module")
def hat_model():
  cfg = _cfg("hat")
  model = build_model(cfg.model, vocab_size=259, rngs=rngs(1), row_len=cfg.data.row_len)
  # An untrained model rarely ends a word; a louder [W] column makes words of a few bytes.
  model.head[...] = model.head[...].at[:, W_ID].multiply(3.0)
  return model, cfg


def test_hat_cached_equals_uncached_greedy(hat_model, monkeypatch):
  model, cfg = hat_model
  cached, ref = HATSampler(model, cfg), ReferenceHATSampler(model, cfg)
  batched = cached.generate_batch(PROMPTS, GREEDY)
  units = np.asarray(cached.last_state["units_B"])
  prompt_units = np.array([max(1, len(cached.splitter.split(p))) for p in PROMPTS])  # START+words
  assert (units - prompt_units).sum() >= 3  # words were committed through the backbone cache
  for prompt, got in zip(PROMPTS, batched):
    assert got == ref.generate(prompt, GREEDY), prompt
  assert cached.generate(PROMPTS[0], GREEDY) == batched[0]
  # Prefill blocks of 3 units (not dividing the 40-unit cache) give the same output.
  assert HATSampler(model, cfg, prefill_block=3).generate_batch(PROMPTS, GREEDY) == batched
  # So do cache reads cut to the longest row (spans 40 and 20 of this cache).
  from hat.models import layers
  assert layers.cache_spans(40) == [20, 40] and layers.cache_spans(128) == [16, 32, 64, 128]
  monkeypatch.setattr(layers, "SPAN_MIN_BYTES", 0)
  assert HATSampler(model, cfg).generate_batch(PROMPTS, GREEDY) == batched


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_token_cached_equals_uncached_greedy(kind, tmp_path, monkeypatch):
  if kind == "bpe":
    from hat.text.bpe import train_bpe
    text = [b" ".join(PROMPTS) * 20, b"the quick brown fox jumps over the lazy dog. " * 40]
    tok = train_bpe(text, 320, tmp_path / "bpe.model", num_threads=1)
  else:
    tok = ByteTokenizer()
  cfg = _cfg(kind)  # room for prompt + output: both samplers see the whole context
  model = build_model(cfg.model, vocab_size=tok.vocab_size, rngs=rngs(2))
  cached, ref = TokenSampler(model, cfg, tok), ReferenceTokenSampler(model, cfg, tok)
  batched = cached.generate_batch(PROMPTS, GREEDY)
  for prompt, got in zip(PROMPTS, batched):
    assert got == ref.generate(prompt, GREEDY), prompt
    assert len(got) <= GREEDY.max_new_bytes
  assert TokenSampler(model, cfg, tok, prefill_block=7).generate_batch(PROMPTS, GREEDY) \
      == batched
  from hat.models import layers
  monkeypatch.setattr(layers, "SPAN_MIN_BYTES", 0)  # reads cut to 24, 48 or 96 tokens
  assert TokenSampler(model, cfg, tok).generate_batch(PROMPTS, GREEDY) == batched


def test_no_recompilation_across_words_prompts_and_options(hat_model):
  model, cfg = hat_model
  sampler = make_sampler(model, cfg)
  sampler.generate_batch(PROMPTS[:2], GREEDY)
  sampler.generate_batch(PROMPTS[2:], SampleOptions(temperature=0.7, top_k=5, top_p=0.9,
                                                    max_new_bytes=30, seed=3))
  assert sampler.compile_counts() == {"init": 1, "prefill": 1, "chunk": 1}
  sampler.generate_batch(PROMPTS[:3], GREEDY)  # a new batch size compiles once more
  sampler.generate_batch(PROMPTS[1:], SampleOptions(max_new_bytes=5, stop=("e",)))
  assert sampler.compile_counts() == {"init": 2, "prefill": 2, "chunk": 2}
  tok_sampler = make_sampler(build_model(_cfg("byte").model, vocab_size=259, rngs=rngs(3)),
                             _cfg("byte", max_tokens=40), ByteTokenizer())
  tok_sampler.generate_batch([b"a", b"bc"], SampleOptions(max_new_bytes=50))  # slides too
  tok_sampler.generate_batch([b"xyz", b""], GREEDY)
  assert tok_sampler.compile_counts() == {"init": 1, "prefill": 1, "chunk": 1}


def test_sampling_options(hat_model):
  model, cfg = hat_model
  sampler = make_sampler(model, cfg)
  opts = SampleOptions(temperature=1.0, top_k=20, max_new_bytes=20, seed=7)
  a = sampler.generate_batch(PROMPTS[:2], opts)
  assert a == sampler.generate_batch(PROMPTS[:2], opts)  # seeded
  assert a[0] == sampler.generate(PROMPTS[0], opts)  # a row's stream ignores the others
  assert a != sampler.generate_batch(PROMPTS[:2], dataclasses.replace(opts, seed=8))
  top1 = dataclasses.replace(opts, top_k=1, max_new_bytes=GREEDY.max_new_bytes)
  assert sampler.generate_batch(PROMPTS, top1) == sampler.generate_batch(PROMPTS, GREEDY)
  greedy = sampler.generate(PROMPTS[2], GREEDY)
  stop = greedy[5:7].decode("latin-1")
  cut = sampler.generate(PROMPTS[2], dataclasses.replace(GREEDY, stop=(stop,)))
  assert cut == greedy[:greedy.find(greedy[5:7])]


def test_sample_on_device_top_k_top_p():
  logits_BxV = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 256))
  keys = jax.random.key_data(jax.random.split(jax.random.key(0), 256))

  def support(top_k, top_p, temperature=1.0):
    out = sample_on_device(logits_BxV, keys, jnp.float32(temperature), jnp.int32(top_k),
                           jnp.float32(top_p))
    return set(np.asarray(out).tolist())

  assert support(0, 1.0) == {0, 1, 2, 3}
  assert support(2, 1.0) == {0, 1}
  assert support(0, 0.7) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
  assert support(0, 1.0, temperature=0.0) == {0}


def test_backbone_cache_overflow_is_explicit(hat_model):
  model, cfg = hat_model
  opts = dataclasses.replace(GREEDY, max_new_bytes=40)
  with pytest.raises(CapacityError, match="6 units"):
    HATSampler(model, cfg, max_units=6, overflow="error").generate(PROMPTS[2], opts)
  slid = HATSampler(model, cfg, max_units=6).generate_batch(PROMPTS, opts)
  assert all(len(s) <= 40 for s in slid) and max(map(len, slid)) == 40
  tok_cfg = _cfg("byte", max_tokens=16)
  tok_model = build_model(tok_cfg.model, vocab_size=259, rngs=rngs(3))
  with pytest.raises(CapacityError, match="16 positions"):
    TokenSampler(tok_model, tok_cfg, ByteTokenizer(), overflow="error").generate(b"ab", opts)


def test_sort_free_thresholds_equal_sorting():
  from hat.generate.sampling import _kth_largest_key, _nucleus_threshold, _order_key
  rng = np.random.default_rng(0)
  z_BxV = rng.normal(size=(6, 40)).astype(np.float32)
  z_BxV[:, :3] = -np.inf  # banned symbols
  z_BxV[1, 5:9] = z_BxV[1, 10]  # ties
  z_BxV[2, 4] = -0.0
  z_BxV[2, 5] = 0.0
  desc_BxV = -np.sort(-z_BxV, axis=1)
  for k in (1, 2, 5, 37, 40):
    got = np.asarray(_kth_largest_key(_order_key(jnp.asarray(z_BxV)), jnp.int32(k)))
    assert (got == np.asarray(_order_key(jnp.asarray(desc_BxV[:, k - 1])))).all(), k
  probs_BxV = np.asarray(jax.nn.softmax(jnp.asarray(z_BxV), axis=-1))
  bits_BxV = jax.lax.bitcast_convert_type(jnp.asarray(probs_BxV), jnp.uint32)
  for top_p in (0.05, 0.3, 0.7, 0.95):
    thr_B = np.asarray(_nucleus_threshold(jnp.asarray(probs_BxV), bits_BxV, jnp.float32(top_p)))
    for b in range(len(probs_BxV)):  # `pick`'s rule, in float64
      p = np.sort(probs_BxV[b].astype(np.float64))[::-1]
      keep = np.cumsum(p) - p < top_p
      want = np.float32(p[keep].min()).view(np.uint32)
      assert thr_B[b] == want, (top_p, b)


def test_blocked_cumsum_equals_cumsum():
  from hat.generate.sampling import _cumsum
  rng = np.random.default_rng(1)
  for vocab in (1, 16, 40, 259):
    x_BxV = rng.random((3, vocab)).astype(np.float32)
    x_BxV[:, ::3] = 0.0
    np.testing.assert_allclose(np.asarray(_cumsum(jnp.asarray(x_BxV))),
                               np.cumsum(x_BxV, axis=1), rtol=1e-6, atol=1e-6)


def test_sample_on_device_follows_the_distribution():
  probs = np.array([0.5, 0.0, 0.3, 0.15, 0.05])
  logits_BxV = jnp.log(jnp.asarray(np.tile(probs, (4000, 1)), jnp.float32))
  keys = jax.random.key_data(jax.random.split(jax.random.key(1), 4000))
  out = np.asarray(sample_on_device(logits_BxV, keys, jnp.float32(1.0), jnp.int32(0),
                                    jnp.float32(1.0)))
  freq = np.bincount(out, minlength=5) / len(out)
  assert freq[1] == 0 and np.abs(freq - probs).max() < 0.03, freq


def _sample_alternating_rows(even_V, odd_V, top_k, top_p, seed, rows=4000):
  """Samples `rows` rows whose distributions alternate even_V, odd_V -> (even, odd) draws."""
  logits_BxV = jnp.log(jnp.asarray(np.where(np.arange(rows)[:, None] % 2 == 0, even_V, odd_V),
                                   jnp.float32))
  keys = jax.random.key_data(jax.random.split(jax.random.key(seed), rows))
  out = np.asarray(sample_on_device(logits_BxV, keys, jnp.float32(1.0), jnp.int32(top_k),
                                    jnp.float32(top_p)))
  return out[0::2], out[1::2]


def test_top_k_by_rejection_follows_the_renormalised_distribution():
  # Even rows: the top 2 hold 80% of the mass (first or second round of draws); odd rows:
  # 3.5% (nearly always the exact path). Both must give p restricted to the top 2.
  high = np.array([0.5, 0.3, 0.1, 0.1] + [0.0] * 96)
  low = np.array([0.02, 0.015] + [0.965 / 98] * 98)
  for probs, drawn in zip((high, low), _sample_alternating_rows(high, low, 2, 1.0, seed=2)):
    freq = np.bincount(drawn, minlength=100) / len(drawn)
    want = np.where(np.arange(100) < 2, probs, 0.0)
    assert np.abs(freq - want / want.sum()).max() < 0.04, freq[:4]


def test_top_p_by_rejection_follows_the_nucleus():
  # Even rows: a peaked distribution; odd rows: a flat one. top_p 0.5 keeps, per row, the
  # likeliest symbols holding >= half the mass (ties of the last one kept).
  peaked = np.array([0.45, 0.2, 0.1, 0.1] + [0.15 / 96] * 96)
  flat = np.array([0.05, 0.05, 0.04, 0.03] + [0.83 / 96] * 96)
  for probs, drawn in zip((peaked, flat), _sample_alternating_rows(peaked, flat, 0, 0.5,
                                                                    seed=3)):
    order = np.argsort(-probs, kind="stable")
    kept = np.zeros(100, bool)
    kept[order[np.cumsum(probs[order]) - probs[order] < 0.5]] = True
    kept |= np.isin(probs, probs[kept].min())  # ties of the last kept symbol
    want = np.where(kept, probs, 0.0)
    freq = np.bincount(drawn, minlength=100) / len(drawn)
    assert np.abs(freq - want / want.sum()).max() < 0.04, freq[:8]


def test_sample_options_are_checked_once():
  from hat.cli import UserError
  assert SampleOptions(stop="\n").stop == ("\n",)  # one string, not its characters
  assert SampleOptions(stop=["a", "b"]).stop == ("a", "b")
  for bad in (dict(temperature=float("nan")), dict(temperature=-1.0),
              dict(temperature=float("inf")), dict(top_p=0.0), dict(top_p=float("nan")),
              dict(top_k=-1), dict(top_k=2.5), dict(seed=2**32), dict(seed=-2**31 - 1),
              dict(stop=(b"x",))):
    with pytest.raises(UserError):
      SampleOptions(**bad)


def _tool(name: str):
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name, path)
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  return tool


def test_bench_sampling_times_both_paths(tmp_path):
  import json
  tool = _tool("bench_sampling")
  out = tmp_path / "sampling.json"
  assert tool.main(["--vocabs", "259", "--batches", "2", "--scales", "0.5,8", "--draws", "3",
                    "--repeats", "1", "--top-k", "5", "--out", str(out)]) == 0
  rows = json.loads(out.read_text())["results"]
  assert [r["scale"] for r in rows] == [0.5, 8.0]
  assert rows[0]["kept_mass"] < 0.2 < 0.9 < rows[1]["kept_mass"]
  assert all(r["exact_us"] > 0 and r["rejection_us"] > 0 for r in rows)
  assert tool.main(["--vocabs", "259", "--batches", "2", "--scales", "1", "--draws", "3",
                    "--repeats", "1", "--top-p", "0.9", "--out", str(out)]) == 0
  row, = json.loads(out.read_text())["results"]
  assert row["kept"] == "top-p 0.9" and row["kept_mass"] >= 0.9


def test_bench_generate_writes_rows_per_model_and_batch(tmp_path):
  """Random-weight mode, several corpus prompts per call (`--prompts`, `--prompt-bytes`):
  JSON rows of model, batch and bytes/s with the machine; prompts of the asked lengths."""
  import json
  out = tmp_path / "gen.json"
  tool = _tool("bench_generate")
  assert tool.main(
      ["--models", "hat,byte", "--batches", "2", "--new-bytes", "6", "--repeats", "1",
       "--min-seconds", "0", "--prompts", "3", "--prompt-bytes", "5:40",
       "--out", str(out)]) == 0
  res = json.loads(out.read_text())
  assert res["machine"]["platform"] == "cpu"
  assert [(r["model"], r["batch"], r["prompts"]) for r in res["results"]] == \
      [("hat", 2, 3), ("byte", 2, 3)]
  for r in res["results"]:
    assert r["bytes_per_s"] > 0 and 0 < r["bytes"] <= 3 * 6
    assert r["bytes_per_position"] is None  # corpus prompts: positions not counted
  assert tool.main(["--models", "byte", "--batches", "2", "--new-bytes", "6", "--repeats",
                    "1", "--min-seconds", "0", "--prompts", "3", "--out", str(out)]) == 0
  row, = json.loads(out.read_text())["results"]
  # A byte per position; a row's last sampled byte is not in the cache yet: 6 / 5.
  assert row["prompts"] == 3 and 1.0 <= row["bytes_per_position"] <= 6 / 5
  prompts = tool.make_prompts(50, (5, 40))
  assert {len(p) for p in prompts} <= set(range(5, 41)) and len(set(prompts)) == 50
  assert tool.make_prompts(50, (5, 40)) == prompts  # seeded


def test_first_rows_and_marker_encoder_equal_the_full_ones():
  from hat.generate.device import embed, project
  from hat.generate.hat_sampler import first_rows
  from hat.generate.word_encoder import encode_units
  rows_K, valid_K = first_rows(jnp.array([0, 1, 1, 0, 1, 1, 1], bool), 4)
  assert rows_K.tolist() == [1, 2, 4, 5] and valid_K.all()
  rows_K, valid_K = first_rows(jnp.array([0, 1, 0], bool), 2)
  assert rows_K.tolist() == [1, 0] and valid_K.tolist() == [True, False]
  rows_K, valid_K = first_rows(jnp.array([0, 1, 1, 0, 1, 1, 1], bool), 4, jnp.int32(5))
  assert rows_K.tolist() == [5, 6, 1, 2] and valid_K.all()  # round robin from row 5
  base = tiny_model_config("hat")
  for layers, scan in ((1, False), (3, True)):
    mcfg = dataclasses.replace(base, scan_layers=scan, encoder=dataclasses.replace(
        base.encoder, num_layers=layers))
    model = build_model(mcfg, vocab_size=259, rngs=rngs(4), row_len=16)
    ids_NxL = jax.random.randint(jax.random.key(0), (5, 9), 0, 256).at[:, 0].set(W_ID)
    nb_N = jnp.array([0, 1, 4, 8, 3])
    pos_NxL = jnp.broadcast_to(jnp.arange(9)[None], ids_NxL.shape)
    h_NxLxd = model.encoder(embed(model.enc_embed[...], ids_NxL, model.compute_dtype),
                            segment_BxL=(pos_NxL <= nb_N[:, None]).astype(jnp.int32),
                            pos_BxL=pos_NxL)
    full_NxD = project(h_NxLxd[:, :1], model.w_enc[...], model.compute_dtype)[:, 0]
    np.testing.assert_allclose(encode_units(model, ids_NxL, nb_N), full_NxD, atol=1e-5)


def test_token_head_wider_than_tokenizer_never_samples_past_it():
  from hat.generate import rules
  banned_1xV = rules.token_banned(ByteTokenizer(), 300, np)
  assert banned_1xV[0, 259:].all() and not banned_1xV[0, :256].any()


def test_cache_step_then_write_equals_extend():
  """`step` reads only; `write_kv` after it gives `extend`'s output and cache, and a
  disabled write leaves the cache as it was."""
  from conftest import TINY_STACK
  from hat.models.layers import TransformerStack, write_kv
  stack = TransformerStack(TINY_STACK, causal=True, scan_layers=False, rngs=rngs(4))
  batch, d = 3, TINY_STACK.d_model
  x = jax.random.normal(jax.random.key(0), (batch, 5, d))
  cache = stack.init_cache(batch, 8)
  pos = jnp.broadcast_to(jnp.arange(4)[None], (batch, 4))
  _, cache = stack.extend(x[:, :4], pos_NxT=pos, cache=cache,
                          keep_NxT=jnp.array([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], bool))
  rows, keep = jnp.array([2, 0]), jnp.array([[True], [True]])
  args = dict(pos_NxT=cache["length_B"][rows][:, None], cache=cache, keep_NxT=keep,
              rows_N=rows)
  y_ext, cache_ext = stack.extend(x[:2, 4:], **args)
  y_step, new = stack.step(x[:2, 4:], **args)
  np.testing.assert_allclose(y_step, y_ext, rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree.leaves(write_kv(cache, new)), jax.tree.leaves(cache_ext)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(write_kv(cache, new, jnp.bool_(False))),
                  jax.tree.leaves(cache)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(cache_ext["length_B"], [5, 2, 1])
  with pytest.raises(ValueError, match="one position"):
    stack.step(x[:, :2], pos_NxT=pos[:, :2], cache=cache)


def test_output_does_not_depend_on_call_length(hat_model):
  """Short device calls (many host round trips, refills of full caches mid-batch) and
  long ones give the same bytes."""
  model, cfg = hat_model
  opts = dataclasses.replace(GREEDY, max_new_bytes=40)
  long = HATSampler(model, cfg, max_units=6).generate_batch(PROMPTS, opts)
  assert HATSampler(model, cfg, max_units=6, chunk_steps=3).generate_batch(PROMPTS, opts) == long
