"""The study's training and evaluation stages; each skips what is already done.

1. sweep: each family's learning rates at the smallest budget (one more when the best is
   at an edge), then BPE's other vocabularies and HAT's knobs at the best rate;
2. ladder: the best setting of each family at every larger budget;
3. cpt: continued pretraining on German (with English replay) from the ladder top;
4. robustness: at final quality and against the BPE checkpoint of matched clean bpb;
5. decomposition of the top models' loss over whitespace words; samples.
"""

from __future__ import annotations

import dataclasses
import pathlib

from study import analysis
from study.presets import Preset
from study.runner import Runner, eval_curve
from study.setup import (BPE_CONFIG, HAT_CONFIG, Setup, bpe_overrides, flops_per_step,
                         hat_overrides, schedule)


# A variant costlier than this (FLOPs per step, against the base setting) is reported but
# not carried up the ladder: it would break the compute matching.
VARIANT_FLOPS_CAP = 1.1


@dataclasses.dataclass
class Trained:
  """One finished run: what it was, what it cost, how it scored."""

  name: str
  family: str  # "hat" | "bpe"
  config_file: str
  over: dict
  steps: int
  flops_per_step: float
  workdir: pathlib.Path
  en_bpb: float = float("nan")
  en_bytes: int = 0
  de_bpb: float = float("nan")

  @property
  def flops(self) -> float:
    return self.flops_per_step * self.steps

  def row(self) -> dict:
    """The JSON row of this run."""
    return {"name": self.name, "family": self.family, "steps": self.steps,
            "flops": self.flops, "flops_per_step": self.flops_per_step,
            "lr": self.over.get("optim.lr"), "en_bpb": self.en_bpb,
            "en_bytes": self.en_bytes, "de_bpb": self.de_bpb, "workdir": str(self.workdir)}


