"""Generation speed: HAT vs the BPE baseline (and the flat byte LM) on the same backbone.

    python tools/bench_generate.py --out bench_generate.json
    python tools/bench_generate.py --hat configs/tiny_hat.py --batches 1,32 --new-bytes 256

Models come from the tiny configs with random weights (speed does not depend on training),
except that HAT's `[W]` logit is scaled so that words end after a few bytes, as in a trained
model; the measured bytes per word / per token are reported next to the speeds. The BPE
tokenizer is trained in a temporary directory on `../shared/data/corpus/en` when present,
else on the built-in corpus. Each (model, batch) pair is compiled by a warm-up call first;
the timed call samples `--new-bytes` bytes per row with the cached samplers.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402  pylint: disable=wrong-import-position
from flax import nnx  # noqa: E402

from hat import config as C  # noqa: E402
from hat.cli import entry_point  # noqa: E402
from hat.generate import SampleOptions, make_sampler  # noqa: E402
from hat.models import build_model  # noqa: E402
from hat.text.codec import W_ID  # noqa: E402
from hat.text.tokenizers import ByteTokenizer  # noqa: E402

PROMPT = b"The history of the city begins with a small settlement on the river, where"


def _corpus_texts(max_bytes: int) -> list[bytes]:
  """Training text for the BPE tokenizer: the shared English corpus, else built-in docs."""
  root = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "corpus" / "en"
  files = sorted(root.glob("*")) if root.is_dir() else []
  if not files:
    from hat.data.builtin import builtin_corpus_dir
    cache = os.environ.get("HAT_CACHE", str(pathlib.Path.home() / ".cache" / "hat"))
    files = sorted(builtin_corpus_dir(cache).glob("*"))
  texts, total = [], 0
  for f in files:
    if f.is_file() and total < max_bytes:
      data = f.read_bytes()[:max_bytes - total]
      texts.append(data)
      total += len(data)
  return texts


def _build(config_path: str, tokenizer=None, w_scale: float = 0.0):
  cfg = C.resolve(config_path, [])
  vocab = tokenizer.vocab_size if tokenizer is not None else 259
  model = build_model(cfg, vocab_size=vocab, rngs=nnx.Rngs(0))
  if w_scale:
    model.head[...] = model.head[...].at[:, W_ID].multiply(w_scale)
  return make_sampler(model, cfg, tokenizer), cfg


def _time(sampler, batch: int, new_bytes: int, opts: SampleOptions) -> dict:
  prompts = [PROMPT[: len(PROMPT) - (i % 7)] for i in range(batch)]
  sampler.generate_batch(prompts, opts)  # compiles every step function
  calls = {"steps": 0, "words": 0}
  word_fn = getattr(sampler, "word_fn", None)

  def counted(params, st, commit_B):
    calls["steps"] += 1
    calls["words"] += int(commit_B.sum())
    return word_fn(params, st, commit_B)

  if word_fn is not None:
    sampler.word_fn = counted
  start = time.perf_counter()
  outs = sampler.generate_batch(prompts, opts)
  wall = time.perf_counter() - start
  if word_fn is not None:
    sampler.word_fn = word_fn
  total = sum(map(len, outs))
  longest = max(map(len, outs))
  return {"batch": batch, "bytes": total, "seconds": wall, "bytes_per_s": total / wall,
          "ms_per_byte_per_row": 1e3 * wall / max(longest, 1),
          "backbone_steps": calls["steps"] if word_fn is not None else None,
          "words": calls["words"] if word_fn is not None else None}


@entry_point
def main(argv=None) -> int:
  """Runs the benchmark and prints a markdown table; writes JSON with --out."""
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--hat", default="configs/tiny_hat.py")
  ap.add_argument("--bpe", default="configs/tiny_bpe.py")
  ap.add_argument("--byte", default="configs/tiny_byte.py", help="empty to skip")
  ap.add_argument("--bpe-vocab", type=int, default=2048)
  ap.add_argument("--bpe-train-bytes", type=int, default=2_000_000)
  ap.add_argument("--batches", default="1,32")
  ap.add_argument("--new-bytes", type=int, default=192)
  ap.add_argument("--w-scale", type=float, default=10.0,
                  help="HAT [W] logit scale for random weights (words of a few bytes)")
  ap.add_argument("--out", default="", help="JSON results file")
  args = ap.parse_args(argv)

  from hat.text.bpe import train_bpe
  with tempfile.TemporaryDirectory() as tmp:
    tok = train_bpe(_corpus_texts(args.bpe_train_bytes), args.bpe_vocab,
                    pathlib.Path(tmp) / "bpe.model")
  models = {"hat": _build(args.hat, w_scale=args.w_scale),
            "bpe": _build(args.bpe, tokenizer=tok)}
  if args.byte:
    models["byte"] = _build(args.byte, tokenizer=ByteTokenizer())
  opts = SampleOptions(temperature=1.0, top_k=50, max_new_bytes=args.new_bytes, seed=0)
  dev = jax.devices()[0]
  machine = {"platform": dev.platform, "device_kind": dev.device_kind,
             "num_devices": jax.device_count(), "host": platform.platform(),
             "cpu_count": os.cpu_count(), "jax": jax.__version__}
  print(f"machine: {machine}", flush=True)
  rows = []
  for batch in [int(b) for b in args.batches.split(",")]:
    for name, (sampler, cfg) in models.items():
      r = {"model": name, "config": getattr(args, name), **_time(sampler, batch,
                                                                 args.new_bytes, opts)}
      bb = cfg.model.backbone
      r["backbone"] = f"{bb.num_layers}x{bb.d_model}"
      if r["words"]:
        r["bytes_per_word"] = r["bytes"] / r["words"]
      rows.append(r)
      print(json.dumps(r), flush=True)
  print(f"\n{machine['platform']} ({machine['device_kind']}), new bytes per row "
        f"{args.new_bytes}\n")
  print("| model | backbone | batch | bytes | s | bytes/s | ms/byte (per row) | bytes/word |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    bpw = f"{r['bytes_per_word']:.1f}" if "bytes_per_word" in r else "-"
    print(f"| {r['model']} | {r['backbone']} | {r['batch']} | {r['bytes']} | "
          f"{r['seconds']:.2f} | {r['bytes_per_s']:.0f} | {r['ms_per_byte_per_row']:.2f} | "
          f"{bpw} |")
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps({"machine": machine, "results": rows},
                                                 indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
