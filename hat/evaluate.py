"""Evaluate a trained run on text sets: bits per byte, loss and (HAT) word accuracy.

    python -m hat.evaluate --workdir runs/hat_en --eval en_val --eval de=text:../shared/data/corpus/de

`--eval` takes a set name from the run's `data.eval`, or `name=spec` with any source spec
of the data layer (`text:<path>`, `tfds:<name>[:<split>]`, `builtin`); the validation
split of that source is used. Results are printed as a table and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

from hat import storage
from hat.cli import entry_point
from hat.eval.evaluate import evaluate_sets
from hat.family import family_of


@entry_point
def main(argv: list[str]) -> int:
  """CLI entry point."""
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="run directory written by hat.train")
  parser.add_argument("--eval", action="append", default=[],
                      help="eval set name or name=spec (repeatable; default: the run's sets)")
  parser.add_argument("--max-batches", type=int, default=None,
                      help="cap batches per set (default: the whole validation split)")
  parser.add_argument("--out", default=None, help="JSON output (default: <workdir>/eval.json)")
  args = parser.parse_args(argv)

  from hat.data.sources import parse_eval_sets
  from hat.rundir import load_for_inference
  model, cfg, tokenizer = load_for_inference(args.workdir)
  names = {}
  for item in args.eval or list(parse_eval_sets(cfg.data.eval, cfg.data.train)):
    name, sep, spec = item.partition("=")
    names[name] = spec if sep else name
  # Specs given on the command line become extra named sets of this config.
  extra = ",".join(f"{n}={s}" for n, s in names.items() if s != n)
  if extra:
    import dataclasses
    sets = ",".join(filter(None, [cfg.data.eval or f"valid={cfg.data.train}", extra]))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval=sets))
  results = evaluate_sets(model, cfg, tokenizer, list(names), max_batches=args.max_batches)
  print(f"{'set':<16} {'bpb':>8} {'nll':>8} {'word_acc':>9} {'bytes':>12}")
  for name, r in results.items():
    wa = f"{r['word_acc']:.4f}" if "word_acc" in r else "-"
    print(f"{name:<16} {r['bpb']:>8.4f} {r['nll']:>8.4f} {wa:>9} {int(r['bytes']):>12}")
  out = storage.path(args.out) if args.out else storage.path(args.workdir) / "eval.json"
  out.write_text(json.dumps({"workdir": args.workdir, "family": family_of(cfg).name,
                             "results": results}, indent=2))
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
