"""tools/accelerator_check.py keeps working: its scaled-down CPU run writes a full report."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tool():
  spec = importlib.util.spec_from_file_location("_accelerator_check",
                                                ROOT / "tools/accelerator_check.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow  # ~1 CPU-minute: three compiles per model
def test_cpu_smoke_run_writes_json_and_markdown(tmp_path):
  tool = _tool()
  assert tool.main(["--cpu-smoke", "--out", str(tmp_path), "--layers", "1", "--steps", "1",
                    "--batch", "1", "--window", "256", "--gen-batches", "1"]) == 0
  (js,) = tmp_path.glob("*.json")
  rep = json.loads(js.read_text())
  assert rep["versions"]["jax"] and rep["plan"] == "cpu"
  for section in ("attention", "training", "generation"):
    assert "error" not in rep[section], rep[section].get("traceback")
  assert rep["attention"]["hat"]["ok"] and rep["attention"]["bpe"]["ok"]
  tr = rep["training"]
  assert tr["same_bytes_per_batch"] and tr["step_time_ratio_hat_over_bpe"] > 0
  assert tr["hat"]["hardware_flops_per_step"] >= tr["hat"]["train_flops_per_step"]
  assert rep["generation"]["hat"]["1"]["bytes_per_s"] > 0
  md = js.with_suffix(".md").read_text()
  assert "HAT/BPE step time" in md and "| HAT |" in md


def test_a_broken_section_is_recorded_not_raised():
  tool = _tool()
  out = tool._guard(lambda: 1 / 0)
  assert out["error"].startswith("ZeroDivisionError") and "section_s" in out
