"""The study's decisions (tools/study/analysis.py) and presets, without training anything."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))

from study import analysis  # noqa: E402
from study.presets import KNOBS, PRESETS  # noqa: E402


def test_next_lr_extends_a_sweep_whose_best_is_at_an_edge():
  assert analysis.next_lr({1e-3: 3.0, 2e-3: 2.9, 4e-3: 2.8}) == pytest.approx(8e-3)
  assert analysis.next_lr({1e-3: 2.7, 2e-3: 2.9, 4e-3: 3.0}) == pytest.approx(5e-4)
  assert analysis.next_lr({1e-3: 3.0, 2e-3: 2.7, 4e-3: 2.8}) is None
  assert analysis.next_lr({1e-3: 3.0}) is None


def test_flops_to_reach_interpolates_between_the_bracketing_evals():
  curve = [(0.0, 5.0), (10.0, 3.0), (20.0, 2.0)]
  assert analysis.flops_to_reach(curve, 4.0) == pytest.approx(5.0)
  assert analysis.flops_to_reach(curve, 2.5) == pytest.approx(15.0)
  assert analysis.flops_to_reach(curve, 2.0) == pytest.approx(20.0)
  assert analysis.flops_to_reach(curve, 1.9) is None
  assert analysis.flops_to_reach(curve, 6.0) == 0.0
  # A curve that dips below and comes back still reached the target at the dip.
  assert analysis.flops_to_reach([(0, 5.0), (10, 2.0), (20, 3.0)], 2.5) == pytest.approx(
      0 + 10 * (5.0 - 2.5) / 3.0)


def test_nearest_checkpoint_prefers_the_closest_then_the_earlier():
  assert analysis.nearest_checkpoint({100: 3.0, 200: 2.6, 300: 2.4}, 2.55) == 200
  assert analysis.nearest_checkpoint({100: 3.0, 200: 2.0}, 2.5) == 100
  with pytest.raises(ValueError):
    analysis.nearest_checkpoint({}, 2.0)


def test_max_tokens_covers_the_average_window_with_headroom():
  n = analysis.max_tokens_for(512, 3.3)
  assert n % 16 == 0 and n >= 512 / 3.3 * 1.2
  assert analysis.max_tokens_for(512, 2.0) > n  # a smaller vocabulary needs more tokens


def test_ratio_trend_and_best():
  assert analysis.ratio_trend([1.2, 1.15, 1.1]) == "falls with compute"
  assert analysis.ratio_trend([1.1, 1.2]) == "rises with compute"
  assert analysis.ratio_trend([1.1, 1.102]) == "stays flat"
  assert analysis.ratio_trend([1.186, 1.198, 1.179]) == "stays flat"
  assert analysis.ratio_trend([1.257, 1.110, 1.161]) == "falls overall, not monotonically"
  assert analysis.best({"a": {"bpb": 2.0}, "b": {"bpb": 1.5}}) == "b"


def test_a_costlier_variant_is_not_carried():
  variants = {"base": (3.0, 100.0), "cheap": (2.9, 105.0), "costly": (2.5, 130.0)}
  assert analysis.carried_variant(variants, "base", 1.1) == "cheap"
  assert analysis.carried_variant(variants, "base", 1.5) == "costly"
  assert analysis.carried_variant({"base": (3.0, 1.0), "x": (3.1, 1.0)}, "base", 1.1) == "base"


def test_presets_are_consistent():
  for p in PRESETS.values():
    assert list(p.budgets) == sorted(p.budgets)
    assert set(p.knobs) <= set(KNOBS)
    assert p.vocabs and p.lrs and 0 <= p.replay < 1
  cpu = PRESETS["cpu"]
  assert cpu.budgets[-1] >= 4 * cpu.budgets[0]  # the ladder spans >= 4x in FLOPs
  assert len(cpu.lrs) >= 3 and len(cpu.vocabs) >= 2


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_config_validates(name):
  """Every run a preset can launch is a valid config (checked before hours of training)."""
  from hat import config as config_lib
  from study.runner import overrides
  from study.setup import BPE_CONFIG, HAT_CONFIG, schedule

  p = PRESETS[name]
  sched = schedule(p, p.budgets[-1], p.bpe_checkpoints)
  assert sched["steps"] % sched["eval_every"] == 0  # every kept checkpoint is evaluated
  for knob in (None, *p.knobs):
    over = {**p.common, **p.hat, **(KNOBS[knob] if knob else {}), **sched}
    config_lib.resolve(HAT_CONFIG, overrides(over))
  over = {**p.common, **p.bpe, **sched, "data.max_tokens": analysis.max_tokens_for(
      int(p.common["data.window_bytes"]), 3.0)}
  config_lib.resolve(BPE_CONFIG, overrides(over))


def _run_row(name, family, steps, bpb, de=5.0):
  return {"name": name, "family": family, "steps": steps, "flops": steps * 1e9,
          "flops_per_step": 1e9, "lr": 2e-3, "en_bpb": bpb, "en_bytes": 1000, "de_bpb": de,
          "workdir": f"/runs/{name}"}


def test_report_writes_figures_and_numbers_from_results(tmp_path):
  """report.write on synthetic results: every figure and every number comes from them."""
  from study import report

  ladder = [{"steps": s, "bytes_seen": s * 4096, "hat": _run_row(f"h{s}", "hat", s, h),
             "bpe": _run_row(f"b{s}", "bpe", s, b), "ratio": h / b, "ratio_de": 0.95}
            for s, h, b in ((100, 3.3, 3.0), (200, 3.0, 2.8), (400, 2.8, 2.7))]
  sweep = {f: {"best_lr": 2e-3, "best_variant": "base", "lrs_tried": {"0.002": 3.3},
               "variants": {}, "runs": [ladder[0][f]]} for f in ("hat", "bpe")}
  cpt = {f: {"flops_per_step": 1e9, "steps": 50, "flops_to_bpe_final_de": r,
             "before": {"en_val": {"bpb": 2.8}, "de_val": {"bpb": 5.0}},
             "after": {"en_val": {"bpb": 3.1}, "de_val": {"bpb": 2.9}},
             "curve": {"en_val": {"0": 2.8, "50": 3.1}, "de_val": {"0": 5.0, "50": 2.9}}}
         for f, r in (("hat", 4e10), ("bpe", 5e10))}
  cpt["target_de_bpb"] = 2.9
  results = {
      "preset": "quick", "machine": {"machine": "x", "cores": 2, "backend": "cpu",
                                     "jax": "0", "finished": "now"},
      "en": "en", "de": "de", "window_bytes": 512, "batch_size": 8, "vocabs": [4096],
      "setup": {"bytes_per_word": {"whitespace": 5.7, "unicode": 4.9},
                "bytes_per_token": {4096: 3.2}, "bytes_per_token_de": {4096: 2.0},
                "matched": {"model.backbone.num_layers": 3, "model.backbone.d_model": 160},
                "match_ratio": 1.0, "matched_knobs": {}},
      "ladder": ladder, "sweep": sweep, "cpt": cpt, "variant_flops_cap": 1.1,
      "matched": {"step": 100, "curve_bpb": 2.81, "hat_curve_bpb": 2.8,
                  "final_eval": {"bpb": 2.79}},
      "robustness": {}, "decomposition": None, "samples": {"hat_en": "The old man"}}
  path = report.write(tmp_path, results, "python tools/experiment.py --out x")
  text = path.read_text()
  assert (tmp_path / "ladder.png").stat().st_size > 0
  assert (tmp_path / "cpt_curves.png").stat().st_size > 0
  assert "1.100 -> 1.071 -> 1.037 (falls with compute)" in text
  assert "| 400 | 1,638,400 |" in text and "1.037" in text
  assert "reaches BPE's final German bpb at 0.80x BPE's FLOPs" in text
  import json
  assert json.loads((tmp_path / "results.json").read_text())["ladder"][2]["steps"] == 400


def test_a_finished_run_with_other_settings_is_not_reused(tmp_path, monkeypatch):
  from study.runner import Runner

  runner = Runner(tmp_path)
  calls = []
  monkeypatch.setattr(runner, "run", lambda cmd, log: calls.append(cmd) or "")
  runner.train("r", "configs/tiny_hat.py", {"steps": 10, "optim.lr": 0.002})
  runner.train("r", "configs/tiny_hat.py", {"steps": 10, "optim.lr": 0.002})
  assert len(calls) == 1  # the second call finds it done
  with pytest.raises(RuntimeError, match="other settings"):
    runner.train("r", "configs/tiny_hat.py", {"steps": 10, "optim.lr": 0.004})


def test_many_runs_tasks_in_order_with_several_jobs(tmp_path):
  from study.runner import Runner

  assert Runner(tmp_path, jobs=3).many([lambda i=i: i * i for i in range(5)]) == [0, 1, 4, 9, 16]
  assert Runner(tmp_path, jobs=1).many([lambda: "a"]) == ["a"]
