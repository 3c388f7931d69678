"""Figures of the robustness suite with 95% bootstrap intervals, paired across models.

Input: per-example scores, `raw[model][kind][rate] = {"ll": [S][N], "cloze_ll": [S][N][K]}`
(S perturbation seeds, N examples, K cloze options with the true one first), and the
continuation length of each example in bytes. An example's value is its mean over the
seeds; the bootstrap resamples examples, with one set of resampled indices shared by every
model, perturbation and rate, so a model's degradation (perturbed vs clean) and the
difference between two models are paired and get their own intervals.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

STATS = ("bpb", "degradation", "cloze_acc")


def _interval(samples_B: np.ndarray) -> list[float]:
  lo, hi = np.percentile(samples_B, [2.5, 97.5])
  return [float(lo), float(hi)]


def _entry(name: str, value: float, samples_B: np.ndarray, by_seed) -> dict:
  lo, hi = _interval(samples_B)
  by_seed = np.asarray(by_seed, np.float64)
  return {name: float(value), f"{name}_ci95": [lo, hi],
          f"{name}_excludes_zero": bool(lo > 0 or hi < 0),
          f"{name}_seed_sd": float(np.std(by_seed)) if by_seed.size > 1 else 0.0}


def summarize(raw: dict, cont_bytes: Sequence[int], *, bootstrap: int = 2000,
              seed: int = 0) -> dict:
  """{"results": {model: {kind: {rate: stats}}}, "comparisons": {"A - B": ...}}.

  Each of `bpb`, `degradation` (bpb / clean bpb - 1) and `cloze_acc` comes with
  `<stat>_ci95` ([lo, hi]), `<stat>_excludes_zero` and `<stat>_seed_sd` (spread of the
  whole-set figure over perturbation seeds). Comparisons: the first model minus each other.
  """
  if bootstrap < 1:
    raise ValueError(f"bootstrap must be >= 1, got {bootstrap}")
  bytes_N = np.asarray(cont_bytes, np.float64)
  n = len(bytes_N)
  idx_BxN = np.random.default_rng(seed).integers(0, n, (bootstrap, n))
  models = list(raw)

  def per_example(model, kind, rate):
    r = raw[model][kind][rate]
    ll_SxN = np.asarray(r["ll"], np.float64)
    cl_SxNxK = np.asarray(r["cloze_ll"], np.float64)
    # The true option must beat every distractor (a tie counts as wrong).
    correct_SxN = (cl_SxNxK[..., 0:1] > cl_SxNxK[..., 1:]).all(-1).astype(np.float64)
    return ll_SxN, correct_SxN

  def bpb(ll_N, idx=None):
    if idx is None:
      return -ll_N.sum() / (math.log(2.0) * bytes_N.sum())
    return -ll_N[idx].sum(-1) / (math.log(2.0) * bytes_N[idx].sum(-1))

  # stats[model][kind][rate] = {stat: (value, samples_B, by_seed)}
  stats: dict = {}
  for m in models:
    for kind, by_rate in raw[m].items():
      clean = min(by_rate)
      ll0_SxN, _ = per_example(m, kind, clean)
      ll0_N = ll0_SxN.mean(0)
      clean_B, clean_v = bpb(ll0_N, idx_BxN), bpb(ll0_N)
      for rate in by_rate:
        ll_SxN, cor_SxN = per_example(m, kind, rate)
        ll_N, cor_N = ll_SxN.mean(0), cor_SxN.mean(0)
        bpb_B, bpb_v = bpb(ll_N, idx_BxN), bpb(ll_N)
        stats.setdefault(m, {}).setdefault(kind, {})[rate] = {
            "bpb": (bpb_v, bpb_B, [bpb(s) for s in ll_SxN]),
            "degradation": (bpb_v / clean_v - 1.0, bpb_B / clean_B - 1.0,
                            [bpb(s) / clean_v - 1.0 for s in ll_SxN]),
            "cloze_acc": (cor_N.mean(), cor_N[idx_BxN].mean(-1), cor_SxN.mean(-1))}

  results: dict = {}
  for m in models:
    for kind, by_rate in stats[m].items():
      for rate, st in by_rate.items():
        results.setdefault(m, {}).setdefault(kind, {})[rate] = {
            k: v for name in STATS for k, v in _entry(name, *st[name]).items()}
  comparisons: dict = {}
  for other in models[1:]:
    label = f"{models[0]} - {other}"
    for kind, by_rate in stats[models[0]].items():
      for rate, st in by_rate.items():
        ot = stats[other][kind][rate]
        comparisons.setdefault(label, {}).setdefault(kind, {})[rate] = {
            k: v for name in STATS for k, v in _entry(
                name, st[name][0] - ot[name][0], st[name][1] - ot[name][1],
                np.asarray(st[name][2]) - np.asarray(ot[name][2])).items()}
  return {"results": results, "comparisons": comparisons}
