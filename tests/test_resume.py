"""Checkpoints: kill and resume bit-exactly, SIGTERM, resharding, the non-finite guard."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from test_train import (wait_for, ROOT, STEPS, checkpoint_steps, losses, reference_run,  # noqa: F401
                        run_train, sharded_run, train_args, train_data, train_env)


def _start(workdir, data, *overrides, **env):
  corpus, cache = data
  return subprocess.Popen([sys.executable, "-m", "hat.train",
                           *train_args(workdir, corpus, *overrides)],
                          env=train_env(1, cache, **env), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)




@pytest.mark.slow
def test_sigkill_then_sigterm_then_resume_is_bit_exact(tmp_path, train_data, reference_run):
  slow = {"HAT_DEBUG_STEP_DELAY_S": "0.4"}
  # 1) SIGKILL once the step-2 checkpoint is committed: steps after it are lost.
  proc = _start(tmp_path, train_data, "mesh=data=1", "ckpt_every=2", **slow)
  wait_for(lambda: 2 in checkpoint_steps(tmp_path), proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  # 2) Resume; SIGTERM after the first resumed step: it saves at its current step.
  done_before = checkpoint_steps(tmp_path)[-1]
  n_lines = len((tmp_path / "metrics.jsonl").read_text().splitlines())
  proc = _start(tmp_path, train_data, "mesh=data=1", "ckpt_every=100", **slow)
  wait_for(lambda: len((tmp_path / "metrics.jsonl").read_text().splitlines()) > n_lines, proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-3000:]
  stopped = int(out.rsplit("preempted at step ", 1)[1].split()[0])
  assert done_before < stopped < STEPS
  assert checkpoint_steps(tmp_path)[-1] == stopped
  # 3) Resume to the end: every step's loss equals the uninterrupted run's, bit for bit.
  run_train(tmp_path, train_data, "mesh=data=1", "ckpt_every=100")
  assert losses(tmp_path) == losses(reference_run)


def test_checkpoint_from_8_devices_continues_on_2(tmp_path, train_data, sharded_run,
                                                  reference_run):
  shutil.copytree(sharded_run / "checkpoints" / "3", tmp_path / "checkpoints" / "3")
  run_train(tmp_path, train_data, "mesh=data=2", devices=2)
  ref, resumed = losses(reference_run), losses(tmp_path)
  assert sorted(resumed) == list(range(4, STEPS + 1))
  np.testing.assert_allclose([resumed[s] for s in resumed], [ref[s] for s in resumed],
                             rtol=2e-5)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, train_data):
  from hat.rundir import load_for_inference

  proc = run_train(tmp_path, train_data, "mesh=data=1", "ckpt_every=2", check=False,
                   HAT_INJECT_NAN_AT_STEP="5")
  assert proc.returncode == 3, proc.stderr[-3000:]
  assert "non-finite training metrics at step 5" in proc.stderr
  assert "Last good checkpoint: step 4" in proc.stderr
  assert checkpoint_steps(tmp_path) == [2, 4]
  model, _, _ = load_for_inference(tmp_path)
  import jax
  from flax import nnx
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(model)))


@pytest.mark.parametrize("background", [True, False])
def test_async_save_keeps_the_state_of_its_step_when_the_next_step_donates_it(
    tmp_path, monkeypatch, background):
  """The background hand-off writes the values at save time, not the donated buffers'."""
  import jax

  from hat.train import checkpoint as ckpt_lib
  from flax import nnx

  from hat.config import resolve
  from hat.models import model_vocab_size
  from hat.sharding import make_mesh
  from hat.train.checkpoint import Checkpointer, restore_pure
  from hat.train.state import MODEL, init_state, state_spec

  cfg = resolve(str(ROOT / "configs" / "tiny_hat.py"), ["mesh=data=1"])
  mesh = make_mesh("data=1", jax.devices()[:1])
  vocab = model_vocab_size(cfg)
  spec = state_spec(cfg, vocab, mesh)
  state = init_state(cfg, vocab, mesh, spec)
  before = jax.device_get(nnx.to_pure_dict(state[MODEL]))
  bump = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
  hand_off = ckpt_lib.Checkpointer._hand_to_orbax

  def late_hand_off(self, *args):
    time.sleep(0.5)  # the next steps have donated the live buffers by now
    return hand_off(self, *args)

  if background:
    monkeypatch.setattr(ckpt_lib.Checkpointer, "_hand_to_orbax", late_hand_off)
  ckpt = Checkpointer(tmp_path / "run", keep=2, background=background)
  ckpt.save(7, state, None, cfg)
  for _ in range(3):
    state = bump(state)  # reuses the saved step's buffers
  ckpt.close()
  saved = restore_pure(tmp_path / "run" / "checkpoints" / "7", spec, with_optimizer=False)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(saved[MODEL]), before)
  after = jax.device_get(nnx.to_pure_dict(state[MODEL]))
  assert not np.array_equal(jax.tree.leaves(after)[0], jax.tree.leaves(before)[0])
