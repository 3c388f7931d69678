"""Where does one run lose bits against another? Per-word loss decomposition.

    python tools/decompose.py --run HAT=runs/hat_en --run BPE=runs/bpe_en --eval en_val \\
        --train-text ../shared/data/corpus/en --out runs/decompose

Both runs score the same held-out text exactly as `python -m hat.evaluate` does (the
validation split of an eval set of the runs, by default the first run's first one; or
`--text FILE`), and each predicted symbol's NLL is attributed to a whitespace word (a run
of non-whitespace plus the whitespace after it). A token spanning two words is split over
them in proportion to its bytes in each; HAT's [W]/[S] and a token model's EOS belong to
the word they end. So the word NLLs add up to each run's total and its bpb.

Words are bucketed by training-set frequency (rank of the stripped word in the train
split of `--train-text`, default the first run's data.train: top 1k, 1k-10k, rare,
unseen), length in bytes, capitalisation, digits and attached punctuation. For each
bucket: bpb of both runs, their ratio, and the bucket's share of the bytes and of the gap
(first run's bits - second run's bits). Also where in a word each run pays (first byte or
token, later ones, word and document ends) and the word types that add most to the gap.

Writes <out>/decompose.json, decompose.md and decompose.png (local or gs://).
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from hat.cli import UserError, entry_point  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
  """The command line, checked."""
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--run", action="append", required=True, metavar="NAME=WORKDIR",
                 help="a trained run (workdir or checkpoint folder); give exactly two: "
                 "the gap is the first one's bits minus the second one's")
  text = p.add_mutually_exclusive_group()
  text.add_argument("--eval", default=None, metavar="SET",
                    help="eval set name of the runs' data.eval (e.g. en_val) or a source "
                    "spec (text:PATH, tfds:NAME); its validation split is scored, as by "
                    "`hat.evaluate --eval SET` (default: the first run's first eval set)")
  text.add_argument("--text", default=None, metavar="FILE",
                    help="score this text file instead, cut into documents by --doc-mode")
  p.add_argument("--doc-mode", default="blank_line", choices=("blank_line", "line", "file"),
                 help="how --text is cut into documents (default: blank_line)")
  p.add_argument("--max-bytes", type=int, default=None, metavar="N",
                 help="score only the first documents, up to N bytes (default: all)")
  p.add_argument("--train-text", default=None, metavar="SPEC_OR_PATH",
                 help="text whose train split gives word frequencies: a source spec or a "
                 "file/folder read as text:PATH (default: the first run's data.train)")
  p.add_argument("--train-max-bytes", type=int, default=100_000_000, metavar="N",
                 help="stop counting training words after about N bytes (default: 1e8)")
  p.add_argument("--batch-size", type=int, default=None, metavar="B",
                 help="sequences per forward pass (default: each run's data.batch_size)")
  p.add_argument("--out", required=True, help="output folder (local or gs://)")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  args = p.parse_args(argv)
  runs = {}
  for item in args.run:
    name, sep, workdir = item.partition("=")
    if not sep or not name or not workdir:
      p.error(f"--run {item!r} is not NAME=WORKDIR")
    if name in runs:
      p.error(f"--run name {name!r} is given twice")
    runs[name] = workdir
  if len(runs) != 2:
    p.error(f"give exactly two --run NAME=WORKDIR, got {len(runs)}")
  for flag in ("max_bytes", "train_max_bytes", "batch_size"):
    value = getattr(args, flag)
    if value is not None and value <= 0:
      p.error(f"--{flag.replace('_', '-')} must be positive, got {value}")
  args.runs = runs
  return args


@entry_point
def main(argv: list[str]) -> int:
  """CLI entry point."""
  args = parse_args(argv)

  from hat.data.sources import parse_eval_sets
  from hat.eval import decompose as dec
  from hat.eval.decompose_report import write_report
  from hat.eval.word_buckets import FrequencyRanks, count_words
  from hat.family import family_of
  from hat.rundir import load_for_inference

  loaded = {name: load_for_inference(workdir) for name, workdir in args.runs.items()}
  first_cfg = next(iter(loaded.values()))[1]
  if args.text:
    docs = dec.file_documents(args.text, args.doc_mode, args.max_bytes)
    text_label = f"{args.text} (doc_mode={args.doc_mode})"
  else:
    spec = args.eval or next(iter(parse_eval_sets(first_cfg.data.eval, first_cfg.data.train)))
    per_run = {name: dec.eval_documents(cfg, spec, args.max_bytes)
               for name, (_, cfg, _) in loaded.items()}
    digests = {name: hashlib.sha256(b"\0".join(d)).hexdigest()[:12]
               for name, d in per_run.items()}
    if len(set(digests.values())) > 1:
      raise UserError(f"eval set {spec!r} is not the same text for the runs ({digests}); "
                      "check their data.eval, data.doc_mode and data.validation_fraction, "
                      "or give --eval text:PATH / --text FILE")
    docs = next(iter(per_run.values()))
    text_label = f"validation split of {spec}"
  if args.max_bytes:
    text_label += f", first {args.max_bytes:,} bytes"
  words = dec.text_words(docs)

  train_spec = args.train_text or first_cfg.data.train
  print(f"counting training words of {train_spec} (up to {args.train_max_bytes:,} bytes)",
        flush=True)
  counts, train_bytes = count_words(dec.training_documents(first_cfg, train_spec),
                                    args.train_max_bytes)
  atts = {name: dec.attribute_run(model, cfg, tok, docs, words, batch_size=args.batch_size,
                                  progress=not args.no_progress, desc=name)
          for name, (model, cfg, tok) in loaded.items()}
  result = dec.decompose(atts, words, FrequencyRanks(counts))
  meta = {"text": text_label,
          "workdirs": dict(args.runs),
          "families": {n: family_of(cfg).name for n, (_, cfg, _) in loaded.items()},
          "train_text": f"train split of {train_spec}",
          "train_bytes": train_bytes, "train_word_types": len(counts)}
  md = write_report(result, args.out, meta)
  print(md.read_text())
  print(f"wrote {md.parent}/decompose.{{json,md,png}}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