class Study:
  """Runs the stages of one preset into `runner.out`."""

  def __init__(self, runner: Runner, preset: Preset, setup: Setup, en: str, de: str):
    self.r, self.p, self.s = runner, preset, setup
    self.en, self.de = f"text:{en}", f"text:{de}"
    self.en_val = f"en_val={self.en}"
    self.de_val = f"de_val={self.de}"

  # ------------------------------------------------------------------ one run

  def _train(self, name: str, family: str, over: dict, steps: int,
             checkpoints: int = 1) -> Trained:
    cfg_file = HAT_CONFIG if family == "hat" else BPE_CONFIG
    full = {**over, **schedule(self.p, steps, checkpoints), "data.train": self.en,
            "data.eval": self.en_val}
    wd = self.r.train(name, cfg_file, full)
    res = self.r.evaluate(wd, ["en_val", self.de_val], self.p.final_eval_batches)
    return Trained(name, family, cfg_file, full, steps, flops_per_step(cfg_file, full), wd,
                   res["en_val"]["bpb"], int(res["en_val"]["bytes"]), res["de_val"]["bpb"])

  def _lr_name(self, lr: float) -> str:
    return "paper" if lr == 0 else f"{lr:g}"

  # ------------------------------------------------------------------ 1. sweep

  def sweep(self) -> dict:
    """LR sweeps, BPE vocabularies and HAT knobs at the smallest budget."""
    steps = self.p.budgets[0]
    out = {}
    for family, base in (("hat", hat_overrides(self.p, self.s)),
                         ("bpe", bpe_overrides(self.p, self.s, self.p.vocabs[0]))):
      runs = dict(zip(self.p.lrs, self.r.many(
          [lambda lr=lr: self._lr_run(family, base, lr, steps) for lr in self.p.lrs])))
      tried = {lr: t.en_bpb for lr, t in runs.items()}
      extra = analysis.next_lr(tried)
      if extra is not None:
        runs[extra] = self._lr_run(family, base, extra, steps)
      best_lr = min(runs, key=lambda lr: runs[lr].en_bpb)
      out[family] = {"lrs": runs, "best_lr": best_lr}
    variants = {"hat": {"base": out["hat"]["lrs"][out["hat"]["best_lr"]]},
                "bpe": {f"vocab_{self.p.vocabs[0]}": out["bpe"]["lrs"][out["bpe"]["best_lr"]]}}
    lr_b = out["bpe"]["best_lr"]
    for vocab in self.p.vocabs[1:]:
      over = {**bpe_overrides(self.p, self.s, vocab), "optim.lr": lr_b}
      variants["bpe"][f"vocab_{vocab}"] = self._train(
          f"bpe_s{steps}_lr{self._lr_name(lr_b)}_v{vocab}", "bpe", over, steps)
    lr_h = out["hat"]["best_lr"]

    def knob_run(knob: str) -> Trained:
      over = {**hat_overrides(self.p, self.s, knob), "optim.lr": lr_h}
      return self._train(f"hat_s{steps}_lr{self._lr_name(lr_h)}_{knob}", "hat", over, steps)

    variants["hat"].update(zip(self.p.knobs, self.r.many(
        [lambda k=k: knob_run(k) for k in self.p.knobs])))
    for family, base in (("hat", "base"), ("bpe", f"vocab_{self.p.vocabs[0]}")):
      out[family]["variants"] = variants[family]
      out[family]["best_variant"] = analysis.carried_variant(
          {n: (t.en_bpb, t.flops_per_step) for n, t in variants[family].items()}, base,
          VARIANT_FLOPS_CAP)
    return out

  def _lr_run(self, family: str, base: dict, lr: float, steps: int) -> Trained:
    tag = f"_v{self.p.vocabs[0]}" if family == "bpe" else ""
    return self._train(f"{family}_s{steps}_lr{self._lr_name(lr)}{tag}", family,
                       {**base, "optim.lr": lr}, steps)

  # ------------------------------------------------------------------ 2. ladder

  def ladder(self, sweep: dict) -> dict[str, list[Trained]]:
    """The chosen setting of each family at every budget (the smallest from the sweep)."""
    out = {}
    for family in ("hat", "bpe"):
      chosen = sweep[family]["variants"][sweep[family]["best_variant"]]
      rungs = [chosen]
      base = {k: v for k, v in chosen.over.items()
              if k not in schedule(self.p, 1) and not k.startswith("data.train")}
      for i, steps in enumerate(self.p.budgets[1:], start=1):
        top = i == len(self.p.budgets) - 1
        # Checkpoints along the top BPE run: robustness at matched clean quality.
        ckpts = self.p.bpe_checkpoints if (top and family == "bpe") else 1
        name = f"{family}_s{steps}_{sweep[family]['best_variant']}"
        rungs.append(self._train(name, family, base, steps, ckpts))
      if len(self.p.budgets) == 1 and family == "bpe" and self.p.bpe_checkpoints > 1:
        # A one-budget preset: retrain the chosen BPE run with its checkpoints kept.
        rungs = [self._train(f"bpe_s{chosen.steps}_ckpts", family, base, chosen.steps,
                             self.p.bpe_checkpoints)]
      out[family] = rungs
    return out

  # ------------------------------------------------------------------ 3. CPT

  def cpt(self, top: dict[str, Trained], replay: float) -> dict:
    """German (+ English replay) from each family's ladder top, with its own schedule."""
    out = {}
    mix = f"{self.de}={1 - replay:g},{self.en}={replay:g}"
    for family, t in top.items():
      over = {**t.over, **schedule(self.p, self.p.cpt_steps), "data.train": mix,
              "data.eval": f"{self.en_val},{self.de_val}", "init_from": str(t.workdir)}
      wd = self.r.train(f"{family}_cpt", t.config_file, over)
      before = self.r.evaluate(t.workdir, ["en_val", self.de_val], self.p.final_eval_batches)
      after = self.r.evaluate(wd, ["en_val", "de_val"], self.p.final_eval_batches)
      # Step 0 of the curve on the in-training eval windows (the first curve_batches).
      start = self.r.evaluate(t.workdir, ["en_val", self.de_val], self.p.curve_batches,
                              tag="curve0")
      fps = flops_per_step(t.config_file, over)
      curve = {k: {0: start[k]["bpb"], **eval_curve(wd, f"eval/{k}/bpb")}
               for k in ("en_val", "de_val")}
      out[family] = {"workdir": str(wd), "flops_per_step": fps, "steps": self.p.cpt_steps,
                     "before": before, "after": after,
                     "curve": {k: {str(s): v for s, v in c.items()} for k, c in curve.items()}}
    # FLOPs to reach BPE's final German bpb, on the in-training curves (same eval windows).
    target = out["bpe"]["curve"]["de_val"].get(str(self.p.cpt_steps))
    for family, res in out.items():
      pts = [(int(s) * res["flops_per_step"], v) for s, v in res["curve"]["de_val"].items()]
      res["flops_to_bpe_final_de"] = (None if target is None
                                      else analysis.flops_to_reach(pts, target))
    out["target_de_bpb"] = target
    return out

  # ------------------------------------------------------------------ 4. robustness

  def matched_bpe_checkpoint(self, hat_top: Trained, bpe_top: Trained) -> dict:
    """The BPE checkpoint whose in-training clean bpb is nearest HAT's final one."""
    hat_curve = eval_curve(hat_top.workdir, "eval/en_val/bpb")
    target = hat_curve[max(hat_curve)]
    bpe_curve = eval_curve(bpe_top.workdir, "eval/en_val/bpb")
    kept = {int(p.name) for p in (bpe_top.workdir / "checkpoints").glob("*") if p.name.isdigit()}
    candidates = {s: v for s, v in bpe_curve.items() if s in kept}
    step = analysis.nearest_checkpoint(candidates, target)
    ckpt = bpe_top.workdir / "checkpoints" / str(step)
    res = self.r.evaluate(ckpt, ["en_val"], self.p.final_eval_batches,
                          out=bpe_top.workdir / f"eval_step{step}.json")["en_val"]
    return {"step": step, "path": str(ckpt), "curve_bpb": candidates[step],
            "hat_curve_bpb": target, "final_eval": res}

  def robustness(self, hat: Trained, bpe: Trained, matched: dict) -> dict:
    """The robustness suite: fair protocol at final and matched quality, and the old one."""
    out = {}
    common = ["--eval", "en_val", "--examples", str(self.p.rob_examples), "--rates",
              self.p.rob_rates]
    plans = {
        "final": ([f"HAT={hat.workdir}", f"BPE={bpe.workdir}"],
                  ["--cut", "canonical", "--exact", "--seeds", str(self.p.rob_seeds)]),
        "matched": ([f"HAT={hat.workdir}", f"BPE@{matched['step']}={matched['path']}"],
                    ["--cut", "canonical", "--exact", "--seeds", str(self.p.rob_seeds)]),
        "old_protocol": ([f"HAT={hat.workdir}", f"BPE={bpe.workdir}"],
                         ["--cut", "word_start", "--no-exact", "--seeds", "1"]),
    }
    for name, (runs, extra) in plans.items():
      d = self.r.out / "robustness" / name
      args = ["-m", "hat.robustness", *sum((["--run", r] for r in runs), []), *common,
              *extra, "--out", str(d)]
      self.r.tool(args, f"robustness_{name}", d / "robustness.json")
      out[name] = str(d)
    return out

  # ------------------------------------------------------------------ 5. decomposition

  def decompose(self, hat: Trained, bpe: Trained, en_path: str) -> pathlib.Path:
    """Where the gap sits: the top models' NLL over whitespace-word buckets."""
    d = self.r.out / "decompose"
    self.r.tool(["tools/decompose.py", "--run", f"HAT={hat.workdir}", "--run",
                 f"BPE={bpe.workdir}", "--eval", "en_val", "--train-text", en_path,
                 "--max-bytes", str(self.p.decompose_bytes), "--no-progress", "--out",
                 str(d)],
                "decompose", d / "decompose.json")
    return d

  def samples(self, runs: dict[str, pathlib.Path]) -> dict[str, str]:
    """A seeded sample from each run (English prompt, German after CPT)."""
    out = {}
    for name, wd in runs.items():
      prompt = "Der alte Mann sagte, dass " if "cpt" in name else "The old man said that "
      f = self.r.out / "samples" / f"{name}.txt"
      if not f.exists():
        try:
          text = self.r.run([self.r.py, "-m", "hat.generate", "--workdir",
                             str(wd), "--prompt", prompt, "--max-new-bytes", "160",
                             "--seed", "0"], f"sample_{name}")
        except RuntimeError as e:
          text = f"(failed: {str(e).splitlines()[0]})"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
      out[name] = f.read_text()
    return out
