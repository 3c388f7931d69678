"""Writes the robustness report: robustness.json, robustness.md and robustness.png.

robustness.json (format "hat.robustness/2"), top level:
- `meta`: how it was made (runs, eval set, cut, exact, seeds, bootstrap, examples);
- `models`, `kinds`, `rates`, `seeds`;
- `results[model][kind][rate]`: `bpb`, `degradation` (bpb / clean bpb - 1) and
  `cloze_acc`, each with `<stat>_ci95` ([lo, hi], 95% bootstrap over examples),
  `<stat>_excludes_zero` and `<stat>_seed_sd` (spread over perturbation seeds);
- `comparisons["A - B"][kind][rate]`: the same three stats for the paired difference of
  the first model and another (same resampled examples for both);
- `degradation[model][kind][rate]`: the plain relative bpb increase (as before);
- `examples`: context, continuation, answer, distractors and continuation bytes;
- `per_example[model][kind][rate]`: `ll` [seed][example] (nats of the continuation) and
  `cloze_ll` [seed][example][option, the answer first]: enough to recompute everything.
Rates are JSON keys, written with `str(rate)`.
"""

from __future__ import annotations

import json
from typing import Sequence

from hat import storage

FORMAT = "hat.robustness/2"


def _str_keys(d):
  return {str(k): _str_keys(v) if isinstance(v, dict) else v for k, v in d.items()}


