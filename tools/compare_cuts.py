"""Clean-continuation bpb and cloze accuracy of trained runs at both cuts, plain and exact.

    python tools/compare_cuts.py --run HAT=runs/hat_en --run BPE=runs/bpe_en \
        --eval en_val --examples 200

On the same examples (the same word positions; only the space moves between context and
continuation) it scores (a) the word-start cut with the lm-eval path, (b) the canonical
cut with the lm-eval path, (c) the word-start cut with exact byte-level scoring and
(d) the canonical cut with exact scoring, with 95% bootstrap intervals, and the exact
scorer's cost (model rows and covers per request, time against the plain path).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np


def main(argv: list[str]) -> int:
  """Prints a markdown table of the four settings per run."""
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--run", action="append", required=True, help="name=workdir (repeatable)")
  p.add_argument("--eval", default=None, help="eval set of the first run (default: first)")
  p.add_argument("--examples", type=int, default=200)
  p.add_argument("--context-bytes", type=int, default=200)
  p.add_argument("--continuation-bytes", type=int, default=100)
  p.add_argument("--bootstrap", type=int, default=2000)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)

  from hat.data.pipeline import validation_documents
  from hat.data.sources import parse_eval_sets
  from hat.eval.loglik import Scorer
  from hat.eval.robustness import make_examples
  from hat.rundir import load_for_inference

  loaded = {}
  for item in args.run:
    name, _, workdir = item.partition("=")
    loaded[name] = load_for_inference(workdir)
  cfg0 = next(iter(loaded.values()))[1]
  spec = args.eval or next(iter(parse_eval_sets(cfg0.data.eval, cfg0.data.train)))
  docs = validation_documents(cfg0, spec)
  docs = [docs[i] for i in range(len(docs))]
  ex = {cut: make_examples(docs, args.examples, context_bytes=args.context_bytes,
                           continuation_bytes=args.continuation_bytes, seed=args.seed,
                           cut=cut) for cut in ("word_start", "canonical")}
  idx_BxN = np.random.default_rng(args.seed).integers(
      0, args.examples, (args.bootstrap, args.examples))
  settings = [("a", "word_start", False), ("b", "canonical", False),
              ("c", "word_start", True), ("d", "canonical", True)]
  print(f"{args.examples} examples from {spec}; 95% bootstrap intervals\n")
  print("| run | setting | cut | scoring | bpb | cloze acc | s / request |")
  print("|---|---|---|---|---:|---:|---:|")
  per: dict = {}
  for name, (model, cfg, tok) in loaded.items():
    scorers = {False: Scorer(model, cfg, tok), True: Scorer(model, cfg, tok, exact=True)}
    for label, cut, exact in settings:
      es, scorer = ex[cut], scorers[exact]
      k = 1 + len(es[0].distractors)
      reqs = [(e.context, e.continuation) for e in es]
      reqs += [(e.context, o) for e in es for o in (e.answer,) + e.distractors]
      scorer.loglikelihood_many(reqs[:8])  # compile outside the timing
      t0 = time.perf_counter()
      lls = np.asarray([s.logprob for s in scorer.loglikelihood_many(reqs)])
      dt = (time.perf_counter() - t0) / len(reqs)
      n = len(es)
      ll_N, cl_NxK = lls[:n], lls[n:].reshape(n, k)
      bytes_N = np.asarray([len(e.continuation.encode()) for e in es], np.float64)
      right_N = (cl_NxK[:, :1] > cl_NxK[:, 1:]).all(-1).astype(np.float64)
      bpb_B = -ll_N[idx_BxN].sum(-1) / (math.log(2) * bytes_N[idx_BxN].sum(-1))
      bpb = -ll_N.sum() / (math.log(2) * bytes_N.sum())
      acc_B = right_N[idx_BxN].mean(-1)
      per[(name, label)] = (ll_N, bytes_N)
      lo, hi = np.percentile(bpb_B, [2.5, 97.5])
      alo, ahi = np.percentile(acc_B, [2.5, 97.5])
      print(f"| {name} | ({label}) | {cut} | {'exact' if exact else 'lm-eval'} | "
            f"{bpb:.3f} [{lo:.3f}, {hi:.3f}] | {right_N.mean():.3f} [{alo:.3f}, {ahi:.3f}] "
            f"| {dt:.4f} |", flush=True)
    if scorers[True].exact is not None:
      st = scorers[True].exact.stats
      print(f"\n{name} exact: {st.rows / st.requests:.2f} model rows, "
            f"{st.groups / st.requests:.2f} cover groups, {st.covers / st.requests:.1f} "
            f"cover encodings per request ({st.requests} requests)\n")
  # Paired: (a) - (c) per run, relative to (c).
  for name in loaded:
    (la, ba), (lc, bc) = per[(name, "a")], per[(name, "c")]
    ra = -la[idx_BxN].sum(-1) / (math.log(2) * ba[idx_BxN].sum(-1))
    rc = -lc[idx_BxN].sum(-1) / (math.log(2) * bc[idx_BxN].sum(-1))
    rel = ra / rc - 1
    va = -la.sum() / (math.log(2) * ba.sum())
    vc = -lc.sum() / (math.log(2) * bc.sum())
    lo, hi = np.percentile(rel, [2.5, 97.5])
    print(f"{name}: (a) vs (c): {va / vc - 1:+.2%} [{lo:+.2%}, {hi:+.2%}]")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
