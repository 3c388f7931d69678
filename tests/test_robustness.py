"""Robustness suite: examples, identical contexts across models, report files."""

import json
import random

import pytest
from flax import nnx

from hat import config as C
from hat.eval.loglik import Scorer
from hat.eval.robustness import degradation, evaluate_robustness, make_examples, write_report
from hat.models import build_model
from hat.text.tokenizers import ByteTokenizer

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima".split()


def _docs(n=6, seed=0):
  rng = random.Random(seed)
  return [" ".join(rng.choice(WORDS) for _ in range(80)).encode() for _ in range(n)]


def _scorer(kind):
  cfg = C.resolve(f"configs/tiny_{kind}.py", [])
  model = build_model(cfg.model, vocab_size=259, rngs=nnx.Rngs(0), row_len=cfg.data.row_len)
  return Scorer(model, cfg, ByteTokenizer() if kind == "byte" else None, batch_size=8)


def test_examples_are_deterministic_and_well_formed():
  a = make_examples(_docs(), 5, context_bytes=60, continuation_bytes=30, seed=1)
  b = make_examples(_docs(), 5, context_bytes=60, continuation_bytes=30, seed=1)
  assert a == b and len(a) == 5
  for e in a:
    assert e.continuation.startswith(e.answer)
    assert all(len(d) == len(e.answer) and d != e.answer for d in e.distractors)
    assert len(e.context.encode()) <= 60


def test_too_short_documents_are_a_clear_error():
  with pytest.raises(ValueError, match="context-bytes"):
    make_examples([b"tiny"], 3)


def test_suite_runs_and_writes_report(tmp_path):
  examples = make_examples(_docs(), 4, context_bytes=60, continuation_bytes=30)
  scorers = {"hat": _scorer("hat"), "byte": _scorer("byte")}
  res = evaluate_robustness(scorers, examples, ["permute", "all_caps"], [0.0, 0.2])
  deg = degradation(res)
  for name in scorers:
    assert deg[name]["permute"][0.0] == 0.0
    assert res[name]["permute"][0.0] == res[name]["all_caps"][0.0]  # same clean contexts
    assert res[name]["all_caps"][0.2]["bpb"] != res[name]["all_caps"][0.0]["bpb"]
  md = write_report(res, tmp_path, {"examples": 4})
  assert "| permute | 0.2 |" in md.read_text()
  data = json.loads((tmp_path / "robustness.json").read_text())
  assert set(data["results"]) == {"hat", "byte"}
  assert (tmp_path / "robustness.png").stat().st_size > 1000
