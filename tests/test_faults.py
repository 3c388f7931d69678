"""Fault injection: kills and write errors during saves, broken checkpoints, wrong models.

Every fault ends with the last good checkpoint intact and, after a resume, the losses of
the uninterrupted reference run bit for bit; the cases that must stop (no checkpoint
restores, another model's checkpoint) stop with one line and move nothing. Runs are the
tiny 6-step HAT of test_train; a persistent compilation cache shared by this module's
runs keeps each restart short.
"""

from __future__ import annotations

import gc
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import types

import pytest

from test_train import (wait_for, ROOT, STEPS, checkpoint_steps, losses, reference_run,  # noqa: F401
                        train_args, train_data, train_env)


@pytest.fixture(scope="module")
def jit_cache(tmp_path_factory):
  """Environment of a persistent XLA compilation cache shared by this module's runs."""
  d = tmp_path_factory.mktemp("jit_cache")
  return {"JAX_COMPILATION_CACHE_DIR": str(d), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _start(workdir, data, env, *overrides):
  corpus, cache = data
  return subprocess.Popen([sys.executable, "-m", "hat.train",
                           *train_args(workdir, corpus, "mesh=data=1", *overrides)],
                          env=train_env(1, cache, **env), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=300):
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out




def _kill(proc):
  proc.send_signal(signal.SIGKILL)
  proc.communicate()


def _resume_to_end(workdir, data, env, *overrides):
  code, out = _finish(_start(workdir, data, env, *overrides))
  assert code == 0, out[-4000:]
  return out


def _half_written(workdir, step):
  return list((workdir / "checkpoints").glob(f"{step}.orbax-checkpoint-tmp*"))


def _bad(workdir):
  d = workdir / "bad_checkpoints"
  return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def _truncate_latest_model_file(workdir, step):
  files = sorted((workdir / "checkpoints" / str(step) / "model").rglob("d/*"),
                 key=lambda p: -p.stat().st_size)
  os.truncate(files[0], files[0].stat().st_size // 2)


def _copy_run(src, dst):
  shutil.copytree(src / "checkpoints", dst / "checkpoints")
  return dst


def test_sigkill_inside_an_async_save_resumes_from_the_previous_one(
    tmp_path, train_data, reference_run, jit_cache):
  # The writer of step 4 stalls inside orbax; the kill lands while it is half written.
  env = {**jit_cache, "HAT_FAULT_SAVE_STEP": "4", "HAT_FAULT_SAVE_DELAY_S": "60"}
  proc = _start(tmp_path, train_data, env, "ckpt_every=2")
  wait_for(lambda: _half_written(tmp_path, 4) and checkpoint_steps(tmp_path) == [2], proc)
  _kill(proc)
  assert checkpoint_steps(tmp_path) == [2]
  out = _resume_to_end(tmp_path, train_data, jit_cache, "ckpt_every=2")
  assert "resumed from step 2" in out
  assert any(n.startswith("4.orbax-checkpoint-tmp") for n in _bad(tmp_path)), _bad(tmp_path)
  assert losses(tmp_path) == losses(reference_run)


def test_write_error_stops_the_run_naming_the_folder_and_the_resume_is_exact(
    tmp_path, train_data, reference_run, jit_cache):
  env = {**jit_cache, "HAT_FAULT_SAVE_STEP": "4", "HAT_FAULT_SAVE_ERRNO": "ENOSPC"}
  code, out = _finish(_start(tmp_path, train_data, env, "ckpt_every=2"))
  assert code == 4, out[-4000:]
  errors = [l for l in out.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in out, out[-4000:]
  assert str(tmp_path / "checkpoints" / "4") in errors[0]
  assert "No space left on device" in errors[0]
  assert checkpoint_steps(tmp_path) == [2]
  out = _resume_to_end(tmp_path, train_data, jit_cache, "ckpt_every=2")
  assert "resumed from step 2" in out
  assert losses(tmp_path) == losses(reference_run)


def test_truncated_file_in_the_latest_checkpoint_falls_back_to_the_one_before(
    tmp_path, train_data, reference_run, jit_cache):
  _copy_run(reference_run, tmp_path)
  assert checkpoint_steps(tmp_path) == [3, 6]
  _truncate_latest_model_file(tmp_path, 6)
  out = _resume_to_end(tmp_path, train_data, jit_cache)
  assert "checkpoints/6 does not restore (ValueError: OUT_OF_RANGE" in out, out[-3000:]
  assert "resumed from step 3" in out
  assert _bad(tmp_path) == ["6", "6.reason.txt"]
  assert "OUT_OF_RANGE" in (tmp_path / "bad_checkpoints" / "6.reason.txt").read_text()
  ref = losses(reference_run)
  assert losses(tmp_path) == {s: ref[s] for s in range(4, STEPS + 1)}


def test_three_sigkills_at_random_steps_then_the_same_losses(
    tmp_path, train_data, reference_run, jit_cache):
  rng = random.Random(14)
  slow = {**jit_cache, "HAT_DEBUG_STEP_DELAY_S": "0.3"}
  metrics = tmp_path / "metrics.jsonl"
  for target in sorted(rng.sample(range(1, STEPS), 3)):
    seen = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    proc = _start(tmp_path, train_data, slow, "ckpt_every=1")

    def reached(target=target, seen=seen):
      lines = metrics.read_text().splitlines()[seen:] if metrics.exists() else []
      return any(f'"step": {s},' in l for l in lines for s in range(target, STEPS + 1))

    wait_for(reached, proc)
    time.sleep(rng.uniform(0.0, 0.3))  # anywhere in a step, a save included
    _kill(proc)
  _resume_to_end(tmp_path, train_data, jit_cache, "ckpt_every=1")
  assert losses(tmp_path) == losses(reference_run)
  assert checkpoint_steps(tmp_path)[-1] == STEPS


def _train_main(workdir, data, monkeypatch, *overrides):
  from hat.train.__main__ import main

  corpus, cache = data
  monkeypatch.setenv("HAT_CACHE", str(cache))
  return main(train_args(workdir, corpus, "mesh=data=1", *overrides))


def test_no_checkpoint_restores_stops_and_moves_nothing(tmp_path, train_data, reference_run,
                                                        monkeypatch, capsys):
  _copy_run(reference_run, tmp_path)
  for step in (3, 6):
    _truncate_latest_model_file(tmp_path, step)
  assert _train_main(tmp_path, train_data, monkeypatch) == 2
  # The other shards' failed reads are tasks nobody awaited; asyncio logs them (with
  # tracebacks) when it collects them: collect now, so that they would show here.
  gc.collect()
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: no checkpoint in "), err
  assert "6: ValueError: OUT_OF_RANGE" in err[0] and "3: ValueError: OUT_OF_RANGE" in err[0]
  assert checkpoint_steps(tmp_path) == [3, 6] and _bad(tmp_path) == []


def test_unawaited_shard_read_errors_are_not_logged():
  import logging

  from hat.rundir import _QuietClosedLoop, _drop_unretrieved_read_errors

  def record(message, code_file):
    try:
      exec(compile("raise ValueError('OUT_OF_RANGE')", code_file, "exec"))  # pylint: disable=exec-used
    except ValueError:
      exc_info = sys.exc_info()
    return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, (), exc_info)

  orbax_read = "/site-packages/orbax/checkpoint/_src/serialization/serialization.py"
  assert not _drop_unretrieved_read_errors(
      record("Task exception was never retrieved\nfuture: <Task>", orbax_read))
  assert not _drop_unretrieved_read_errors(record(
      'Future exception was never retrieved\nfuture: <Future finished exception=ValueError('
      '"OUT_OF_RANGE: Error reading x in OCDBT database")>', "mine.py"))
  assert _drop_unretrieved_read_errors(record("Task exception was never retrieved", "mine.py"))
  assert _drop_unretrieved_read_errors(record("Unclosed client session", orbax_read))

  def call_soon_threadsafe(message):  # as asyncio's, on a loop orbax has closed
    raise RuntimeError(message)

  seen = []
  hook = _QuietClosedLoop(seen.append)
  for message in ("Event loop is closed", "something else"):
    try:
      call_soon_threadsafe(message)
    except RuntimeError as e:
      hook(types.SimpleNamespace(exc_type=RuntimeError, exc_value=e,
                                 exc_traceback=e.__traceback__.tb_next, object=None))
  assert [str(u.exc_value) for u in seen] == ["something else"]


def test_checkpoint_of_another_model_names_the_parameter_and_both_shapes(
    tmp_path, train_data, reference_run, monkeypatch, capsys):
  _copy_run(reference_run, tmp_path)
  assert _train_main(tmp_path, train_data, monkeypatch, "model.backbone.d_model=48") == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  assert "parameter backbone.final_norm.scale has shape (32,) in the checkpoint, (48,)" in err[0]
  assert "strict" not in err[0]
  assert checkpoint_steps(tmp_path) == [3, 6] and _bad(tmp_path) == []


@pytest.mark.slow
def test_two_processes_agree_on_the_checkpoint_to_fall_back_to(tmp_path, train_data,
                                                                reference_run, jit_cache):
  import numpy as np

  corpus, cache = train_data
  _copy_run(reference_run, tmp_path)
  _truncate_latest_model_file(tmp_path, 6)
  proc = subprocess.run(
      [sys.executable, "launch/local.py", "--num-processes", "2", "--devices-per-process",
       "2", "--", *train_args(tmp_path, corpus, "mesh=data=2,fsdp=2")],
      env=train_env(1, cache, **jit_cache), cwd=ROOT, capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert _bad(tmp_path) == ["6", "6.reason.txt"]
  ref, resumed = losses(reference_run), losses(tmp_path)
  assert sorted(resumed) == list(range(4, STEPS + 1))
  np.testing.assert_allclose([resumed[s] for s in resumed], [ref[s] for s in resumed],
                             rtol=2e-5)


def test_a_step_another_process_cannot_restore_is_skipped_by_all(tmp_path, reference_run,
                                                                  monkeypatch):
  import jax

  from hat.config import resolve
  from hat.models import model_vocab_size
  from hat.sharding import make_mesh
  from hat.train import recovery
  from hat.train.checkpoint import Checkpointer
  from hat.train.state import state_spec
  from test_train import TINY_OVERRIDES

  _copy_run(reference_run, tmp_path)
  votes = []

  def all_processes(ok):  # this process restored step 6; pretend another one did not
    votes.append(ok)
    return ok and len(votes) > 1

  monkeypatch.setattr(recovery, "_all_processes", all_processes)
  cfg = resolve(str(ROOT / "configs" / "tiny_hat.py"), [*TINY_OVERRIDES, "mesh=data=1"])
  mesh = make_mesh("data=1", jax.devices()[:1])
  spec = state_spec(cfg, model_vocab_size(cfg), mesh)
  ckpt = Checkpointer(tmp_path, keep=3)
  try:
    resumed = recovery.resume(ckpt, spec, None)
  finally:
    ckpt.close()
  assert votes == [True, True] and resumed.step == 3
  assert _bad(tmp_path) == ["6", "6.reason.txt"]
  assert "another process" in (tmp_path / "bad_checkpoints" / "6.reason.txt").read_text()
