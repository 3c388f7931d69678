"""Robustness to perturbed input: bpb of a clean continuation after a perturbed context,
and a cloze task (the true next word among same-length distractors).

Every model is scored on the identical examples and the identical perturbed contexts, so
the degradation relative to the clean rate is directly comparable across HAT and BPE.

Where the text is cut matters for a BPE model (DESIGN.md section 10): its pieces carry
their leading space (`' the'`), so a context ending with the space and a continuation
starting the word are tokenised as `[..., ' that', ' '] + ['the', ...]`, never seen in
training. `cut="canonical"` (the default, as in lm-eval tasks) ends the context at the end
of a word and starts the continuation with the space; `cut="word_start"` is the older cut
after the space, kept to report both. Both cut at the same places (a word preceded by one
space after a non-space) and end the continuation at the end of a word, before a space.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import TYPE_CHECKING, Sequence

from hat.eval.perturb import perturb
from hat.eval.robustness_report import write_report  # noqa: F401 (part of this API)
from hat.eval.robustness_stats import summarize

if TYPE_CHECKING:  # the CLI imports this module before it needs jax
  from hat.eval.loglik import Scorer

_WORD = re.compile(r"\S+")
CUTS = ("canonical", "word_start")
_SEED_STRIDE = 1_000_003  # perturbation seed r of example i: seed + i + r * stride


@dataclasses.dataclass(frozen=True)
class Example:
  """A context, its clean continuation, and a cloze item (true word + distractors)."""

  context: str
  continuation: str
  answer: str
  distractors: tuple[str, ...]


def _tail_bytes(text: str, n: int) -> str:
  """The last <= n bytes of `text`, starting at a character boundary."""
  return text.encode()[-n:].decode("utf-8", "ignore") if n > 0 else ""


def make_examples(docs: Sequence[bytes], n: int, *, context_bytes: int = 200,
                  continuation_bytes: int = 100, num_distractors: int = 3,
                  seed: int = 0, cut: str = "canonical") -> list[Example]:
  """Deterministic examples cut before a word from UTF-8 documents (see module doc)."""
  if cut not in CUTS:
    raise ValueError(f"cut must be one of {CUTS}, got {cut!r}")
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
  lead = " " if cut == "canonical" else ""
  out = []
  for _ in range(n * 20):
    if len(out) == n:
      break
    t = texts[rng.randrange(len(texts))]
    # Word starts after exactly one space that follows a non-space: the one place where
    # both cuts exist and the canonical one is a token boundary for any BPE model.
    starts = [m.start() for m in _WORD.finditer(t)
              if m.start() >= 2 and t[m.start() - 1] == " " and not t[m.start() - 2].isspace()]
    cands = [s for s in starts if len(t[:s].encode()) >= context_bytes
             and len(t[s:].encode()) >= continuation_bytes]
    if not cands:
      continue
    s = rng.choice(cands[:50])
    # The continuation (space included) ends at the last word end before a space.
    ends = [m.end() for m in _WORD.finditer(t, s) if t[m.end():m.end() + 1] == " "
            and len(t[s - 1:m.end()].encode()) <= continuation_bytes]
    answer = _WORD.match(t, s).group(0)
    pool = sorted({w for w in by_len.get(len(answer), []) if w != answer})
    if not ends or not answer.isalpha() or len(pool) < num_distractors:
      continue
    base = _tail_bytes(t[:s - 1], context_bytes - 1)  # room for the word_start space
    distractors = tuple(lead + w for w in rng.sample(pool, num_distractors))
    if cut == "canonical":
      out.append(Example(base, t[s - 1:ends[-1]], lead + answer, distractors))
    else:
      out.append(Example(base + " ", t[s:ends[-1]], answer, distractors))
  if len(out) < n:
    raise ValueError(f"only {len(out)} of {n} robustness examples could be cut from the set")
  return out


def score_examples(scorers: dict[str, Scorer], examples: Sequence[Example],
                   kinds: Sequence[str], rates: Sequence[float], seed: int = 0,
                   seeds: int = 1) -> dict:
  """Per-example log-likelihoods {model: {kind: {rate: {"ll", "cloze_ll"}}}}.

  `ll[s][i]` is the continuation's log-prob (nats) after example i's context perturbed
  with seed s; `cloze_ll[s][i]` the log-probs of the answer then each distractor.
  The clean rate (0) is scored once and shared by every kind and seed.
  """
  if seeds < 1:
    raise ValueError(f"seeds must be >= 1, got {seeds}")
  k = 1 + len(examples[0].distractors)
  raw: dict = {name: {} for name in scorers}
  clean: dict = {}
  for kind in kinds:
    for rate in rates:
      for name, scorer in scorers.items():
        if rate == 0.0 and name in clean:
          raw[name].setdefault(kind, {})[rate] = clean[name]
          continue
        lls, cloze = [], []
        for r in range(1 if rate == 0.0 else seeds):
          ctxs = [perturb(e.context, kind, rate, seed=seed + i + r * _SEED_STRIDE)
                  for i, e in enumerate(examples)]
          reqs = [(c, e.continuation) for c, e in zip(ctxs, examples)]
          reqs += [(c, o) for c, e in zip(ctxs, examples) for o in (e.answer,) + e.distractors]
          scores = [x.logprob for x in scorer.loglikelihood_many(reqs)]
          n = len(examples)
          lls.append(scores[:n])
          cloze.append([scores[n + i * k:n + (i + 1) * k] for i in range(n)])
        if rate == 0.0:
          lls, cloze = lls * seeds, cloze * seeds
          clean[name] = {"ll": lls, "cloze_ll": cloze}
        raw[name].setdefault(kind, {})[rate] = {"ll": lls, "cloze_ll": cloze}
  return raw


def evaluate_robustness(scorers: dict[str, Scorer], examples: Sequence[Example],
                        kinds: Sequence[str], rates: Sequence[float], seed: int = 0,
                        seeds: int = 1, bootstrap: int = 2000) -> dict:
  """Scores and summarises: {"results", "comparisons", "per_example"} (see `summarize`)."""
  rates = sorted(set(rates) | {0.0})
  raw = score_examples(scorers, examples, kinds, rates, seed=seed, seeds=seeds)
  cont_bytes = [len(e.continuation.encode()) for e in examples]
  return {**summarize(raw, cont_bytes, bootstrap=bootstrap, seed=seed), "per_example": raw}


def degradation(results: dict) -> dict:
  """Relative bpb increase over the clean rate: bpb(rate) / bpb(0) - 1."""
  out: dict = {}
  for name, by_kind in results.items():
    for kind, by_rate in by_kind.items():
      clean = by_rate[min(by_rate)]["bpb"]
      out.setdefault(name, {})[kind] = {r: v["bpb"] / clean - 1.0 for r, v in by_rate.items()}
  return out