def _rounded(x):
  if isinstance(x, dict):
    return {k: _rounded(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_rounded(v) for v in x]
  return round(float(x), 6)


def _ci(r: dict, stat: str, fmt: str, scale: float = 1.0) -> str:
  if r.get(f"{stat}_ci95") is None:  # point figures only
    return format(scale * r[stat], fmt)
  lo, hi = r[f"{stat}_ci95"]
  star = "*" if r[f"{stat}_excludes_zero"] else ""
  return (f"{format(scale * r[stat], fmt)} [{format(scale * lo, fmt)}, "
          f"{format(scale * hi, fmt)}]{star}")


def _from_point_figures(results: dict) -> dict:
  """A report (no intervals) from plain {model: {kind: {rate: {bpb, cloze_acc}}}}."""
  stats = ("bpb", "degradation", "cloze_acc")
  full: dict = {}
  for m, by_kind in results.items():
    for kind, by_rate in by_kind.items():
      clean = by_rate[min(by_rate)]["bpb"]
      for rate, v in by_rate.items():
        point = {"bpb": v["bpb"], "degradation": v["bpb"] / clean - 1.0,
                 "cloze_acc": v["cloze_acc"]}
        full.setdefault(m, {}).setdefault(kind, {})[rate] = {
            k: x for s in stats for k, x in ((s, point[s]), (f"{s}_ci95", None),
                                             (f"{s}_excludes_zero", None))}
  models = list(full)
  comps = {f"{models[0]} - {o}": {
      kind: {rate: {k: (v - full[o][kind][rate][k] if v is not None and k in stats else v)
                    for k, v in e.items()} for rate, e in by_rate.items()}
      for kind, by_rate in full[models[0]].items()} for o in models[1:]}
  return {"results": full, "comparisons": comps, "per_example": {}}


def write_report(report: dict, out_dir: storage.PathLike, meta: dict,
                 examples: Sequence = ()) -> storage.Path:
  """Writes robustness.json, robustness.md and robustness.png; returns the markdown path.

  `report` is `evaluate_robustness`'s output, or plain point figures
  {model: {kind: {rate: {"bpb", "cloze_acc"}}}} (then without intervals).
  """
  out_dir = storage.path(out_dir)  # local or gs://
  out_dir.mkdir(parents=True, exist_ok=True)
  if "results" not in report:
    report = _from_point_figures(report)
  results, comps = report["results"], report["comparisons"]
  models = list(results)
  kinds = list(results[models[0]])
  rates = sorted(results[models[0]][kinds[0]])
  raw = report["per_example"]
  seeds = len(raw[models[0]][kinds[0]][rates[0]]["ll"]) if raw else 0
  deg = {m: {k: {r: v["degradation"] for r, v in by_rate.items()}
             for k, by_rate in by_kind.items()} for m, by_kind in results.items()}
  (out_dir / "robustness.json").write_text(json.dumps({
      "format": FORMAT, "meta": meta, "models": models, "kinds": kinds, "rates": rates,
      "seeds": seeds, "results": _str_keys(results), "comparisons": _str_keys(comps),
      "degradation": _str_keys(deg),
      "examples": [{"context": e.context, "continuation": e.continuation,
                    "answer": e.answer, "distractors": list(e.distractors),
                    "continuation_bytes": len(e.continuation.encode())} for e in examples],
      "per_example": _str_keys(_rounded(raw))}))

  lines = ["# Robustness", "", "\n".join(f"- {k}: {v}" for k, v in meta.items()), "",
           "bpb of the clean continuation after a perturbed context, its change relative to "
           "the clean context (%), and cloze accuracy. " + (
               "Brackets: 95% bootstrap interval over examples (each example averaged over "
               f"{seeds} perturbation seed(s)); `*`: the interval excludes zero." if seeds
               else "Point figures only (no per-example scores, so no intervals)."), "",
           "| perturbation | rate | " + " | ".join(
               f"{m} bpb | {m} vs clean (%) | {m} cloze" for m in models) + " |",
           "|---|---:|" + "---:|---:|---:|" * len(models)]
  for kind in kinds:
    for rate in rates:
      cells = []
      for m in models:
        r = results[m][kind][rate]
        cells += [_ci(r, "bpb", ".3f").rstrip("*"),
                  _ci(r, "degradation", "+.2f", 100) if rate else "0",
                  _ci(r, "cloze_acc", ".3f").rstrip("*")]
      lines.append(f"| {kind} | {rate:g} | " + " | ".join(cells) + " |")
  for label, by_kind in comps.items():
    lines += ["", f"## Paired difference: {label}", "",
              "Same resampled examples for both models; degradation in percentage points.",
              "", "| perturbation | rate | bpb | excl. 0 | degradation (pp) | excl. 0 | "
              "cloze | excl. 0 |", "|---|---:|---:|:-:|---:|:-:|---:|:-:|"]
    for kind in kinds:
      for rate in rates:
        c = by_kind[kind][rate]
        cells = [(_ci(c, "bpb", "+.3f"), "bpb"), (_ci(c, "degradation", "+.2f", 100),
                                                   "degradation"),
                 (_ci(c, "cloze_acc", "+.3f"), "cloze_acc")]
        yes = {True: "yes", False: "no", None: "-"}
        lines.append(f"| {kind} | {rate:g} | " + " | ".join(
            f"{text.rstrip('*')} | {yes[c[f'{s}_excludes_zero']]}" for text, s in cells)
                     + " |")
  md = out_dir / "robustness.md"
  md.write_text("\n".join(lines) + "\n\n![robustness](robustness.png)\n")
  _plot(results, out_dir / "robustness.png")
  return md


def _plot(results: dict, path: storage.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  models = list(results)
  kinds = list(results[models[0]])
  fig, axes = plt.subplots(2, len(kinds), figsize=(3.6 * len(kinds), 5.6), squeeze=False)
  for col, kind in enumerate(kinds):
    for i, m in enumerate(models):
      by_rate = results[m][kind]
      rates = sorted(by_rate)
      x = [100 * r + 0.3 * (i - (len(models) - 1) / 2) for r in rates]  # side by side
      for row, (stat, scale) in enumerate((("degradation", 100), ("cloze_acc", 1))):
        y = [scale * by_rate[r][stat] for r in rates]
        ci = [by_rate[r][f"{stat}_ci95"] or [by_rate[r][stat]] * 2 for r in rates]
        lo = [scale * (v[stat] - c[0]) for v, c in zip((by_rate[r] for r in rates), ci)]
        hi = [scale * (c[1] - v[stat]) for v, c in zip((by_rate[r] for r in rates), ci)]
        axes[row, col].errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=m)
    axes[0, col].set_title(kind)
    axes[0, col].set_ylabel("bpb increase (%)")
    axes[1, col].set_ylabel("cloze accuracy")
    for row in range(2):
      axes[row, col].set_xlabel("perturbed characters (%)")
      axes[row, col].grid(alpha=0.3)
  axes[0, 0].legend()
  fig.suptitle("Continuation bpb and cloze accuracy under context perturbation "
               "(95% bootstrap intervals)")
  fig.tight_layout()
  with path.open("wb") as f:  # a file object: matplotlib cannot open a gs:// URL
    fig.savefig(f, format="png", dpi=120)
  plt.close(fig)


def load(path: storage.PathLike) -> dict:
  """Reads a robustness.json, checking its format."""
  data = json.loads(storage.path(path).read_text())
  if data.get("format") != FORMAT:
    raise ValueError(f"{path} is not a {FORMAT} report (format={data.get('format')!r})")
  return data


def report_of(data: dict) -> dict:
  """`write_report`'s input back from a loaded robustness.json (rates as floats again)."""
  def rates(tree):  # {name: {kind: {"0.1": v}}} -> {name: {kind: {0.1: v}}}
    return {n: {k: {float(r): v for r, v in by.items()} for k, by in d.items()}
            for n, d in tree.items()}
  return {"results": rates(data["results"]), "comparisons": rates(data["comparisons"]),
          "per_example": rates(data["per_example"])}

