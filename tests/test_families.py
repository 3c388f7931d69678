"""Every model family through every capability: one trained tiny run per family.

The five families of `hat.family` (plain, delete-gated and merge HAT, BPE, byte LM) are
each trained for a few steps on the same synthetic text; the runs are shared by the tests
below, which cover what a user does with a run: batch shapes as AOT compiles them, the
loss, exact log-likelihood additivity, cached generation against the uncached reference,
and the command-line front ends (generate, evaluate, robustness, the lm-eval adapter),
called in-process.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from test_train import ROOT, write_corpus
from hat.config import resolve
from hat.family import FAMILIES, family_of

FAMILY_NAMES = tuple(FAMILIES)
CONFIG_FILES = {"hat": "tiny_hat", "hat_delete": "tiny_hat_delete",
                "hat_merge": "tiny_hat_merge", "bpe": "tiny_bpe", "byte": "tiny_byte"}
# A ~30k-parameter model of each family on 128-byte windows: compile time dominates.
SMALL = [
    "model.backbone.num_layers=1", "model.backbone.d_model=32", "model.backbone.num_heads=2",
    "model.backbone.num_kv_heads=2", "model.backbone.head_dim=16", "model.backbone.mlp_dim=64",
    *(f"model.{s}.{k}" for s in ("encoder", "decoder") for k in (
        "d_model=16", "num_heads=1", "num_kv_heads=1", "head_dim=16", "mlp_dim=32")),
    "data.window_bytes=128", "data.max_units=48", "data.row_len=32", "data.num_rows=8",
    "data.max_tokens=160", "data.batch_size=4", "steps=3", "log_every=1", "ckpt_every=0",
    "eval_every=0", "eval_batches=1", "sample_bytes=0", "optim.warmup_steps=1",
    "optim.lr=3e-3", "mesh=data=1",
]
EXTRA = {"hat_delete": ["model.gate.delete.layer=0"],  # one backbone layer: gate on inputs
         "hat_merge": ["model.gate.merge.capacity=0"]}  # derived at validation

Run = collections.namedtuple("Run", "family workdir cfg model tokenizer")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
  d = tmp_path_factory.mktemp("families")
  path = write_corpus(d / "corpus.txt")
  os.environ["HAT_CACHE"] = str(d / "cache")
  from hat.text import bpe  # pylint: disable=g-import-not-at-top

  text = path.read_text(encoding="utf-8").split("\n\n")
  bpe.train_bpe(text, 300, d / "bpe.model")
  return d, path


def _cfg(family: str, corpus_path: pathlib.Path, tok_path: pathlib.Path):
  over = [*SMALL, f"data.train=text:{corpus_path}", *EXTRA.get(family, [])]
  if family == "bpe":
    over.append(f"data.tokenizer={tok_path}")
  return resolve(str(ROOT / "configs" / f"{CONFIG_FILES[family]}.py"), over)


class _Runs(dict):
  """family -> Run, each trained for 3 steps on first use and loaded back as a user would."""

  def __init__(self, corpus):
    super().__init__()
    self.dir, self.corpus = corpus

  def __missing__(self, family: str) -> Run:
    from hat.rundir import load_for_inference  # pylint: disable=g-import-not-at-top
    from hat.train.loop import train  # pylint: disable=g-import-not-at-top

    cfg = _cfg(family, self.corpus, self.dir / "bpe.model")
    workdir = self.dir / "runs" / family
    result = train(cfg, workdir, progress=False)
    assert result.step == cfg.steps
    model, loaded_cfg, tok = load_for_inference(workdir)
    assert loaded_cfg == cfg  # the run's config, derived capacities included
    self[family] = Run(family, workdir, cfg, model, tok)
    return self[family]


@pytest.fixture(scope="session")
def runs(corpus):
  return _Runs(corpus)


def test_the_registry_knows_every_config():
  for family, file in CONFIG_FILES.items():
    assert family_of(resolve(str(ROOT / "configs" / f"{file}.py"), [])).name == family


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_real_batches_have_the_abstract_shapes_and_a_finite_loss(runs, family):
  from hat.data import pipeline  # pylint: disable=g-import-not-at-top
  from hat.models import loss_and_metrics  # pylint: disable=g-import-not-at-top

  run = runs[family]
  fam = family_of(run.cfg)
  it = pipeline.make_train_iterator(run.cfg, run.tokenizer, process_index=0, process_count=1)
  batch = next(it)
  want = fam.batch_shapes(run.cfg, run.cfg.data.batch_size)
  assert {k: (v.shape, str(v.dtype)) for k, v in batch.items()} == \
         {k: (tuple(s), d) for k, (s, d) in want.items()}
  loss, metrics = jax.jit(lambda b: loss_and_metrics(run.model, b))(
      {k: jnp.asarray(v) for k, v in batch.items()})
  assert np.isfinite(float(loss)) and float(metrics["num_targets"]) > 0
  n_params = sum(int(x.size) for x in jax.tree.leaves(nnx.state(run.model, nnx.Param)))
  assert n_params == fam.param_counts(run.cfg, fam.vocab_size(run.cfg, run.tokenizer))["total"]


# Splits: inside a word for the byte-exact families; before a space for BPE, the one place
# where scoring a token model piecewise is exact (its pieces never cross whitespace).
_TEXT = (b"the quick brown fox jumps over a lazy dog while language models read ",
         b"byt", b"es and words")
_BPE_TEXT = (b"the quick brown fox jumps over a lazy dog while language", b" models read",
             b" bytes and words")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_log_likelihood_adds_up_across_a_split(runs, family):
  from hat.eval.loglik import Scorer  # pylint: disable=g-import-not-at-top

  run = runs[family]
  a, b, c = _BPE_TEXT if family == "bpe" else _TEXT
  scorer = Scorer(run.model, run.cfg, run.tokenizer, batch_size=4)
  whole, first, second = scorer.loglikelihood_many([(a, b + c), (a, b), (a + b, c)])
  assert whole.logprob == pytest.approx(first.logprob + second.logprob, abs=1e-3)
  assert whole.logprob < 0


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_cached_greedy_generation_equals_the_reference(runs, family):
  from hat.generate import SampleOptions  # pylint: disable=g-import-not-at-top

  run = runs[family]
  fam = family_of(run.cfg)
  opts = SampleOptions(temperature=0.0, max_new_bytes=24)
  prompts = [b"the quick bro", b"a lazy dog "]
  cached = fam.make_sampler(run.model, run.cfg, run.tokenizer)
  reference = fam.make_sampler(run.model, run.cfg, run.tokenizer, cached=False)
  got = cached.generate_batch(prompts, opts)
  want = [reference.generate(p, opts) for p in prompts]
  assert got == want
  assert all(len(g) <= 24 for g in got)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_command_line_front_ends(runs, family, tmp_path, capsys):
  from hat import evaluate, robustness  # pylint: disable=g-import-not-at-top
  from hat.generate import cli as generate  # pylint: disable=g-import-not-at-top

  run = runs[family]
  wd = str(run.workdir)
  assert generate.main(["--workdir", wd, "--prompt", "the quick bro", "--max-new-bytes", "8",
                        "--temperature", "0"]) == 0
  assert "the quick bro" in capsys.readouterr().out
  assert evaluate.main(["--workdir", wd, "--max-batches", "1", "--out",
                        str(tmp_path / "e.json")]) == 0
  res = json.loads((tmp_path / "e.json").read_text())
  assert res["family"] == family
  assert all(0 < r["bpb"] < 12 for r in res["results"].values())
  assert robustness.main(["--run", f"{family}={wd}", "--examples", "2", "--context-bytes",
                          "40", "--continuation-bytes", "20", "--rates", "0,0.2",
                          "--perturbations", "all_caps", "--out", str(tmp_path / "rob")]) == 0
  assert (tmp_path / "rob" / "robustness.json").exists()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_lm_eval_adapter(runs, family):
  pytest.importorskip("lm_eval")
  from hat.eval.harness import HarnessLM  # pylint: disable=g-import-not-at-top

  Req = collections.namedtuple("Req", "args")
  lm = HarnessLM.from_workdir(str(runs[family].workdir), batch_size=2, max_gen_bytes=6)
  (lp, _), = lm.loglikelihood([Req(("The quick brown", " fox"))])
  assert lp < 0
  (text,) = lm.generate_until([Req(("The quick", {"until": ["\n"]}))])
  assert isinstance(text, str) and len(text) <= 6  # 6 bytes, invalid UTF-8 replaced


def test_every_family_lowers_for_a_tpu_topology(corpus, tmp_path):
  """One fresh process (libtpu must be configured before it loads) lowers all five."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed; TPU AOT lowering needs it")
  d, path = corpus
  script = tmp_path / "lower_all.py"
  script.write_text(f"""
import importlib.util, sys
sys.path.insert(0, {str(ROOT / 'tests')!r})
spec = importlib.util.spec_from_file_location("aot", {str(ROOT / 'tools/aot_compile.py')!r})
aot = importlib.util.module_from_spec(spec); sys.modules["aot"] = aot; spec.loader.exec_module(aot)
from test_families import FAMILY_NAMES, _cfg
import pathlib
topo = aot.parse_topology("v5e:2x2")
mesh = aot.build_mesh(aot.topology_devices(topo), "data=-1,fsdp=1,tensor=1", 1)
for family in FAMILY_NAMES:
  cfg = _cfg(family, pathlib.Path({str(path)!r}), pathlib.Path({str(d / 'bpe.model')!r}))
  aot.lower_train_step(cfg, mesh)
  print("lowered", family)
""")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=600, env=env, cwd=ROOT)
  if res.returncode != 0 and "cannot describe TPU topology" in res.stderr:
    pytest.skip(f"libtpu cannot describe TPU topologies here: {res.stderr[-300:]}")
  assert res.returncode == 0, res.stderr[-3000:]
  assert res.stdout.count("lowered") == len(FAMILY_NAMES)
