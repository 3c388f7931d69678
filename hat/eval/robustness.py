"""Robustness to perturbed input: bpb of a clean continuation after a perturbed context,
and a cloze task (the true next word among same-length distractors).

Every model is scored on the identical examples and the identical perturbed contexts, so
the degradation relative to the clean rate is directly comparable across HAT and BPE.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
from typing import Sequence

from hat import storage
from hat.eval.loglik import Scorer
from hat.eval.perturb import perturb

_WORD = re.compile(r"\S+")


@dataclasses.dataclass(frozen=True)
class Example:
  """A context, its clean continuation, and a cloze item (true word + distractors)."""

  context: str
  continuation: str
  answer: str
  distractors: tuple[str, ...]


def make_examples(docs: Sequence[bytes], n: int, *, context_bytes: int = 200,
                  continuation_bytes: int = 100, num_distractors: int = 3,
                  seed: int = 0) -> list[Example]:
  """Deterministic examples cut at whitespace from UTF-8 documents."""
  rng = random.Random(seed)
  texts = []
  for d in docs:
    try:
      t = d.decode("utf-8")
    except UnicodeDecodeError:
      continue  # perturbations work on characters; skip the rare undecodable document
    if len(t.encode()) >= context_bytes + continuation_bytes:
      texts.append(t)
  if not texts:
    raise ValueError(f"no document has {context_bytes + continuation_bytes} bytes of UTF-8 "
                     "text for robustness examples; lower --context-bytes")
  by_len: dict[int, list[str]] = {}
  for t in texts[:2000]:
    for w in _WORD.findall(t):
      if w.isalpha():
        by_len.setdefault(len(w), []).append(w)
  out = []
  for i in range(n * 20):
    if len(out) == n:
      break
    t = texts[rng.randrange(len(texts))]
    starts = [m.start() for m in _WORD.finditer(t)]
    cands = [s for s in starts if len(t[:s].encode()) >= context_bytes
             and len(t[s:].encode()) >= continuation_bytes]
    if not cands:
      continue
    s = rng.choice(cands[:50])
    ctx = t[:s]
    ctx = ctx[-context_bytes:]
    cont = t[s:s + continuation_bytes]
    answer = _WORD.match(t, s).group(0)
    pool = [w for w in by_len.get(len(answer), []) if w != answer]
    if not answer.isalpha() or len(set(pool)) < num_distractors:
      continue
    distractors = tuple(rng.sample(sorted(set(pool)), num_distractors))
    out.append(Example(ctx, cont, answer, distractors))
  if len(out) < n:
    raise ValueError(f"only {len(out)} of {n} robustness examples could be cut from the set")
  return out


def evaluate_robustness(scorers: dict[str, Scorer], examples: Sequence[Example],
                        kinds: Sequence[str], rates: Sequence[float], seed: int = 0) -> dict:
  """{model: {kind: {rate: {bpb, cloze_acc}}}} on the identical perturbed contexts."""
  results: dict = {name: {} for name in scorers}
  cont_bytes = sum(len(e.continuation.encode()) for e in examples)
  for kind in kinds:
    for rate in rates:
      ctxs = [perturb(e.context, kind, rate, seed=seed + i) for i, e in enumerate(examples)]
      lm_reqs = [(c, e.continuation) for c, e in zip(ctxs, examples)]
      cloze_reqs = [(c, o) for c, e in zip(ctxs, examples)
                    for o in (e.answer,) + e.distractors]
      for name, scorer in scorers.items():
        ll = sum(s.logprob for s in scorer.loglikelihood_many(lm_reqs))
        scores = [s.logprob for s in scorer.loglikelihood_many(cloze_reqs)]
        k = 1 + len(examples[0].distractors)
        correct = sum(max(range(k), key=lambda j: scores[i * k + j]) == 0
                      for i in range(len(examples)))
        results[name].setdefault(kind, {})[rate] = {
            "bpb": -ll / (math.log(2.0) * cont_bytes),
            "cloze_acc": correct / len(examples)}
  return results


def degradation(results: dict) -> dict:
  """Relative bpb increase over the clean rate: bpb(rate) / bpb(0) - 1."""
  out: dict = {}
  for name, by_kind in results.items():
    for kind, by_rate in by_kind.items():
      clean = by_rate[min(by_rate)]["bpb"]
      out.setdefault(name, {})[kind] = {r: v["bpb"] / clean - 1.0 for r, v in by_rate.items()}
  return out


def write_report(results: dict, out_dir: storage.PathLike, meta: dict) -> storage.Path:
  """Writes robustness.json, robustness.md and robustness.png; returns the markdown path."""
  out_dir = storage.path(out_dir)  # local or gs://
  out_dir.mkdir(parents=True, exist_ok=True)
  deg = degradation(results)
  (out_dir / "robustness.json").write_text(json.dumps(
      {"meta": meta, "results": _str_keys(results), "degradation": _str_keys(deg)}, indent=2))
  models = list(results)
  kinds = list(next(iter(results.values())))
  rates = sorted(next(iter(next(iter(results.values())).values())))
  lines = [f"# Robustness\n", "\n".join(f"- {k}: {v}" for k, v in meta.items()), "",
           "bpb of the clean continuation after a perturbed context (relative change vs "
           "clean in brackets), and cloze accuracy.", "",
           "| perturbation | rate | " + " | ".join(f"{m} bpb | {m} cloze" for m in models)
           + " |", "|---|---:|" + "---:|---:|" * len(models)]
  for kind in kinds:
    for rate in rates:
      cells = []
      for m in models:
        r = results[m][kind][rate]
        cells += [f"{r['bpb']:.3f} ({deg[m][kind][rate]:+.1%})", f"{r['cloze_acc']:.3f}"]
      lines.append(f"| {kind} | {rate:g} | " + " | ".join(cells) + " |")
  md = out_dir / "robustness.md"
  md.write_text("\n".join(lines) + "\n\n![robustness](robustness.png)\n")
  _plot(deg, out_dir / "robustness.png")
  return md


def _str_keys(d):
  return {str(k): _str_keys(v) if isinstance(v, dict) else v for k, v in d.items()}


def _plot(deg: dict, path: storage.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  models = list(deg)
  kinds = list(deg[models[0]])
  cols = min(4, len(kinds))
  rows = math.ceil(len(kinds) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
  for ax, kind in zip(axes.ravel(), kinds):
    for m in models:
      rates = sorted(deg[m][kind])
      ax.plot([100 * r for r in rates], [100 * deg[m][kind][r] for r in rates], marker="o",
              label=m)
    ax.set_title(kind)
    ax.set_xlabel("perturbed characters (%)")
    ax.set_ylabel("bpb increase (%)")
    ax.grid(alpha=0.3)
  for ax in axes.ravel()[len(kinds):]:
    ax.axis("off")
  axes.ravel()[0].legend()
  fig.suptitle("Degradation of continuation bpb under context perturbation")
  fig.tight_layout()
  with path.open("wb") as f:  # a file object: matplotlib cannot open a gs:// URL
    fig.savefig(f, format="png", dpi=120)
  plt.close(fig)
