"""The study's decisions and derived figures, as pure functions of measured numbers."""

from __future__ import annotations

import math
from typing import Sequence


def best(results: dict, key=lambda r: r["bpb"]):
  """The name of the lowest-bpb entry of {name: result}."""
  return min(results, key=lambda n: key(results[n]))


def next_lr(tried: dict[float, float], factor: float = 2.0) -> float | None:
  """One more learning rate when the best of `tried` (lr -> bpb) sits at an edge, else None.

  A sweep whose optimum is its smallest or largest value has not found the optimum; one
  step further in that direction tells whether it lies beyond.
  """
  lrs = sorted(tried)
  if len(lrs) < 2:
    return None
  top = min(tried, key=tried.get)
  if top == lrs[0]:
    return lrs[0] / factor
  if top == lrs[-1]:
    return lrs[-1] * factor
  return None


def max_tokens_for(window_bytes: int, bytes_per_token: float, headroom: float = 1.2,
                   multiple: int = 16) -> int:
  """A token layout's capacity for windows of `window_bytes` at the measured bytes/token.

  Headroom covers windows denser than the average plus one BOS per document; a window
  that still overflows carries into the next sequence (counted, never truncated).
  """
  need = window_bytes / bytes_per_token * headroom + 8
  return int(math.ceil(need / multiple) * multiple)


def flops_to_reach(curve: Sequence[tuple[float, float]], target: float) -> float | None:
  """FLOPs at which a falling (flops, bpb) curve first reaches `target`, interpolated.

  Linear interpolation between the two evaluations that bracket the target; None when
  the curve never gets there.
  """
  pts = sorted(curve)
  for (f0, b0), (f1, b1) in zip(pts, pts[1:]):
    if b0 <= target:
      return f0
    if b1 <= target:
      return f0 + (f1 - f0) * (b0 - target) / (b0 - b1)
  if pts and pts[-1][1] <= target:
    return pts[-1][0]
  return None


def nearest_checkpoint(curve: dict[int, float], target: float) -> int:
  """The step of {step: bpb} whose bpb is nearest `target` (the earlier on a tie)."""
  if not curve:
    raise ValueError("no evaluated checkpoint to match")
  return min(sorted(curve), key=lambda s: abs(curve[s] - target))


def ratio_trend(ratios: Sequence[float], tol: float = 0.01) -> str:
  """How a sequence of HAT/BPE ratios over growing budgets moves, in words.

  Changes under `tol` (about the spread of one run's bpb between seeds at this scale)
  count as flat.
  """
  if len(ratios) < 2 or abs(ratios[-1] - ratios[0]) < tol:
    return "stays flat"
  steps = [b - a for a, b in zip(ratios, ratios[1:])]
  falls = ratios[-1] < ratios[0]
  if all((d < 0) == falls or abs(d) < tol for d in steps):
    return "falls with compute" if falls else "rises with compute"
  return ("falls overall, not monotonically" if falls
          else "rises overall, not monotonically")


def carried_variant(variants: dict[str, tuple[float, float]], base: str,
                    flops_cap: float) -> str:
  """The variant to carry up the ladder: {name: (bpb, flops per step)} -> name.

  The lowest bpb among the base and the variants that cost at most `flops_cap` times the
  base's FLOPs per step: a better but costlier variant would break the compute matching.
  """
  limit = variants[base][1] * flops_cap
  allowed = {n: v for n, v in variants.items() if n == base or v[1] <= limit}
  return min(allowed, key=lambda n: allowed[n][0])
