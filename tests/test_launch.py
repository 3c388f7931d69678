"""Launchers: each script's --dry-run prints the right commands; no gcloud, xpk or Slurm needed."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"


def _load(name: str):
  spec = importlib.util.spec_from_file_location(f"_launch_{name}", LAUNCH / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _run(argv: list[str], env: dict | None = None) -> list[list[str]]:
  """Runs a launcher, returns its printed lines split as shell words."""
  out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=True,
                       env={**os.environ, **(env or {})}, timeout=60)
  return [shlex.split(line) for line in out.stdout.splitlines() if line.strip()]


def _flag(words: list[str], name: str) -> str:
  for w in words:
    if w.startswith(name + "="):
      return w.split("=", 1)[1]
  raise AssertionError(f"{name} not in {words}")


def test_tpu_pod_up_dry_run():
  lines = _run([sys.executable, "launch/tpu_pod.py", "up", "--name", "hat-1b", "--zone",
                "us-east5-a", "--accelerator", "v5p-64", "--config", "configs/hat_1b.py",
                "--workdir", "gs://bucket/run", "--dry-run", "--", "--config.steps=10"])
  create, pack, copy, setup, train = lines
  assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
  assert "--accelerator-type=v5p-64" in create and "--version=v2-alpha-tpuv5" in create
  assert "git ls-files" in pack[-1] and "tar" in pack[-1]
  assert copy[4] == "scp" and "--worker=all" in copy
  assert "--worker=all" in setup and "pip install -q -e '.[tpu,gcs]'" in _flag(setup, "--command")
  run = _flag(train, "--command")
  assert "--worker=all" in train
  assert ("python -m hat.train --config configs/hat_1b.py --workdir gs://bucket/run "
          "--distributed=auto --no-progress --config.steps=10") in run
  assert "export LIBTPU_INIT_ARGS=" in run and "setsid nohup" in run and "train.pid" in run


def test_tpu_pod_clone_collect_and_workers():
  tpu = _load("tpu_pod")
  assert tpu.parse_accelerator("v5p-64") == ("v5p", 32, "v5p-64")
  assert tpu.parse_accelerator("v5e-16") == ("v5e", 16, "v5litepod-16")
  assert tpu.num_workers("v5p", 32) == 8 and tpu.num_workers("v5e", 8) == 1
  lines = _run([sys.executable, "launch/tpu_pod.py", "setup", "--name", "t", "--zone", "z",
                "--repo", "https://example.org/hat.git", "--branch", "dev", "--dry-run"])
  assert len(lines) == 1 and "git clone https://example.org/hat.git" in _flag(lines[0], "--command")
  lines = _run([sys.executable, "launch/tpu_pod.py", "collect", "--name", "t", "--zone", "z",
                "--accelerator", "v4-32", "--dry-run"])
  assert len(lines) == 1 + 4 and "--worker=3" in lines[-1]


def test_tpu_pod_requires_workdir():
  out = subprocess.run([sys.executable, "launch/tpu_pod.py", "train", "--name", "t", "--zone",
                        "z", "--dry-run"], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode != 0 and "--workdir" in out.stderr


def test_gke_xpk_multislice_dry_run():
  lines = _run([sys.executable, "launch/gke_xpk.py", "run", "--cluster", "c", "--zone", "z",
                "--tpu_type", "v5e-256", "--num_slices", "4", "--config", "configs/hat_7b.py",
                "--workdir", "gs://b/r", "--dry-run", "--", "--config.steps=5"])
  (create,) = lines
  assert create[:3] == ["xpk", "workload", "create"]
  assert create[create.index("--tpu-type") + 1] == "v5litepod-256"
  assert create[create.index("--num-slices") + 1] == "4"
  command = create[create.index("--command") + 1]
  assert "--config.mesh=replica=4,data=1,fsdp=-1,tensor=1" in command
  assert "--distributed=auto" in command
  assert command.endswith("--config.steps=5") and "pip install" in command


def test_slurm_sbatch_dry_run():
  lines = _run(["bash", "launch/slurm_gpu.sbatch", "--dry-run", "--config", "configs/hat_1b.py",
                "--workdir", "/shared/run"])
  (srun,) = lines
  assert srun[0] == "srun" and "--kill-on-bad-exit=1" in srun
  assert srun[-6:] == ["exec", "--", "--config", "configs/hat_1b.py", "--workdir", "/shared/run"]


def test_slurm_submit_dry_run():
  lines = _run([sys.executable, "launch/slurm_gpu.py", "submit", "--nodes", "32", "--workdir",
                "/shared/run", "--partition", "gpu", "--dry-run"])
  (sbatch,) = lines
  assert sbatch[0] == "sbatch" and "--nodes=32" in sbatch and "--ntasks-per-node=8" in sbatch
  assert sbatch[sbatch.index("--workdir") + 1] == "/shared/run"
  assert sbatch[sbatch.index("--workdir") - 3].endswith("launch/slurm_gpu.sbatch")


def test_slurm_exec_environment():
  slurm = {"SLURM_JOB_NODELIST": "gpu[007-009,012],login1", "SLURM_PROCID": "5",
           "SLURM_NTASKS": "32", "SLURM_JOB_ID": "4242", "SLURM_LOCALID": "5"}
  lines = _run([sys.executable, "launch/slurm_gpu.py", "exec", "--dry-run", "--",
                "--config", "configs/hat_7b.py"], env=slurm)
  exports = {w[1].split("=", 1)[0]: w[1].split("=", 1)[1] for w in lines if w[0] == "export"}
  assert exports["HAT_COORDINATOR"] == "gpu007:14242"
  assert (exports["HAT_PROCESS_ID"], exports["HAT_NUM_PROCESSES"]) == ("5", "32")
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in exports["XLA_FLAGS"]
  assert lines[-1][1:] == ["-m", "hat.train", "--no-progress", "--config", "configs/hat_7b.py",
                           "--config.model.attention_impl=cudnn"]


def test_slurm_helpers():
  s = _load("slurm_gpu")
  assert s.expand_nodelist("a1,b[01-03],c[7,9-10]") == ["a1", "b01", "b02", "b03", "c7", "c9",
                                                        "c10"]
  base = {"SLURM_JOB_NODELIST": "n1", "SLURM_PROCID": "0", "SLURM_NTASKS": "2",
          "SLURM_JOB_ID": "7"}
  assert s.task_env({**base, "CUDA_VISIBLE_DEVICES": "3"})["JAX_LOCAL_DEVICE_IDS"] == "0"
  assert "JAX_LOCAL_DEVICE_IDS" not in s.task_env({**base, "CUDA_VISIBLE_DEVICES": "0,1"})
  per_node = s.task_env({**base, "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, per_node=True)
  assert per_node["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3"
  user = s.task_env({**base, "XLA_FLAGS": "--xla_gpu_enable_triton_gemm=true"})
  assert user["XLA_FLAGS"].count("xla_gpu_enable_triton_gemm") == 1  # the user's wins
  assert s.train_argv(["--config.model.attention_impl=xla"])[-1].endswith("=xla")
  with pytest.raises(RuntimeError, match="Slurm"):
    s.task_env({})


def test_xla_gpu_flags_are_known_to_xla():
  """XLA aborts on an unknown flag; the CPU build parses the same flag registry."""
  flags = " ".join(_load("slurm_gpu").XLA_GPU_FLAGS)
  out = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True,
                       text=True, timeout=120,
                       env={**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize("argv", [[sys.executable, "launch/tpu_pod.py", "--help"],
                                  [sys.executable, "launch/gke_xpk.py", "--help"],
                                  [sys.executable, "launch/slurm_gpu.py", "--help"],
                                  ["bash", "launch/slurm_gpu.sbatch", "--help"]])
def test_help(argv):
  out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert out.returncode == 0 and "dry-run" in out.stdout.replace("dry_run", "dry-run")
