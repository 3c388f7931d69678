"""Exact byte-level BPE scoring (hat/eval/exact_bpe.py) against brute force.

A small SentencePiece BPE is trained here on text the test makes, and a tiny random-weight
BPE LM scores with it; every identity below holds for any weights.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from flax import nnx

from hat import config as C
from hat.eval.exact_bpe import ExactBPE, hard_boundary
from hat.eval.loglik import Scorer
from hat.models import build_model
from hat.text import bpe

_WORDS = ["the", "then", "there", "that", "this", "these", "thin", "think", "fox", "for",
          "form", "forms", "over", "overt", "cat", "cats", "caterpillar", "über", "naïve",
          "日本", "1234", "hello,", "world."]
SMALL = ["model.backbone.num_layers=1", "model.backbone.d_model=32",
         "model.backbone.num_heads=2", "model.backbone.num_kv_heads=2",
         "model.backbone.head_dim=16", "model.backbone.mlp_dim=64", "data.max_tokens=96"]
TEXT = ("the cat sat over the caterpillar, then there was naïve über-thinking: "
        "жук 日本 1234 forms.").encode()


def _corpus(n_docs=30, n_words=200, seed=0):
  rng = random.Random(seed)
  seps = [" ", " ", " ", "  ", "\n", ", "]
  return ["".join(rng.choice(_WORDS) + rng.choice(seps) for _ in range(n_words))
          for _ in range(n_docs)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return bpe.train_bpe(_corpus(), 320, tmp_path_factory.mktemp("xbpe") / "x.model")


@pytest.fixture(scope="module")
def scorers(tok):
  cfg = C.resolve("configs/tiny_bpe.py", SMALL + [f"model.vocab_size={tok.vocab_size}"])
  model = build_model(cfg, vocab_size=tok.vocab_size, rngs=nnx.Rngs(1))
  return (Scorer(model, cfg, tok, batch_size=8, exact=True),
          Scorer(model, cfg, tok, batch_size=8))


def _row_mass(scorer, rows):
  """log P(tokens) of each full token sequence, BOS first."""
  out = []
  for ids, (lp, _) in zip(rows, scorer._score_rows([tuple(r) for r in rows])):
    out.append(float(np.sum(lp[:len(ids)], dtype=np.float64)))
  return out


def _brute_log_prefix_prob(scorer, tok, x: bytes, valid_only=True) -> float:
  """log of the summed probability of every (valid) cover of x, found by blind search."""
  pieces = [tok.decode([i]) for i in range(tok.vocab_size)]
  ids_of: dict[bytes, list[int]] = {}
  for t, p in enumerate(pieces):
    ids_of.setdefault(p, []).append(t)
  covers = []

  def walk(pos, seq):
    for k in range(1, len(x) - pos):  # a token strictly inside x
      for t in ids_of.get(x[pos:pos + k], []):
        walk(pos + k, seq + [t])
    # the last token: holds x's end, may reach past it
    covers.extend(seq + [t] for t, p in enumerate(pieces) if p and p.startswith(x[pos:]))

  walk(0, [])
  if valid_only:
    covers = [c for c in covers if tok.encode(tok.decode(c)) == c]
  mass = _row_mass(scorer, covers)
  return float(np.logaddexp.reduce(mass)), len(covers)


def test_space_after_a_non_space_is_a_hard_boundary(tok):
  rng = random.Random(3)
  for _ in range(200):
    words = [rng.choice(_WORDS + ["\u2581", "\n", "\xff"]) for _ in range(6)]
    text = " ".join(words).encode("utf-8", "surrogateescape")
    for j in range(1, len(text)):
      h = hard_boundary(text, j)
      assert tok.encode(text) == tok.encode(text[:h]) + tok.encode(text[h:])


@pytest.mark.parametrize("x", [b"th", b"the", b"the ", b"a the", b"cat ca", b"\xc3",
                               "na\u00efv".encode(), "ж".encode()[:1], b"12"])
def test_exact_prefix_probability_is_the_sum_over_all_valid_covers(scorers, tok, x):
  exact, _ = scorers
  got = exact.loglikelihood(b"", x).logprob
  want, n = _brute_log_prefix_prob(exact, tok, x)
  assert n >= 1
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The validity restriction matters: invalid covers carry mass for a random model.
  if len(x) > 1:
    assert _brute_log_prefix_prob(exact, tok, x, valid_only=False)[0] > want


@pytest.mark.parametrize("cut,where", [
    (2, "mid-word"), (3, "before a space"), (4, "after a space"), (16, "before a space"),
    (17, "after a space"), (25, "mid-word"), (57, "inside a 2-byte character"),
    (73, "inside a byte-fallback character"), (75, "inside a byte-fallback character"),
    (80, "inside a CJK character"), (88, "between digits")])
def test_exact_scores_add_up_at_any_split(scorers, cut, where):
  exact, _ = scorers
  a, b, c = TEXT[:cut], TEXT[cut:cut + 6], TEXT[cut + 6:]
  whole, first, second = exact.loglikelihood_many([(a, b + c), (a, b), (a + b, c)])
  np.testing.assert_allclose(whole.logprob, first.logprob + second.logprob, rtol=1e-5,
                             err_msg=where)
  assert whole.logprob < first.logprob < 0


def test_byte_fallback_split_points_really_are_inside_characters(tok):
  assert [tok.decode([i]) for i in tok.encode("жук".encode())][:2] == [b"\xd0", b"\xb6"]
  assert TEXT[72:74] == b"\xd0\xb6" and TEXT[74:76] == "у".encode()


def test_lm_eval_path_is_exact_with_word_boundaries_at_a_canonical_cut(scorers, tok):
  # Before a space, encode(a) + encode(b) is the canonical encoding of a + b, so the
  # lm-eval value is log B(a + b) - log B(a), B(x) = P(canonical tokens of x), i.e. x
  # followed by a token boundary. The exact value swaps each B for the prefix
  # probability P; the difference is the two word-boundary terms.
  exact, old = scorers
  a, b = b"the cat", b" sat"
  lm_eval = old.loglikelihood(a, b).logprob
  log_b = {x: _row_mass(exact, [tok.encode(x)])[0] for x in (a, a + b)}
  log_p = {x: _brute_log_prefix_prob(exact, tok, x)[0] for x in (a, a + b)}
  np.testing.assert_allclose(lm_eval, log_b[a + b] - log_b[a], rtol=1e-5)
  np.testing.assert_allclose(exact.loglikelihood(a, b).logprob,
                             lm_eval + (log_p[a + b] - log_b[a + b]) - (log_p[a] - log_b[a]),
                             rtol=1e-5)
  # Cut inside the last token instead, the lm-eval value is no such probability.
  last = tok.decode(tok.encode(a + b)[-1:])
  assert len(last) > 1
  a2, b2 = (a + b)[:len(a + b) - len(last) + 1], (a + b)[len(a + b) - len(last) + 1:]
  assert tok.encode(a2) + tok.encode(b2) != tok.encode(a + b)
  log_b2 = _row_mass(exact, [tok.encode(a2)])[0]
  assert abs(old.loglikelihood(a2, b2).logprob - (log_b[a + b] - log_b2)) > 1e-3


def test_too_many_cover_rows_is_a_clear_error(tok, scorers):
  exact, _ = scorers
  small = ExactBPE(tok, max_tokens=96, max_rows=1)
  with pytest.raises(ValueError, match="max_rows=1"):
    small.loglikelihood_many([(b"the ca", b"t sat ov")], exact._score_rows)


def test_stats_count_rows_and_covers(scorers):
  exact, _ = scorers
  before = exact.exact.stats.requests
  exact.loglikelihood_many([(b"the cat", b" sat"), (b"the cat ", b"sat")])
  assert exact.exact.stats.requests == before + 2
  assert exact.exact.stats.covers >= exact.exact.stats.groups >= 2


def test_long_contexts_keep_their_most_recent_tokens(scorers, tok):
  exact, _ = scorers
  long = TEXT * 4  # far more than data.max_tokens=96 tokens
  assert len(tok.encode(long)) > 96
  s = exact.loglikelihood(long, b"the cat").logprob
  assert np.isfinite(s) and s < 0
  with pytest.raises(ValueError, match="max_tokens"):
    exact.loglikelihood(b"the", b" cat" * 200)
