"""Loss decomposition (hat.eval.decompose): word NLLs reconcile with the evaluator, the
token split rule, bucket assignment, the report files and the command line."""

from __future__ import annotations

import collections
import importlib.util
import json
import math
import os

import numpy as np
import pytest
from flax import nnx

from test_train import ROOT, write_corpus
from hat.config import resolve
from hat.eval import decompose as dec
from hat.eval.decompose_report import write_report
from hat.eval.word_buckets import GROUPS, FrequencyRanks, classify, count_words
from hat.family import family_of
from hat.text.codec import S_ID, W_ID

# Random-weight ~30k-parameter models; capacities small enough that windows carry over
# into a second sequence (HAT: max_units, BPE: max_tokens) and the last batch is padded.
SMALL = [
    "model.backbone.num_layers=1", "model.backbone.d_model=32", "model.backbone.num_heads=2",
    "model.backbone.num_kv_heads=2", "model.backbone.head_dim=16", "model.backbone.mlp_dim=64",
    *(f"model.{s}.{k}" for s in ("encoder", "decoder") for k in (
        "d_model=16", "num_heads=1", "num_kv_heads=1", "head_dim=16", "mlp_dim=32")),
    "data.window_bytes=128", "data.max_units=16", "data.row_len=32", "data.num_rows=6",
    "data.max_tokens=24", "data.batch_size=3", "data.validation_fraction=0.05",
]


class _Tok:
  """A hand-made tokenizer: the pieces of `test_token_split_rule_by_hand`."""

  pieces = [b"", b"", b"the", b" cat", b" ", b" sat"]
  eos_id = 1

  def decode(self, ids):
    return b"".join(self.pieces[i] for i in ids)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{family: (model, cfg, tokenizer)} of a random-weight HAT and BPE model on one corpus."""
  d = tmp_path_factory.mktemp("decompose")
  corpus = write_corpus(d / "corpus.txt")
  old = os.environ.get("HAT_CACHE")
  os.environ["HAT_CACHE"] = str(d / "cache")
  from hat.text import bpe  # pylint: disable=g-import-not-at-top

  bpe.train_bpe(corpus.read_text(encoding="utf-8").split("\n\n"), 300, d / "bpe.model")
  out = {}
  for family in ("hat", "bpe"):
    cfg = resolve(str(ROOT / "configs" / f"tiny_{family}.py"),
                  [*SMALL, f"data.train=text:{corpus}", f"data.tokenizer={d / 'bpe.model'}"])
    fam = family_of(cfg)
    tok = fam.load_tokenizer(cfg)
    model = fam.build_model(cfg, fam.vocab_size(cfg, tok), nnx.Rngs(0))
    out[family] = (model, cfg, tok)
  yield out
  if old is None:
    os.environ.pop("HAT_CACHE", None)
  else:
    os.environ["HAT_CACHE"] = old


@pytest.fixture(scope="module")
def scored(runs):
  """(docs, words, {family: Attribution}) on the runs' validation split."""
  docs = dec.eval_documents(runs["hat"][1], "valid")
  assert docs == dec.eval_documents(runs["bpe"][1], "valid")
  words = dec.text_words(docs)
  atts = {f: dec.attribute_run(m, c, t, docs, words, progress=False)
          for f, (m, c, t) in runs.items()}
  return docs, words, atts


@pytest.mark.parametrize("family", ["hat", "bpe"])
def test_word_nll_reconciles_with_the_evaluator(runs, scored, family):
  from hat.eval.evaluate import evaluate_sets  # pylint: disable=g-import-not-at-top

  model, cfg, tok = runs[family]
  docs, words, atts = scored
  att = atts[family]
  expected = evaluate_sets(model, cfg, tok, ["valid"])["valid"]
  assert len(words.data) == int(expected["bytes"]) == sum(map(len, docs))
  assert att.num_targets == int(expected["targets"])
  np.testing.assert_allclose(att.total_W.sum(), att.total_nll, rtol=1e-12)
  bpb = att.total_W.sum() / (math.log(2.0) * len(words.data))
  np.testing.assert_allclose(bpb, expected["bpb"], rtol=1e-5)
  shares = dec.part_shares(att)["shares"]
  assert set(shares) == set(dec.PARTS)
  np.testing.assert_allclose(sum(shares.values()), 1.0, rtol=1e-12)
  assert all(v >= 0 for v in shares.values())
  # Every document pays exactly one end-of-document symbol, on its last word.
  last_W = np.flatnonzero(np.diff(np.append(words.doc_W, -1)) != 0)
  assert (att.parts["doc_end"][last_W] > 0).all()
  assert att.parts["doc_end"].sum() == pytest.approx(att.parts["doc_end"][last_W].sum())
  if family == "hat":  # whitespace splitter, words shorter than the cap: one [W] per word
    assert (att.parts["word_end"] > 0).all()


