"""Data pipeline benchmark: throughput per CPU core, bytes/word, bytes/token, slot use.

  python tools/bench_data.py ../shared/data/corpus/en ../shared/data/corpus/de \\
      --bpe bpe32k_en.model --config configs/tiny_hat.py --out bench_data.json

For every corpus: bytes/word of both splitting rules and bytes/token of the BPE model on
a sample of training documents, then the full training pipeline (single process, no
workers) for the HAT layout and, with `--bpe`, the BPE layout: `--batches` batches are
timed after `--warmup`. Throughput counts real text bytes; "per core" divides by the
process's CPU time (all threads), so it does not depend on how many cores are idle.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from hat import config as config_lib  # noqa: E402
from hat.cli import entry_point  # noqa: E402
from hat.data import pipeline, sources  # noqa: E402
from hat.text.splitter import Splitter  # noqa: E402


def machine() -> dict:
  """Platform facts that throughput depends on."""
  return {"platform": platform.platform(), "processor": platform.processor() or
          platform.machine(), "python": platform.python_version(),
          "cpu_count": os.cpu_count(),
          "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
          else os.cpu_count()}


def sample_documents(cfg, spec: str, max_bytes: int) -> list[bytes]:
  """The first training documents (stored order) up to `max_bytes` bytes."""
  src = sources.open_from_config(cfg.data, spec, "train")
  docs, total = [], 0
  for i in range(len(src)):
    docs.append(src[i])
    total += len(docs[-1])
    if total >= max_bytes:
      break
  return docs


def text_ratios(docs: list[bytes], max_word_bytes: int, tokenizer) -> dict:
  """Bytes per word for both rules and bytes per BPE token on `docs`."""
  total = sum(map(len, docs))
  out = {"sample_bytes": total}
  for rule in ("whitespace", "unicode"):
    sp = Splitter(rule, max_word_bytes)
    out[f"bytes_per_word_{rule}"] = total / sum(len(sp.word_lengths(d)) for d in docs)
  if tokenizer is not None:
    out["bytes_per_token_bpe"] = total / sum(len(tokenizer.encode(d)) for d in docs)
  return out


def time_pipeline(cfg, tokenizer, warmup: int, batches: int) -> dict:
  """Throughput and layout statistics of the training pipeline."""
  it = pipeline.make_train_iterator(cfg, tokenizer, process_index=0, process_count=1)
  for _ in range(warmup):
    next(it)
  stats = []
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(batches):
    stats.append(pipeline.batch_stats(next(it)))
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  summary = pipeline.summarize_stats(stats)
  mb = summary["bytes"] / 1e6
  return {"mb_per_s": mb / wall, "mb_per_cpu_s": mb / cpu, "wall_s": wall, "cpu_s": cpu,
          **summary}


def with_data(cfg, kind: str, **data) -> config_lib.TrainConfig:
  """A copy of cfg with another model kind and data fields."""
  return config_lib.validate(dataclasses.replace(
      cfg, model=dataclasses.replace(cfg.model, kind=kind),
      data=dataclasses.replace(cfg.data, **data)))


def markdown(results: list[dict]) -> str:
  """The results as a markdown table, one row per corpus and layout."""
  head = ("| corpus | layout | MB/s | MB/s per core | bytes/word ws | bytes/word uni | "
          "bytes/token | slot util | byte-slot util | unit/token util | overflow |")
  lines = [head, "|" + "---|" * 11]
  for r in results:
    t = r["text"]
    for layout in ("hat", "bpe"):
      p = r.get(layout)
      if not p:
        continue
      util = p.get("unit_util", p.get("token_util", 0.0))
      lines.append(
          f"| {r['corpus']} | {layout} | {p['mb_per_s']:.2f} | {p['mb_per_cpu_s']:.2f} | "
          f"{t['bytes_per_word_whitespace']:.2f} | {t['bytes_per_word_unicode']:.2f} | "
          f"{t.get('bytes_per_token_bpe', float('nan')):.2f} | "
          f"{p.get('slot_util', float('nan')):.3f} | "
          f"{p.get('byte_slot_util', float('nan')):.3f} | {util:.3f} | "
          f"{p['overflow_sequences']}/{p['sequences']} |")
  return "\n".join(lines)


@entry_point
def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("paths", nargs="*",
                 default=["../shared/data/corpus/en", "../shared/data/corpus/de"])
  p.add_argument("--bpe", default="", help="SentencePiece model for the BPE layout")
  p.add_argument("--config", default="configs/tiny_hat.py")
  p.add_argument("--batches", type=int, default=50)
  p.add_argument("--warmup", type=int, default=5)
  p.add_argument("--sample_mb", type=float, default=2.0)
  p.add_argument("--out", default="bench_data.json")
  args, overrides = p.parse_known_args(argv)
  if any(not o.startswith("--config.") for o in overrides):
    p.error(f"unrecognized arguments: {overrides}")
  cfg = config_lib.resolve(args.config if pathlib.Path(args.config).exists() else None,
                           overrides)
  tokenizer = None
  if args.bpe:
    from hat.text.tokenizers import load_tokenizer  # pylint: disable=g-import-not-at-top

    tokenizer = load_tokenizer("bpe", args.bpe)
  info = machine()
  print(f"machine: {info}")
  results = []
  for path in args.paths:
    spec = f"text:{path}"
    cfg_hat = with_data(cfg, "hat", train=spec)
    docs = sample_documents(cfg_hat, spec, int(args.sample_mb * 1e6))
    r = {"corpus": pathlib.Path(path).name, "path": path,
         "text": text_ratios(docs, cfg.data.max_word_bytes, tokenizer)}
    r["hat"] = time_pipeline(cfg_hat, None, args.warmup, args.batches)
    if tokenizer is not None:
      cfg_bpe = with_data(cfg, "bpe", train=spec, tokenizer=args.bpe)
      r["bpe"] = time_pipeline(cfg_bpe, tokenizer, args.warmup, args.batches)
    results.append(r)
    print(json.dumps(r, indent=1))
  out = {"machine": info, "config": config_lib.to_dict(cfg), "batches": args.batches,
         "results": results}
  pathlib.Path(args.out).write_text(json.dumps(out, indent=1))
  print(f"\n{markdown(results)}\n\nwritten: {args.out}")


if __name__ == "__main__":
  sys.exit(main())
