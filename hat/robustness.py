"""Robustness of trained runs (HAT and BPE side by side) to perturbed input.

    python -m hat.robustness --run hat=runs/hat_en --run bpe=runs/bpe_en \
        --eval text:../shared/data/corpus/en --out runs/robustness

For each perturbation type and rate (default 0, 5, 10, 20% of characters) it measures the
bpb of a clean continuation given a perturbed context, and a cloze task (the true next
word among same-length distractors). It writes robustness.md, robustness.json and a PNG
chart of the degradation relative to clean, per model.
"""

from __future__ import annotations

import argparse
import sys

from hat.cli import entry_point
from hat.eval.perturb import PAPER_PERTURBATIONS, PERTURBATIONS


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
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", required=True, help="output directory")
  args = parser.parse_args(argv)

  kinds = list(PERTURBATIONS) if args.perturbations == "all" else \
      [k.strip() for k in args.perturbations.split(",") if k.strip()]
  unknown = [k for k in kinds if k not in PERTURBATIONS]
  if unknown:
    parser.error(f"unknown perturbation(s) {unknown}; choose from {sorted(PERTURBATIONS)}")
  rates = sorted({float(r) for r in args.rates.split(",")} | {0.0})

  from hat.data.pipeline import validation_documents
  from hat.data.sources import parse_eval_sets
  from hat.eval.loglik import Scorer
  from hat.eval.robustness import evaluate_robustness, make_examples, write_report
  from hat.rundir import load_for_inference

  scorers, first_cfg = {}, None
  for item in args.run:
    name, sep, workdir = item.partition("=")
    if not sep:
      parser.error(f"--run {item!r} is not name=workdir")
    model, cfg, tok = load_for_inference(workdir)
    first_cfg = first_cfg or cfg
    scorers[name] = Scorer(model, cfg, tok)
  spec = args.eval or next(iter(parse_eval_sets(first_cfg.data.eval, first_cfg.data.train)))
  docs = validation_documents(first_cfg, spec)
  examples = make_examples([docs[i] for i in range(len(docs))], args.examples,
                           context_bytes=args.context_bytes,
                           continuation_bytes=args.continuation_bytes, seed=args.seed)
  results = evaluate_robustness(scorers, examples, kinds, rates, seed=args.seed)
  md = write_report(results, args.out, {"runs": ", ".join(args.run), "eval": spec,
                                        "examples": len(examples), "seed": args.seed})
  print(md.read_text())
  return 0


if __name__ == "__main__":
  sys.exit(main())
