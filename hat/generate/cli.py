"""CLI: continue prompts with a trained run of any family.

    python -m hat.generate --workdir runs/demo --prompt "The quick bro" --max-new-bytes 200

    python -m hat.generate --workdir runs/demo --prompt-file prompts.txt --batch-size 32

Prompts are taken as bytes (arguments that are not valid UTF-8 keep their bytes; a
prompt file holds one prompt per line), output is printed with invalid UTF-8 replaced.
`--max-new-bytes 0` prints the prompts only.
"""

from __future__ import annotations

import argparse
import os
import sys

from hat.cli import entry_point
from hat.generate import SampleOptions, make_sampler


@entry_point
def main(argv: list[str]) -> int:
  """Loads the latest checkpoint of a run and prints continuations of the prompts."""
  parser = argparse.ArgumentParser(prog="python -m hat.generate", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="run directory written by hat.train")
  parser.add_argument("--prompt", action="append", default=None,
                      help="prompt text; repeat for several, sampled as one batch unless "
                      "--batch-size (default: the config's)")
  parser.add_argument("--prompt-file", default=None,
                      help="file of prompts, one per line (after any --prompt)")
  parser.add_argument("--batch-size", type=int, default=0,
                      help="rows decoded at a time, with a progress bar "
                      "(default: every prompt in one batch)")
  parser.add_argument("--max-new-bytes", type=int, default=200)
  parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
  parser.add_argument("--top-k", type=int, default=0)
  parser.add_argument("--top-p", type=float, default=1.0)
  parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no-cache", action="store_true",
                      help="uncached reference sampler (full recompute per symbol)")
  args = parser.parse_args(argv)
  if args.max_new_bytes < 0:
    parser.error(f"--max-new-bytes must be >= 0, got {args.max_new_bytes}")
  if args.batch_size < 0:
    parser.error(f"--batch-size must be >= 1 (0 = one batch), got {args.batch_size}")
  prompts = [os.fsencode(p) for p in args.prompt or []]  # keeps non-UTF-8 arguments' bytes
  if args.prompt_file:
    try:
      with open(args.prompt_file, "rb") as f:
        prompts += f.read().splitlines()
    except OSError as e:
      parser.error(f"--prompt-file: cannot read {args.prompt_file}: {e.strerror}")
    if not prompts:
      parser.error(f"--prompt-file: {args.prompt_file} holds no prompts")
  # Checked before the checkpoint loads: a bad option fails in one line, at once.
  opts = SampleOptions(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       max_new_bytes=args.max_new_bytes, stop=tuple(args.stop),
                       seed=args.seed)

  from hat.rundir import load_for_inference  # pylint: disable=g-import-not-at-top
  model, cfg, tokenizer = load_for_inference(args.workdir)
  sampler = make_sampler(model, cfg, tokenizer, cached=not args.no_cache)
  if not args.prompt and not args.prompt_file:
    prompts = [cfg.sample_prompt.encode()]
  if args.batch_size:
    news = sampler.generate_many(prompts, opts, batch_size=args.batch_size,
                                 progress=len(prompts) > args.batch_size)
  else:
    news = sampler.generate_batch(prompts, opts)
  for prompt, new in zip(prompts, news):
    text = (prompt + new).decode("utf-8", "replace")
    sys.stdout.write(f"--- prompt: {prompt.decode('utf-8', 'replace')!r}\n{text}\n")
  return 0

