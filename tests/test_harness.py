"""The lm-evaluation-harness adapter on small local tasks (no hub downloads)."""

import json
import os

import pytest
from flax import nnx

lm_eval = pytest.importorskip("lm_eval")

from hat import config as C  # noqa: E402
from hat.eval.harness import HarnessLM  # noqa: E402
from hat.models import build_model  # noqa: E402

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def lm():
  cfg = C.resolve("configs/tiny_hat.py", [])
  model = build_model(cfg.model, vocab_size=259, rngs=nnx.Rngs(0), row_len=cfg.data.row_len)
  return HarnessLM(model, cfg, batch_size=4, max_gen_bytes=8)


def _task(tmp_path, name, output_type, docs, **extra):
  path = tmp_path / f"{name}.jsonl"
  path.write_text("\n".join(json.dumps(d) for d in docs))
  cfg = {"task": name, "dataset_path": "json",
         "dataset_kwargs": {"data_files": {"test": str(path)}}, "test_split": "test",
         "output_type": output_type}
  cfg.update(extra)
  return cfg


def test_multiple_choice_rolling_and_generation_tasks(lm, tmp_path):
  mc = _task(tmp_path, "hat_local_mc", "multiple_choice",
             [{"q": "The cat sat on the", "choices": [" mat", " moon"], "label": 0},
              {"q": "One, two,", "choices": [" three", " banana"], "label": 0}],
             doc_to_text="{{q}}", doc_to_choice="{{choices}}", doc_to_target="{{label}}",
             target_delimiter="", metric_list=[{"metric": "acc"}])
  rolling = _task(tmp_path, "hat_local_ppl", "loglikelihood_rolling",
                  [{"text": "A short document to score as a whole."}],
                  doc_to_text="", doc_to_target="{{text}}",
                  metric_list=[{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}])
  gen = _task(tmp_path, "hat_local_gen", "generate_until",
              [{"q": "Say hi:", "a": "hi"}], doc_to_text="{{q}}", doc_to_target="{{a}}",
              generation_kwargs={"until": ["\n"], "max_gen_toks": 8},
              metric_list=[{"metric": "exact_match"}])
  res = lm_eval.simple_evaluate(model=lm, tasks=[mc, rolling, gen], limit=None,
                                bootstrap_iters=0, log_samples=False)
  results = res["results"]
  assert 0.0 <= results["hat_local_mc"]["acc,none"] <= 1.0
  assert results["hat_local_ppl"]["bits_per_byte,none"] > 0
  assert results["hat_local_gen"]["exact_match,none"] in (0.0, 1.0)


class _Request:
  def __init__(self, *args):
    self.args = args


def test_generate_until_batches_requests_by_options_in_order(lm):
  """Requests of two option groups, decoded `batch_size` rows at a time, come back in
  request order with the bytes of one `generate` each (greedy)."""
  from hat.generate import SampleOptions
  texts = ["The cat", "One, two,", "A", "Once upon a time", "x", "Hello there", "Q:"]
  reqs = [_Request(t, {"until": ["\n"] if i % 2 else "e", "max_gen_toks": 6 + i % 2})
          for i, t in enumerate(texts)]
  compiled = lm.sampler.compile_counts()["chunk"]
  got = lm.generate_until(reqs)
  assert lm.sampler.compile_counts()["chunk"] == compiled + 2  # groups of 4 and 3 rows
  for i, t in enumerate(texts):
    opts = SampleOptions(temperature=0.0, max_new_bytes=6 + i % 2,
                         stop=("\n",) if i % 2 else ("e",))
    assert got[i] == lm.sampler.generate(t.encode(), opts).decode("utf-8", "replace"), i
