"""Shows what the model will see: a few batches decoded back to text, plus statistics.

  python tools/inspect_data.py --config configs/tiny_hat.py --batches 2
  python tools/inspect_data.py --source text:../shared/data/corpus/de --config.data.window_bytes=256
  python tools/inspect_data.py --config configs/tiny_bpe.py --eval valid

HAT units are printed as `[S]` (START/END) and `[W]word` (marker + bytes), separated by
`|`; rows of the packed layout are not shown. Token batches are printed as their pieces.
Statistics cover `--stat_batches` batches: bytes/word, words/window, byte-slot and unit
utilisation, overflow counts.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from hat import config as config_lib  # noqa: E402
from hat.cli import entry_point  # noqa: E402
from hat.data import pipeline  # noqa: E402
from hat.family import family_of  # noqa: E402
from hat.text import codec  # noqa: E402


def hat_units(batch, b: int) -> list[list[int]]:
  """Symbols of each unit of sequence b ([marker, bytes...]), in unit order."""
  ids, unit, pos = batch["slot_ids_BxS"][b], batch["slot_unit_BxS"][b], batch["slot_pos_BxS"][b]
  units: dict[int, list[tuple[int, int]]] = {}
  for i, u, p in zip(ids.tolist(), unit.tolist(), pos.tolist()):
    if u >= 0:
      units.setdefault(u, []).append((p, i))
  return [[i for _, i in sorted(units[u])] for u in sorted(units)]


def render_hat(batch, b: int) -> str:
  """One HAT sequence as `|`-separated units; a new line where a segment starts."""
  seg = batch["unit_segment_BxW"][b]
  out, prev = [], None
  for u, syms in enumerate(hat_units(batch, b)):
    if prev is not None and seg[u] != prev:
      out.append("\n    ")
    prev = seg[u]
    out.append(codec.render(syms) + "|")
  return "".join(out)


def render_tokens(batch, b: int, tokenizer) -> str:
  """One token sequence as `|`-separated pieces; a new line where a segment starts."""
  toks, seg = batch["tokens_BxT"][b], batch["segment_BxT"][b]
  out, prev = [], None
  for t, s in zip(toks.tolist(), seg.tolist()):
    if s == 0:
      continue
    if prev is not None and s != prev:
      out.append("\n    ")
    prev = s
    if t in (tokenizer.bos_id, tokenizer.eos_id):
      out.append("<s>|")
    else:
      out.append(codec.render(list(tokenizer.decode([t]))) + "|")
  return "".join(out)


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default=None, help="config file (default: built-in defaults)")
  p.add_argument("--source", default=None, help="overrides data.train, e.g. text:<path>")
  p.add_argument("--eval", default=None, help="show an eval set (name or spec) instead")
  p.add_argument("--batches", type=int, default=1, help="batches to print")
  p.add_argument("--sequences", type=int, default=2, help="sequences per batch to print")
  p.add_argument("--stat_batches", type=int, default=20)
  args, rest = p.parse_known_args(argv)
  bad = [r for r in rest if not r.startswith("--config.")]
  if bad:
    p.error(f"unrecognized arguments: {bad} (overrides look like --config.data.seed=1)")
  return args, rest


@entry_point
def main(argv=None) -> None:
  args, overrides = parse_args(argv)
  if args.source:
    overrides.append(f"data.train={args.source}")
  cfg = config_lib.resolve(args.config, overrides)
  tokenizer = pipeline.default_tokenizer(cfg)
  if args.eval:
    it = pipeline.make_eval_iterator(cfg, args.eval, tokenizer, process_index=0,
                                     process_count=1)
  else:
    it = pipeline.make_train_iterator(cfg, tokenizer, process_index=0, process_count=1)
  family = family_of(cfg)
  print(f"family={family.name} source={args.eval or cfg.data.train} "
        f"window_bytes={cfg.data.window_bytes} splitter={cfg.data.splitter}")
  stats = []
  for n, batch in enumerate(it):
    if n >= max(args.batches, args.stat_batches):
      break
    stats.append(pipeline.batch_stats(batch))
    if n < args.batches:
      print(f"\n=== batch {n}: {stats[-1]}")
      for b in range(min(args.sequences, len(batch["num_bytes_B"]))):
        text = render_hat(batch, b) if family.words else render_tokens(batch, b, tokenizer)
        print(f"--- sequence {b} ({int(batch['num_bytes_B'][b])} bytes)\n    {text}")
  if stats:
    print("\n=== statistics")
    for k, v in pipeline.summarize_stats(stats).items():
      print(f"{k:>22}: {v:.4g}" if isinstance(v, float) else f"{k:>22}: {v}")


if __name__ == "__main__":
  sys.exit(main())
