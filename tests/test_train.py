"""Training: optimiser recipe, config guards, and sharded runs matching one device.

End-to-end runs go through `python -m hat.train` in subprocesses, since the number of
fake CPU devices (XLA_FLAGS) must be fixed before jax is imported. The helpers here are
shared with test_resume.py and test_train_multihost.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import subprocess
import sys
import time

import numpy as np
import pytest

from hat.config import ConfigError, resolve

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 6

# A ~30k-parameter HAT, 128-byte windows: compile time dominates, steps take milliseconds.
TINY_OVERRIDES = [
    "model.backbone.num_layers=1", "model.backbone.d_model=32", "model.backbone.num_heads=2",
    "model.backbone.num_kv_heads=2", "model.backbone.head_dim=16", "model.backbone.mlp_dim=64",
    *(f"model.{s}.{k}" for s in ("encoder", "decoder") for k in (
        "d_model=16", "num_heads=1", "num_kv_heads=1", "head_dim=16", "mlp_dim=32")),
    "data.window_bytes=128", "data.max_units=48", "data.row_len=32", "data.num_rows=8",
    "data.batch_size=8", f"steps={STEPS}", "log_every=1", "ckpt_every=3", "eval_every=0",
    "eval_batches=0", "sample_bytes=0", "optim.warmup_steps=2", "optim.lr=3e-3",
    "global_data_stream=true",
]


def write_corpus(path: pathlib.Path) -> pathlib.Path:
  """A small deterministic text file (blank-line separated paragraphs)."""
  rng = random.Random(0)
  words = ("the quick brown fox jumps over a lazy dog while language models read bytes "
           "and words über café naïve").split()
  paras = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 60))) + "."
           for _ in range(300)]
  path.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
  return path


def train_env(devices: int, cache: pathlib.Path, **extra: str) -> dict[str, str]:
  """Environment of a CPU training subprocess with `devices` fake devices."""
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", HAT_CACHE=str(cache),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
  env.update(extra)
  return env


def train_args(workdir: pathlib.Path, corpus: pathlib.Path, *overrides: str) -> list[str]:
  """Arguments of `python -m hat.train` for the tiny test run."""
  ov = [*TINY_OVERRIDES, f"data.train=text:{corpus}", *overrides]
  return ["--config", str(ROOT / "configs" / "tiny_hat.py"), "--workdir", str(workdir),
          "--no-progress", *(f"--config.{o}" for o in ov)]


def run_train(workdir, data, *overrides, devices=1, check=True, **env):
  """Runs the tiny training to completion in a subprocess."""
  corpus, cache = data
  proc = subprocess.run([sys.executable, "-m", "hat.train",
                         *train_args(workdir, corpus, *overrides)],
                        env=train_env(devices, cache, **env), capture_output=True, text=True,
                        timeout=600, cwd=ROOT)
  if check and proc.returncode != 0:
    raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return proc


def wait_for(cond, proc, timeout: float = 240.0, poll_s: float = 0.05) -> None:
  """Polls `cond()` while the training subprocess `proc` runs; fails if it ends or times out."""
  end = time.time() + timeout
  while not cond():
    if proc.poll() is not None:
      raise AssertionError(f"run ended early ({proc.returncode}):\n{proc.stdout.read()[-3000:]}")
    if time.time() > end:
      proc.kill()
      raise AssertionError("timed out waiting for the run")
    time.sleep(poll_s)


def losses(workdir: pathlib.Path) -> dict[int, float]:
  """step -> training loss from metrics.jsonl (a resumed run's records win)."""
  out = {}
  for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
    rec = json.loads(line)
    if "train/loss" in rec:
      out[rec["step"]] = rec["train/loss"]
  return out


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
  """Committed checkpoint steps in a workdir."""
  d = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.glob("*") if p.name.isdigit()
                and (p / "commit_success.txt").exists())


# Test modules import the fixtures below, and pytest makes one fixture per importing
# module; this cache (in the one `test_train` module object) makes each run happen once.
_SHARED_RUNS: dict[str, pathlib.Path] = {}


@pytest.fixture(scope="session")
def train_data(tmp_path_factory):
  """(corpus file, corpus cache dir) shared by every training test."""
  if "train_data" not in _SHARED_RUNS:
    d = tmp_path_factory.mktemp("train_data")
    write_corpus(d / "corpus.txt")
    _SHARED_RUNS["train_data"] = d
  d = _SHARED_RUNS["train_data"]
  return d / "corpus.txt", d / "cache"


def _shared_run(name, tmp_path_factory, data, *overrides, devices=1) -> pathlib.Path:
  if name not in _SHARED_RUNS:
    workdir = tmp_path_factory.mktemp(name)
    run_train(workdir, data, *overrides, devices=devices)
    _SHARED_RUNS[name] = workdir
  return _SHARED_RUNS[name]


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, train_data):
  """The uninterrupted single-device run every other run is compared with."""
  return _shared_run("reference", tmp_path_factory, train_data, "mesh=data=1",
                     "eval_batches=1")


