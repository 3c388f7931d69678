"""Trains the SentencePiece BPE baseline tokenizer (see hat/text/bpe.py).

  python tools/train_tokenizer.py data/en --vocab-size 32000 --out /tmp/bpe32k.model
  python tools/train_tokenizer.py --tfds lm1b:train --data-dir ~/tensorflow_datasets \\
      --vocab-size 64000 --out bpe64k.model --max-bytes 2e9

Inputs are text files, directories (every *.txt below them, one document per file) or a
prepared TFDS dataset. A held-out slice (`--heldout-bytes`, taken from the first
documents in shuffled order) is left out of training and used to report bytes/token;
`--eval` adds more files or directories to report on (e.g. another language).
"""

from __future__ import annotations

import argparse
import pathlib
import random
import sys
import time
from typing import Iterator

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from hat.cli import UserError, entry_point  # noqa: E402
from hat.text import bpe  # noqa: E402

_TEXT_FEATURES = ("text", "content", "document", "article", "sentence", "body")


def _fail(msg: str) -> None:
  raise UserError(msg)


def text_files(paths: list[str]) -> list[pathlib.Path]:
  """Expands files and directories (recursively, *.txt) into a sorted file list."""
  files = []
  for p in map(pathlib.Path, paths):
    if p.is_dir():
      found = sorted(f for f in p.rglob("*.txt") if f.is_file())
      if not found:
        _fail(f"no *.txt files under {p}")
      files.extend(found)
    elif p.is_file():
      files.append(p)
    else:
      _fail(f"input not found: {p}")
  return files


def tfds_documents(spec: str, data_dir: str | None, text_key: str | None) -> Iterator[bytes]:
  """Documents of a prepared TFDS dataset `name[:split]` (default split: train)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  name, _, split = spec.partition(":")
  try:
    ds = tfds.data_source(name, split=split or "train", data_dir=data_dir)
  except Exception as e:  # TFDS raises several types for missing datasets
    _fail(f"--tfds {spec}: cannot open (data_dir={data_dir}): {e}")
  if text_key is None:
    keys = list(ds.dataset_info.features.keys())
    text_key = next((k for k in _TEXT_FEATURES if k in keys), None)
    if text_key is None:
      _fail(f"--tfds {spec}: no text feature among {keys}; pass --text-key")
  for i in range(len(ds)):
    value = ds[i][text_key]
    yield value.encode("utf-8") if isinstance(value, str) else bytes(value)


def split_corpus(docs, max_bytes: int, heldout_bytes: int, seed: int):
  """(train docs, held-out docs): held-out from the first docs, training capped."""
  docs = list(docs)
  random.Random(seed).shuffle(docs)
  train, heldout, n_train = [], [], 0
  for doc in docs:
    if heldout_bytes > 0:
      heldout.append(doc[:heldout_bytes])
      doc = doc[heldout_bytes:]
      heldout_bytes -= len(heldout[-1])
    if doc and n_train < max_bytes:
      doc = doc[: max_bytes - n_train]
      train.append(doc)
      n_train += len(doc)
  return train, heldout


def bytes_per_token(tok, docs) -> tuple[float, int]:
  """(bytes per token, total bytes) of `docs` under `tok`."""
  n_bytes = sum(len(d) for d in docs)
  n_tokens = sum(len(tok.encode(d)) for d in docs)
  return n_bytes / max(n_tokens, 1), n_bytes


def build_parser() -> argparse.ArgumentParser:
  """The command-line interface."""
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("inputs", nargs="*", help="text files or directories (*.txt)")
  parser.add_argument("--tfds", metavar="NAME[:SPLIT]",
                      help="read documents from a prepared TFDS dataset instead")
  parser.add_argument("--data-dir", help="TFDS data_dir for --tfds")
  parser.add_argument("--text-key", help="TFDS text feature (default: guessed)")
  parser.add_argument("--vocab-size", type=int, required=True, help="e.g. 32000")
  parser.add_argument("--out", required=True, help="path of the .model file to write")
  parser.add_argument("--max-bytes", type=float, default=100e6,
                      help="cap on training text in bytes (default 1e8)")
  parser.add_argument("--heldout-bytes", type=float, default=1e6,
                      help="bytes left out of training to report bytes/token (default 1e6)")
  parser.add_argument("--max-sentences", type=int, default=2_000_000,
                      help="SentencePiece input_sentence_size (sampled if more)")
  parser.add_argument("--eval", nargs="*", default=[], metavar="PATH",
                      help="more files or directories to report bytes/token on")
  parser.add_argument("--seed", type=int, default=0, help="held-out selection seed")
  return parser


@entry_point
def main(argv: list[str] | None = None) -> int:
  """Trains, writes the model and prints vocab size, bytes/token and time."""
  args = build_parser().parse_args(argv)
  if bool(args.inputs) == bool(args.tfds):
    _fail("give either input paths or --tfds, not both or neither")
  if args.tfds:
    docs = list(tfds_documents(args.tfds, args.data_dir, args.text_key))
    label = f"--tfds {args.tfds}"
  else:
    files = text_files(args.inputs)
    docs = [f.read_bytes() for f in files]
    for f, d in zip(files, docs):
      if not d:
        print(f"warning: empty input file {f}", file=sys.stderr)
    label = ", ".join(args.inputs)
  docs = [d for d in docs if d]
  if not docs:
    _fail(f"no text in {label}")
  train, heldout = split_corpus(docs, int(args.max_bytes), int(args.heldout_bytes), args.seed)
  if not train:
    _fail(f"no training text left in {label} after --heldout-bytes {int(args.heldout_bytes)}")
  start = time.perf_counter()
  tok = bpe.train_bpe(train, args.vocab_size, args.out, max_sentences=args.max_sentences)
  elapsed = time.perf_counter() - start
  print(f"wrote {args.out}: vocab_size={tok.vocab_size}, trained on "
        f"{sum(map(len, train)) / 1e6:.1f} MB in {elapsed:.1f} s")
  if heldout:
    bpt, n = bytes_per_token(tok, heldout)
    print(f"held-out ({n / 1e6:.2f} MB): {bpt:.3f} bytes/token")
  for path in args.eval:
    eval_docs = [f.read_bytes() for f in text_files([path])]
    bpt, n = bytes_per_token(tok, eval_docs)
    print(f"{path} ({n / 1e6:.2f} MB): {bpt:.3f} bytes/token")
  return 0


if __name__ == "__main__":
  sys.exit(main())
