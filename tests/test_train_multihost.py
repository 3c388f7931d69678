"""Two jax processes on localhost (gloo collectives), started by launch/local.py."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from test_train import (ROOT, STEPS, checkpoint_steps, losses, reference_run,  # noqa: F401
                        train_args, train_data, train_env)


def test_launcher_dry_run_prints_one_command_per_process():
  out = subprocess.run([sys.executable, "launch/local.py", "--num-processes", "3",
                        "--devices-per-process", "2", "--dry-run", "--", "--workdir", "w"],
                       capture_output=True, text=True, cwd=ROOT, check=True).stdout
  lines = out.strip().splitlines()
  assert len(lines) == 3
  assert all("--xla_force_host_platform_device_count=2" in l and "-m hat.train" in l
             for l in lines)
  assert [f"HAT_PROCESS_ID={i}" in l for i, l in enumerate(lines)] == [True] * 3


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, train_data, reference_run):
  corpus, cache = train_data
  proc = subprocess.run(
      [sys.executable, "launch/local.py", "--num-processes", "2", "--devices-per-process",
       "2", "--", *train_args(tmp_path, corpus, "mesh=data=2,fsdp=2")],
      env=train_env(1, cache), cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  ref, multi = losses(reference_run), losses(tmp_path)
  assert sorted(multi) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([multi[s] for s in ref], list(ref.values()), rtol=2e-5)
  assert checkpoint_steps(tmp_path) == [3, 6]
  data_files = sorted(p.name for p in (tmp_path / "checkpoints" / "6" / "data").glob("*.json"))
  assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