@pytest.fixture(scope="session")
def sharded_run(tmp_path_factory, train_data):
  """The same run on 8 fake devices as (data=2, fsdp=2, tensor=2)."""
  return _shared_run("sharded", tmp_path_factory, train_data, "mesh=data=2,fsdp=2,tensor=2",
                     devices=8)


def test_paper_lr_rule_and_schedule():
  from hat.train.optim import lr_schedule, peak_lr

  cfg = resolve(None, ["model.backbone.num_heads=16", "model.backbone.num_kv_heads=16",
                       "steps=1000", "optim.warmup_steps=100"])
  assert peak_lr(cfg) == pytest.approx(3e-4 * 32 / 16)
  sched = lr_schedule(cfg)
  assert float(sched(0)) == 0.0
  assert float(sched(100)) == pytest.approx(6e-4)
  assert float(sched(1000)) == pytest.approx(6e-5)
  assert peak_lr(resolve(None, ["optim.lr=0.01"])) == 0.01


def test_no_weight_decay_on_norms_and_embeddings():
  from hat.train.optim import decay_mask

  params = {"enc_embed": 0, "head": 0, "w_enc": 0,
            "backbone": {"layers": {"attn_norm": {"scale": 0}, "mlp": {"w_up": 0}},
                         "final_norm": {"scale": 0}}}
  mask = decay_mask(params)
  assert mask["head"] and mask["w_enc"] and mask["backbone"]["layers"]["mlp"]["w_up"]
  assert not mask["enc_embed"]
  assert not mask["backbone"]["layers"]["attn_norm"]["scale"]
  assert not mask["backbone"]["final_norm"]["scale"]


def test_config_that_does_not_fit_fails_naming_the_key():
  from hat.train.loop import make_run_mesh

  with pytest.raises(ConfigError, match="^mesh"):
    make_run_mesh(resolve(None, ["mesh=data=2"]))  # one CPU device in this process
  with pytest.raises(ConfigError, match="optim.grad_accum"):
    make_run_mesh(resolve(None, ["mesh=data=1", "data.batch_size=8", "optim.grad_accum=3"]))
  with pytest.raises(ConfigError, match="^ckpt_every"):
    resolve(None, ["ckpt_every=-1"])
  with pytest.raises(ConfigError, match="^log_every"):
    resolve(None, ["log_every=0"])
  assert resolve(None, ["ckpt_every=0", "eval_every=0"]).ckpt_every == 0  # only at the end


def test_grad_accumulation_matches_full_batch():
  import jax

  from hat.data.layout import token_batch_from_texts
  from hat.sharding import make_mesh
  from hat.text.tokenizers import ByteTokenizer
  from hat.train.state import init_state, state_spec
  from hat.train.step import make_train_step

  # A flat byte LM compiles fastest; the accumulation code is the same for every kind.
  docs = [f"doc {i}: the quick brown fox jumps over the lazy dog {i * 7}".encode()
          for i in range(4)]
  batch = token_batch_from_texts(docs, ByteTokenizer(), max_tokens=64)
  mesh = make_mesh("data=1", jax.devices()[:1])
  results = []
  for accum in (1, 2):
    cfg = resolve(None, [*TINY_OVERRIDES, "model.kind=byte", "data.max_tokens=64",
                         "data.batch_size=4", f"optim.grad_accum={accum}",
                         "optim.warmup_steps=0"])
    spec = state_spec(cfg, 259, mesh)
    state = init_state(cfg, 259, mesh, spec)
    step = make_train_step(cfg, spec, mesh, batch)
    with jax.set_mesh(mesh):
      state, m = step(state, batch, np.float32(1.0))
    results.append((float(m["loss"]), float(m["grad_norm"]),
                    np.asarray(state[0]["head"][...])))
  (l1, g1, h1), (l2, g2, h2) = results
  assert l1 == pytest.approx(l2, rel=1e-5) and g1 == pytest.approx(g2, rel=1e-4)
  np.testing.assert_allclose(h1, h2, rtol=1e-4, atol=1e-6)


def test_help_explains_the_cli():
  out = subprocess.run([sys.executable, "-m", "hat.train", "--help"], capture_output=True,
                       text=True, cwd=ROOT, env=train_env(1, ROOT), check=True).stdout
  for needle in ("--config.", "--workdir", "HAT_COORDINATOR", "init_from", "SIGTERM"):
    assert needle in out


def test_eight_fake_devices_match_one_device(reference_run, sharded_run):
  ref, sharded = losses(reference_run), losses(sharded_run)
  assert sorted(ref) == list(range(1, STEPS + 1)) == sorted(sharded)
  np.testing.assert_allclose([sharded[s] for s in ref], list(ref.values()), rtol=2e-5)
  assert ref[STEPS] < ref[1]  # it learns
  final = [json.loads(l) for l in (reference_run / "metrics.jsonl").read_text().splitlines()]
  assert any("eval/valid/bpb" in r for r in final)
  assert checkpoint_steps(sharded_run) == [3, 6]