def test_windows_carry_so_the_test_covers_it(runs, scored):
  from hat.text.splitter import Splitter  # pylint: disable=g-import-not-at-top
  from hat.data.windows import windows_of  # pylint: disable=g-import-not-at-top

  docs, padded = scored[0], []
  for family, (_, cfg, tok) in runs.items():
    layout = family_of(cfg).layout_fn(cfg, tok)
    split = Splitter(cfg.data.splitter, cfg.data.max_word_bytes).split
    seqs = [s for w in windows_of(docs, split, cfg.data.window_bytes) for s in layout(w)]
    assert any(s["overflow_B"] for s in seqs), family
    padded.append(len(seqs) % cfg.data.batch_size > 0)
  assert any(padded)  # a last batch filled up with empty sequences


def test_token_split_rule_by_hand():
  words = dec.text_words([b"the cat  sat"])
  assert [words.word(i) for i in range(len(words))] == [b"the ", b"cat  ", b"sat"]
  targets = np.asarray([2, 3, 4, 5, 1])  # "the" " cat" " " " sat" EOS
  nll = np.asarray([1.0, 2.0, 0.5, 4.0, 0.3])
  lens_V = np.asarray([len(p) for p in _Tok.pieces])
  att = dec.attribute_tokens(words, targets, nll, _Tok(), lens_V)
  # " cat": 1 of 4 bytes is the space of "the ", 3 are "cat"; " sat": 1 to "cat  ", 3 to "sat".
  np.testing.assert_allclose(att.total_W, [1.0 + 2.0 / 4, 2.0 * 3 / 4 + 0.5 + 4.0 / 4,
                                           4.0 * 3 / 4 + 0.3])
  np.testing.assert_allclose(att.parts["first"], [1.0, 2.0 * 3 / 4, 4.0 * 3 / 4])
  np.testing.assert_allclose(att.parts["later"], [2.0 / 4, 0.5 + 4.0 / 4, 0.0])
  np.testing.assert_allclose(att.parts["doc_end"], [0, 0, 0.3])
  assert att.total_W.sum() == pytest.approx(nll.sum())
  per_byte, tok_of_byte = dec.split_token_nll(lens_V[targets], nll)
  np.testing.assert_allclose(per_byte, [1 / 3] * 3 + [0.5] * 4 + [0.5] + [1.0] * 4)
  assert tok_of_byte.tolist() == [0] * 3 + [1] * 4 + [2] + [3] * 4
  with pytest.raises(ValueError, match="do not spell"):
    dec.attribute_tokens(words, targets[1:], nll[1:], _Tok(), lens_V)


def test_hat_parts_by_hand():
  words = dec.text_words([b"ab c", b"d"])
  targets = np.asarray([*b"ab ", W_ID, *b"c", W_ID, S_ID, *b"d", W_ID, S_ID])
  nll = np.arange(1.0, len(targets) + 1)
  att = dec.attribute_hat(words, targets, nll)
  assert att.parts["first"].tolist() == [1.0, 5.0, 8.0]
  assert att.parts["later"].tolist() == [2.0 + 3.0, 0.0, 0.0]
  assert att.parts["word_end"].tolist() == [4.0, 6.0, 9.0]
  assert att.parts["doc_end"].tolist() == [0.0, 7.0, 10.0]
  assert att.total_W.sum() == nll.sum()


def test_bucket_assignment_on_hand_made_words():
  counts = collections.Counter({f"w{i}".encode(): 20_000 - i for i in range(10_005)})
  counts.update([b"the", b"the"])
  ranks = FrequencyRanks(counts)
  assert ranks.bucket(b"w0") == "top 1k" and ranks.bucket(b"w998") == "top 1k"
  assert ranks.bucket(b"w999") == "top 1k" and ranks.bucket(b"w1000") == "1k-10k"
  assert ranks.bucket(b"w5000") == "1k-10k" and ranks.bucket(b"the") == "rare (>10k)"
  assert ranks.bucket(b"The") == "unseen"  # case-sensitive
  cases = {
      b"w3": ("top 1k", "1-2", "not capitalised", "has digit", "no punct"),
      b"Hello,": ("unseen", "5-6", "capitalised", "no digit", "punct attached"),
      b'"Their': ("unseen", "5-6", "capitalised", "no digit", "punct attached"),
      b"caf\xc3\xa9": ("unseen", "5-6", "not capitalised", "no digit", "no punct"),
      b"1999.": ("unseen", "5-6", "not capitalised", "has digit", "punct attached"),
      b"don't": ("unseen", "5-6", "not capitalised", "no digit", "no punct"),
      b"extraordinary": ("unseen", "10+", "not capitalised", "no digit", "no punct"),
      b"a": ("unseen", "1-2", "not capitalised", "no digit", "no punct"),
      b"cat": ("unseen", "3-4", "not capitalised", "no digit", "no punct"),
      b"Windows": ("unseen", "7-9", "capitalised", "no digit", "no punct"),
      b"": ("whitespace only", "whitespace only", "not capitalised", "no digit", "no punct"),
  }
  for word, want in cases.items():
    assert tuple(classify(word, ranks).values()) == want, word
  assert tuple(classify(b"x", ranks)) == tuple(GROUPS)


