"""Robustness of trained runs (HAT and BPE side by side) to perturbed input.

    python -m hat.robustness --run hat=runs/hat_en --run bpe=runs/bpe_en \
        --eval text:../shared/data/corpus/en --out runs/robustness

For each perturbation type and rate (default 0, 5, 10, 20% of characters) it measures the
bpb of a clean continuation given a perturbed context, and a cloze task (the true next
word among same-length distractors). Every figure gets a 95% bootstrap interval over
examples (each example averaged over --seeds perturbation seeds), and the first run is
compared with each other one on the same resampled examples (paired differences of bpb,
degradation and cloze accuracy, saying whether each interval excludes zero). It writes
robustness.md, robustness.json (per-example log-likelihoods included) and a PNG chart.

Where the text is cut (--cut): `canonical` ends the context at the end of a word and
starts the continuation with the space (lm-eval convention; a BPE model sees the
tokenisation it was trained on); `word_start` cuts after the space, which puts a BPE model
off-distribution unless --exact (the default) marginalises over its tokenisations.
"""

from __future__ import annotations

import argparse
import sys

from hat.cli import entry_point
from hat.eval.perturb import PAPER_PERTURBATIONS, PERTURBATIONS
from hat.eval.robustness import CUTS


@entry_point
def main(argv: list[str]) -> int:
  """CLI entry point."""
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--run", action="append", required=True,
                      help="name=workdir of a trained run (repeatable)")
  parser.add_argument("--eval", default=None,
                      help="source spec or eval-set name of the first run (default: its "
                      "first eval set); its validation split gives the examples")
  parser.add_argument("--perturbations", default=",".join(PAPER_PERTURBATIONS),
                      help=f"comma list from {sorted(PERTURBATIONS)} or 'all'")
  parser.add_argument("--rates", default="0,0.05,0.1,0.2")
  parser.add_argument("--examples", type=int, default=200)
  parser.add_argument("--context-bytes", type=int, default=200)
  parser.add_argument("--continuation-bytes", type=int, default=100)
  parser.add_argument("--seed", type=int, default=0,
                      help="picks the examples; perturbation seeds start here")
  parser.add_argument("--seeds", type=int, default=3,
                      help="perturbation seeds per example (averaged per example)")
  parser.add_argument("--cut", choices=CUTS, default="canonical",
                      help="canonical: continuation starts with the space (default); "
                      "word_start: context ends with the space")
  parser.add_argument("--exact", action=argparse.BooleanOptionalAction, default=True,
                      help="score BPE runs with the exact byte-level likelihood (sum over "
                      "cover encodings; the same event HAT scores), valid at any cut; "
                      "--no-exact: the lm-eval token path. Other families are exact anyway")
  parser.add_argument("--bootstrap", type=int, default=2000,
                      help="bootstrap resamples for the 95%% intervals")
  parser.add_argument("--batch-size", type=int, default=8, help="scoring batch size")
  parser.add_argument("--out", required=True, help="output directory")
  args = parser.parse_args(argv)
  for flag in ("examples", "seeds", "bootstrap", "batch_size"):
    if getattr(args, flag) < 1:
      parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")

  kinds = list(PERTURBATIONS) if args.perturbations == "all" else \
      [k.strip() for k in args.perturbations.split(",") if k.strip()]
  unknown = [k for k in kinds if k not in PERTURBATIONS]
  if unknown:
    parser.error(f"unknown perturbation(s) {unknown}; choose from {sorted(PERTURBATIONS)}")
  rates = sorted({float(r) for r in args.rates.split(",")} | {0.0})

  from hat.data.pipeline import validation_documents
  from hat.data.sources import parse_eval_sets
  from hat.eval.loglik import Scorer
  from hat.eval.robustness import evaluate_robustness, make_examples
  from hat.eval.robustness_report import write_report
  from hat.rundir import load_for_inference

  scorers, first_cfg = {}, None
  for item in args.run:
    name, sep, workdir = item.partition("=")
    if not sep:
      parser.error(f"--run {item!r} is not name=workdir")
    model, cfg, tok = load_for_inference(workdir)
    first_cfg = first_cfg or cfg
    scorers[name] = Scorer(model, cfg, tok, batch_size=args.batch_size, exact=args.exact)
  spec = args.eval or next(iter(parse_eval_sets(first_cfg.data.eval, first_cfg.data.train)))
  docs = validation_documents(first_cfg, spec)
  examples = make_examples([docs[i] for i in range(len(docs))], args.examples,
                           context_bytes=args.context_bytes,
                           continuation_bytes=args.continuation_bytes, seed=args.seed,
                           cut=args.cut)
  report = evaluate_robustness(scorers, examples, kinds, rates, seed=args.seed,
                               seeds=args.seeds, bootstrap=args.bootstrap)
  meta = {"runs": ", ".join(args.run), "eval": spec, "examples": len(examples),
          "cut": args.cut, "exact": args.exact, "seeds": args.seeds, "seed": args.seed,
          "bootstrap": args.bootstrap}
  for name, scorer in scorers.items():
    if scorer.exact is not None:
      st = scorer.exact.stats
      meta[f"{name} exact cost"] = (f"{st.rows / max(1, st.requests):.2f} model rows and "
                                    f"{st.covers / max(1, st.requests):.1f} covers per request")
  md = write_report(report, args.out, meta, examples)
  print(md.read_text())
  return 0


if __name__ == "__main__":
  sys.exit(main())
