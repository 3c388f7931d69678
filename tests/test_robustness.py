"""Robustness suite: examples at both cuts, identical contexts, intervals, report files."""

import json
import math
import random

import numpy as np
import pytest
from flax import nnx

from hat import config as C
from hat.eval.loglik import Scorer
from hat.eval.robustness import degradation, evaluate_robustness, make_examples
from hat.eval.robustness_report import load, report_of, write_report
from hat.eval.robustness_stats import summarize
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
    # Canonical cut: the context ends a word, the continuation and options start with
    # the space and the continuation ends at a word end.
    assert e.continuation.startswith(e.answer) and e.answer.startswith(" ")
    assert not e.context[-1].isspace() and e.continuation[1] != " "
    assert e.continuation[-1] != " " and len(e.continuation.encode()) <= 30
    assert all(len(d) == len(e.answer) and d != e.answer and d[0] == " "
               for d in e.distractors)
    assert len(e.context.encode()) <= 60


def test_word_start_cut_moves_only_the_space():
  canon = make_examples(_docs(), 5, context_bytes=60, continuation_bytes=30, seed=1)
  old = make_examples(_docs(), 5, context_bytes=60, continuation_bytes=30, seed=1,
                      cut="word_start")
  for c, o in zip(canon, old):
    assert o.context == c.context + " " and " " + o.continuation == c.continuation
    assert " " + o.answer == c.answer and tuple(" " + d for d in o.distractors) == \
        c.distractors
  with pytest.raises(ValueError, match="cut must be one of"):
    make_examples(_docs(), 1, cut="middle")


def test_too_short_documents_are_a_clear_error():
  with pytest.raises(ValueError, match="context-bytes"):
    make_examples([b"tiny"], 3)


def _fake_raw(n=40, seeds=2, seed=0):
  """Two models on the same clean text; 'b' suffers more from the perturbation and has a
  lower cloze accuracy under it."""
  rng = np.random.default_rng(seed)
  clean = -rng.uniform(20, 40, size=n)
  out = {}
  for m, hurt, acc in (("a", 0.05, 0.9), ("b", 0.3, 0.5)):
    by_rate = {}
    for rate in (0.0, 0.1):
      lls = [clean * (1 + (hurt + 0.01 * rng.standard_normal(n) if rate else 0))
             for _ in range(seeds)]
      right = rng.random((seeds, n)) < (acc if rate else 0.95)
      cloze = np.where(right[..., None], [[-1.0, -2.0, -3.0]], [[-2.0, -1.0, -3.0]])
      by_rate[rate] = {"ll": np.asarray(lls).tolist(), "cloze_ll": cloze.tolist()}
    out[m] = {"permute": by_rate}
  return out


def test_intervals_are_paired_and_say_whether_they_exclude_zero():
  raw = _fake_raw()
  n = 40
  s = summarize(raw, [30] * n, bootstrap=500)
  r = s["results"]["a"]["permute"][0.1]
  lo, hi = r["bpb_ci95"]
  assert lo < r["bpb"] < hi
  want = -np.mean(raw["a"]["permute"][0.1]["ll"], 0).sum() / (math.log(2) * 30 * n)
  assert r["bpb"] == pytest.approx(want)
  assert s["results"]["a"]["permute"][0.0]["degradation"] == 0.0
  assert r["degradation_excludes_zero"] and r["degradation"] > 0
  d = s["comparisons"]["a - b"]["permute"][0.1]
  assert d["degradation"] == pytest.approx(
      r["degradation"] - s["results"]["b"]["permute"][0.1]["degradation"])
  # Same clean text for both: the paired interval on the degradation gap is tight and
  # excludes zero; the clean bpb gap is exactly zero.
  assert d["degradation_excludes_zero"] and d["degradation_ci95"][1] < 0
  assert s["comparisons"]["a - b"]["permute"][0.0]["bpb"] == 0.0
  assert d["cloze_acc_excludes_zero"] and d["cloze_acc"] > 0
  assert r["bpb_seed_sd"] > 0


def test_suite_runs_and_writes_report(tmp_path):
  examples = make_examples(_docs(), 4, context_bytes=60, continuation_bytes=30)
  scorers = {"hat": _scorer("hat"), "byte": _scorer("byte")}
  rep = evaluate_robustness(scorers, examples, ["permute", "all_caps"], [0.0, 0.2], seeds=2,
                            bootstrap=200)
  res = rep["results"]
  deg = degradation(res)
  for name in scorers:
    assert deg[name]["permute"][0.0] == 0.0
    assert res[name]["permute"][0.0] == res[name]["all_caps"][0.0]  # same clean contexts
    assert res[name]["all_caps"][0.2]["bpb"] != res[name]["all_caps"][0.0]["bpb"]
    assert deg[name]["permute"][0.2] == pytest.approx(res[name]["permute"][0.2]["degradation"])
    ll = rep["per_example"][name]["permute"][0.2]["ll"]
    assert len(ll) == 2 and len(ll[0]) == 4 and ll[0] != ll[1]  # two perturbation seeds
  md = write_report(rep, tmp_path, {"examples": 4}, examples)
  text = md.read_text()
  assert "| permute | 0.2 |" in text and "## Paired difference: hat - byte" in text
  data = load(tmp_path / "robustness.json")
  assert set(data["results"]) == {"hat", "byte"}
  assert len(data["per_example"]["hat"]["permute"]["0.2"]["cloze_ll"][0][0]) == 4
  assert data["examples"][0]["continuation_bytes"] == len(examples[0].continuation.encode())
  assert (tmp_path / "robustness.png").stat().st_size > 1000
  # The JSON alone rebuilds the same report.
  again = write_report(report_of(data), tmp_path / "again", {"examples": 4}).read_text()
  assert again == text
  # Plain point figures (no per-example scores) still make a report, without intervals.
  plain = {m: {k: {r: {"bpb": v["bpb"], "cloze_acc": v["cloze_acc"]} for r, v in by.items()}
               for k, by in res[m].items()} for m in res}
  text = write_report(plain, tmp_path / "plain", {"examples": 4}).read_text()
  assert "| permute | 0.2 |" in text and "Point figures only" in text and "| - |" in text
  with pytest.raises(ValueError, match="format"):
    (tmp_path / "bad.json").write_text(json.dumps({"format": 1}))
    load(tmp_path / "bad.json")


@pytest.mark.parametrize("flags,message", [
    (["--seeds", "0"], "--seeds must be >= 1"), (["--cut", "middle"], "invalid choice"),
    (["--bootstrap", "0"], "--bootstrap must be >= 1")])
def test_command_line_rejects_bad_flags_in_one_line(tmp_path, capsys, flags, message):
  from hat.robustness import main  # pylint: disable=g-import-not-at-top

  with pytest.raises(SystemExit) as e:
    main(["--run", f"a={tmp_path}", "--out", str(tmp_path / "o"), *flags])
  assert e.value.code == 2 and message in capsys.readouterr().err
