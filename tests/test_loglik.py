"""Log-likelihood API: exact for any split point, greedy flag, multiple choice."""

import numpy as np
import pytest
from flax import nnx

from hat import config as C
from hat.eval.loglik import Scorer
from hat.models import build_model
from hat.text.tokenizers import ByteTokenizer

TEXT = "The quick brown fox jumps over the lazy dog. Ünïcödé 日本 too!".encode()


def _scorer(kind):
  cfg = C.resolve(f"configs/tiny_{kind}.py", [])
  model = build_model(cfg.model, vocab_size=259, rngs=nnx.Rngs(0), row_len=cfg.data.row_len)
  return Scorer(model, cfg, ByteTokenizer() if kind == "byte" else None, batch_size=4)


@pytest.fixture(scope="module", params=["hat", "byte"])
def scorer(request):
  return _scorer(request.param)


def test_scores_add_up_at_every_split_point(scorer):
  whole = scorer.loglikelihood(b"", TEXT).logprob
  cuts = [1, 4, 5, 6, 9, 10, 17, len(TEXT) - 3, 47, 48]  # mid-word, at spaces, mid-UTF-8
  reqs = []
  for cut in cuts:
    reqs += [(b"", TEXT[:cut]), (TEXT[:cut], TEXT[cut:])]
  scores = scorer.loglikelihood_many(reqs)
  for i, cut in enumerate(cuts):
    total = scores[2 * i].logprob + scores[2 * i + 1].logprob
    np.testing.assert_allclose(total, whole, rtol=1e-5, err_msg=f"split at byte {cut}")


def test_three_way_split(scorer):
  a, b, c = TEXT[:7], TEXT[7:22], TEXT[22:]
  lhs = scorer.loglikelihood(a, b + c).logprob
  rhs = scorer.loglikelihood(a, b).logprob + scorer.loglikelihood(a + b, c).logprob
  np.testing.assert_allclose(lhs, rhs, rtol=1e-5)


def test_counts_every_continuation_byte(scorer):
  s = scorer.loglikelihood("The quick", " brown")
  assert s.logprob < 0
  # HAT also scores the [W] closing "quick " (it ends inside the continuation).
  assert s.num_symbols == (7 if scorer.cfg.model.kind == "hat" else 6)


def test_choose_and_greedy_agree_with_scores(scorer):
  options = ["fox", "dog", "cat"]
  best, vals = scorer.choose("The quick brown ", options)
  assert best == int(np.argmax(vals)) and len(vals) == 3
  # Greedy decoding of an untrained model reproduces a continuation iff flagged greedy.
  s = scorer.loglikelihood("a", "b")
  assert isinstance(s.is_greedy, bool)


def test_too_long_continuation_is_a_clear_error():
  scorer = _scorer("byte")
  with pytest.raises(ValueError, match="max_tokens"):
    scorer.loglikelihood("", "x" * 10_000)
