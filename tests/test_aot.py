"""Ahead-of-time compilation of the train step for a TPU topology, on this CPU machine."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _aot():
  spec = importlib.util.spec_from_file_location("_aot_compile", ROOT / "tools/aot_compile.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
  # The tool sets libtpu's environment (TPU_WORKER_HOSTNAMES, ...) on import; keep it out
  # of this process, whose later subprocesses would otherwise look for a TPU.
  saved = dict(os.environ)
  try:
    spec.loader.exec_module(module)
  finally:
    os.environ.clear()
    os.environ.update(saved)
  return module


def test_parse_topology_names():
  aot = _aot()
  t = aot.parse_topology("v5p-64")
  assert (t.name, t.chips_per_slice, t.wrap) == ("v5:2x4x4", 32, (False, False, False))
  t = aot.parse_topology("v5p:4x4x8", num_slices=2)
  assert (t.chips_per_slice, t.wrap, t.num_slices) == (128, (True, True, True), 2)
  assert aot.parse_topology("v5e-16").name == "v5e:4x4"
  assert aot.parse_topology("v6e-256").name == "v6e:16x16"
  assert aot.parse_topology("v4-8").name == "v4:2x2x1"
  with pytest.raises(ValueError, match="v5p"):
    aot.parse_topology("v5p-48")
  with pytest.raises(ValueError, match="3-D"):
    aot.parse_topology("v4:2x2")


def test_largest_buffers_parses_hlo():
  hlo = ('  %fusion.1 = bf16[8,1024,2048]{2,1,0} fusion(%p0), kind=kLoop, '
         'metadata={op_name="jit(train_step)/dot_general"}\n'
         '  %p0 = f32[4]{0} parameter(0)\n')
  (top,) = _aot().largest_buffers(hlo)
  assert top[0] == 8 * 1024 * 2048 * 2 and top[1] == "bf16[8,1024,2048]"
  assert "dot_general" in top[2]


@pytest.mark.parametrize("config,topology,slices", [("tiny_hat", "v5e:2x2", 1),
                                                    ("tiny_bpe", "v4:2x2x1", 2)])
def test_compile_tiny_config_for_tpu(tmp_path, config, topology, slices):
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install 'jax[tpu]==<jax version>'); "
                "TPU AOT compilation needs it")
  out = tmp_path / "report.json"
  # A fresh process: libtpu must be configured before it loads, and stays loaded.
  cmd = [sys.executable, str(ROOT / "tools/aot_compile.py"), "--config",
         str(ROOT / f"configs/{config}.py"), "--topology", topology, "--num_slices", str(slices),
         "--per_chip_batch", "1", "--json", str(out)]
  if config == "tiny_bpe":
    cmd.append("--config.model.vocab_size=512")
  # The launchers' LIBTPU_INIT_ARGS: libtpu rejects unknown flags, so this checks them too.
  launch = importlib.util.spec_from_file_location("_tpu_pod", ROOT / "launch/tpu_pod.py")
  tpu_pod = importlib.util.module_from_spec(launch)
  launch.loader.exec_module(tpu_pod)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "LIBTPU_INIT_ARGS": tpu_pod.DEFAULT_LIBTPU_ARGS}
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
  if res.returncode != 0 and "cannot describe TPU topology" in res.stderr:
    pytest.skip(f"libtpu cannot describe TPU topologies here: {res.stderr[-300:]}")
  assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
  rep = json.loads(out.read_text())
  assert rep["chips"] == 4 * slices and rep["fits"]
  assert rep["mesh"]["replica"] == slices
  assert rep["global_batch"] == 4 * slices
  assert 0 < rep["total_gib"] < rep["hbm_gib"]
  assert rep["compiled_flops_per_chip"] > 0
  assert "FITS" in res.stdout and "per-chip memory" in res.stdout
