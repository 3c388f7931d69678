"""The README's quoted figures stay in step with the code (tools/check_readme.py)."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tool():
  spec = importlib.util.spec_from_file_location("_check_readme", ROOT / "tools/check_readme.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
  spec.loader.exec_module(module)
  return module


def test_every_claim_is_found_in_the_readme():
  tool = _tool()
  readme = (ROOT / "README.md").read_text(encoding="utf-8")
  assert all(tool.quoted(c, readme) is not None for c in tool.CLAIMS)


def test_figures_that_need_no_training_are_in_step(capsys):
  assert _tool().main(["--fast"]) == 0, capsys.readouterr().out


def test_rounding_and_the_trainer_line_format():
  tool = _tool()
  assert tool.in_step("2.475", "2.4751") and not tool.in_step("2.475", "2.5515")
  assert tool.in_step("0.57M", "0.57M") and not tool.in_step("0.57M", "0.57K")
  assert tool.in_step("1,000", "1,000")
  # The slow claim reads the trainer's own final line; keep the two formats together.
  loop = (ROOT / "hat/train/loop.py").read_text()
  assert 'f"final {k} = {v:.4f}"' in loop
  assert tool._FINAL_BPB.search("final eval/valid/bpb = 2.5515").group(1) == "2.5515"