def test_count_words_and_select_documents():
  counts, used = count_words([b"a b  a\n", b"c\ta", b"a z"])
  assert counts == {b"a": 4, b"b": 1, b"c": 1, b"z": 1} and used == 13
  counts, used = count_words([b"a b", b"c", b"d"], max_bytes=4)
  assert counts == {b"a": 1, b"b": 1, b"c": 1} and used == 4
  assert dec.select_documents([b"ab", b"", b"cd", b"ef"], 5) == [b"ab", b"cd"]
  assert dec.select_documents([b"one two three", b"x"], 9) == [b"one two "]
  words = dec.text_words([b"  lead x\n", b"y"])  # leading whitespace: a word of its own
  assert [words.word(i) for i in range(len(words))] == [b"  ", b"lead ", b"x\n", b"y"]
  assert words.doc_W.tolist() == [0, 0, 0, 1]


def test_decompose_tables_and_report(scored, tmp_path):
  docs, words, atts = scored
  counts, _ = count_words(docs[:2])
  result = dec.decompose({"HAT": atts["hat"], "BPE": atts["bpe"]}, words,
                         FrequencyRanks(counts))
  gap = result["gap_bits"]
  assert gap == pytest.approx((atts["hat"].total_nll - atts["bpe"].total_nll) / math.log(2))
  for group, rows in result["groups"].items():
    assert [r["bucket"] for r in rows] == list(GROUPS[group])
    assert sum(r["bytes"] for r in rows) == result["bytes"] == len(words.data)
    assert sum(r["words"] for r in rows) == result["words"]
    assert sum(r["gap_share"] for r in rows) == pytest.approx(1.0)
    for run in ("HAT", "BPE"):
      assert sum(r["bits"][run] for r in rows) == pytest.approx(result["totals"][run]["bits"])
    for r in rows:
      for run in ("HAT", "BPE"):
        assert sum(r["part_bits"][run].values()) == pytest.approx(r["bits"][run], abs=1e-9)
      if r["bytes"]:
        assert r["ratio"] == pytest.approx(r["bpb"]["HAT"] / r["bpb"]["BPE"])
  assert {r["bucket"]: r["words"] for r in result["groups"]["frequency"]}["top 1k"] > 0
  assert result["top_gap_words"][0]["gap_bits"] >= result["top_gap_words"][-1]["gap_bits"]
  md = write_report(result, tmp_path / "out", {"text": "test"})
  data = json.loads((tmp_path / "out" / "decompose.json").read_text())
  assert data["totals"]["HAT"]["bpb"] == pytest.approx(result["totals"]["HAT"]["bpb"])
  assert data["parts"]["HAT"]["labels"]["word_end"] == "[W]"
  text = md.read_text()
  assert "| top 1k |" in text and "## Where in a word" in text and "| HAT first |" in text
  assert (tmp_path / "out" / "decompose.png").read_bytes()[:4] == b"\x89PNG"


def test_command_line_checks_its_flags(capsys):
  tool = _tool()
  args = tool.parse_args(["--run", "A=x", "--run", "B=y", "--out", "o", "--max-bytes", "10"])
  assert args.runs == {"A": "x", "B": "y"} and args.max_bytes == 10 and args.eval is None
  for bad, msg in ((["--run", "A=x"], "exactly two"), (["--run", "A", "--run", "B=y"],
                                                        "NAME=WORKDIR"),
                   (["--run", "A=x", "--run", "A=y"], "twice"),
                   (["--run", "A=x", "--run", "B=y", "--max-bytes", "0"], "positive"),
                   (["--run", "A=x", "--run", "B=y", "--eval", "v", "--text", "f"],
                    "not allowed")):
    with pytest.raises(SystemExit):
      tool.parse_args([*bad, "--out", "o"])
    assert msg in capsys.readouterr().err


def _tool():
  spec = importlib.util.spec_from_file_location("_decompose_tool", ROOT / "tools/decompose.py")
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  return tool


def test_command_line_end_to_end(runs, tmp_path, monkeypatch, capsys):
  import dataclasses  # pylint: disable=g-import-not-at-top

  from hat import rundir  # pylint: disable=g-import-not-at-top

  by_dir = {"h": runs["hat"], "b": runs["bpe"]}
  monkeypatch.setattr(rundir, "load_for_inference", lambda workdir: by_dir[workdir])
  out = tmp_path / "out"
  assert _tool().main(["--run", "HAT=h", "--run", "BPE=b", "--max-bytes", "1500",
                       "--out", str(out), "--no-progress"]) == 0
  data = json.loads((out / "decompose.json").read_text())
  assert data["meta"]["families"] == {"HAT": "hat", "BPE": "bpe"}
  assert 0 < data["bytes"] <= 1500 and data["meta"]["train_bytes"] > 10 * data["bytes"]
  assert "| top 1k |" in capsys.readouterr().out
  # Runs whose eval set is not the same text: a one-line error, not a comparison.
  model, cfg, tok = runs["bpe"]
  other = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data,
                                                            validation_fraction=0.1))
  by_dir["b"] = (model, other, tok)
  assert _tool().main(["--run", "HAT=h", "--run", "BPE=b", "--out", str(out)]) == 2
  assert "is not the same text" in capsys.readouterr().err
