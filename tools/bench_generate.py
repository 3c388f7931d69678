"""Generation speed of every model family with the cached, device-resident samplers.

    python tools/bench_generate.py --out bench_generate.json            # random weights
    python tools/bench_generate.py --run hat=runs/hat --run bpe=runs/bpe --batches 1,32,128
    python tools/bench_generate.py --config hat=configs/hat_1b.py \
        --config bpe=configs/bpe_1b.py --batches 1,32,256          # 1B widths (accelerator)

Random-weight mode (no --run) builds the five tiny configs (HAT, delete-gated HAT, merge
HAT, BPE, byte LM; same backbone) with random weights; HAT's `[W]` logit is scaled so
that words end after a few bytes, and the BPE tokenizer is trained in a temporary
directory on `../shared/data/corpus/en` when present, else on the built-in corpus.
`--config NAME=path` builds other configs (e.g. the 1B widths) with random weights; the
family comes from the config, and a BPE head wider than the tokenizer (the 1B config's
65,536 rows) keeps its width but never samples ids the tokenizer lacks. With
`--run NAME=workdir` the trained runs are loaded instead, so speed is measured on real
word lengths and real `[W]` / gate decisions.

`--prompts N` times calls that continue N prompts, `batch` rows at a time
(`generate_many`, what lm-eval's `generate_until` runs): batch 1 is one prompt after
another. `--prompt-bytes LO:HI` draws prompts of LO..HI bytes from the corpus (seeded,
the same for every model) instead of one short sentence.

Each (model, batch) pair is compiled by a warm-up call, then timed over at least
`--repeats` calls of `--new-bytes` bytes per row and at least `--min-seconds` of them
(a batch-1 call takes milliseconds: a few of them are noise on a shared machine). Call i
samples with seed i, the same seeds for every model: the speed of one call depends on
the word (token) lengths it happened to draw. The models' calls are taken in turn, one
each, so a change in the machine's load falls on every model alike. The median is
reported, in wall-clock bytes/s and in bytes per CPU second of this process, and as
milliseconds per decoded byte of a row (wall time / the longest row, summed over the
batches of a `--prompts` call). Rows also give bytes per generated word (token, chunk;
over all timed calls, or one batch with `--prompts`) and the backbone KV cache held per
word.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from hat import config as C  # noqa: E402
from hat.cli import entry_point  # noqa: E402
from hat.family import family_of  # noqa: E402
from hat.generate import SampleOptions, make_sampler  # noqa: E402
from hat.generate.device import CHUNK_STEPS  # noqa: E402
from hat.text.codec import W_ID  # noqa: E402
from hat.text.tokenizers import ByteTokenizer  # noqa: E402

PROMPT = b"The history of the city begins with a small settlement on the river, where"
CONFIGS = {"hat": "configs/tiny_hat.py", "hat_delete": "configs/tiny_hat_delete.py",
           "hat_merge": "configs/tiny_hat_merge.py", "bpe": "configs/tiny_bpe.py",
           "byte": "configs/tiny_byte.py"}


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


def make_prompts(num: int, lengths: tuple[int, int] | None = None) -> list[bytes]:
  """`num` prompts: PROMPT cut by 0-6 bytes, or with `lengths` (lo, hi) slices of the
  corpus of lo..hi bytes at seeded random offsets (the same for every model and run)."""
  if lengths is None:
    return [PROMPT[: len(PROMPT) - (i % 7)] for i in range(num)]
  text = b"".join(_corpus_texts(4_000_000))
  lo, hi = lengths
  if len(text) < hi:
    raise SystemExit(f"error: --prompt-bytes {lo}:{hi} is longer than the corpus "
                     f"({len(text)} bytes)")
  rng = np.random.default_rng(0)
  out = []
  for _ in range(num):
    n = int(rng.integers(lo, hi + 1))
    start = int(rng.integers(0, len(text) - n + 1))
    out.append(text[start:start + n])
  return out


def _random_model(config_path: str, tokenizer=None, w_scale: float = 0.0):
  cfg = C.resolve(config_path, [])
  family = family_of(cfg)
  if family.tokenizer == "byte":
    tokenizer = ByteTokenizer()
  vocab = family.vocab_size(cfg, tokenizer)
  model = family.build_model(cfg, vocab, nnx.Rngs(0))
  if w_scale and family.words:
    model.head[...] = model.head[...].at[:, W_ID].multiply(w_scale)
  return model, cfg, tokenizer


def kv_held(state: dict) -> tuple[int, int]:
  """(bytes of K/V entries held, bytes allocated) over every backbone cache in `state`."""
  held = alloc = 0
  caches = state.get("bb", state.get("cache"))
  todo = [caches]
  while todo:
    c = todo.pop()
    if isinstance(c, dict) and "k" in c and "length_B" in c:
      _, groups, _, head_dim = c["k"][0].shape
      per_entry = 2 * len(c["k"]) * groups * head_dim * c["k"][0].dtype.itemsize
      held += per_entry * int(np.sum(np.asarray(c["length_B"])))
      alloc += sum(int(a.nbytes) for a in c["k"] + c["v"])
    elif isinstance(c, dict):
      todo.extend(c.values())
  return held, alloc


def _units(sampler) -> int:
  """Backbone positions of the last call: units (HAT), chunks (merge) or tokens."""
  st = sampler.last_state
  if "units_B" in st:
    return int(np.sum(np.asarray(st["units_B"])))
  if "t_B" in st:
    return int(np.sum(np.asarray(st["bb"]["length_B"])))
  return int(np.sum(np.asarray(st["cache"]["length_B"])))


class _Timer:
  """Timed calls of one sampler at one batch size (after a warm-up): `generate_batch` of
  `batch` prompts, or `generate_many` when more prompts are given."""

  def __init__(self, sampler, batch: int, opts: SampleOptions, prompts: list[bytes],
               count_positions: bool = True):
    self.sampler, self.batch, self.opts = sampler, batch, opts
    self.prompts = prompts
    self.many = len(prompts) > batch
    # Corpus prompts may exceed the cache, whose slides hide how many positions the new
    # bytes took: no bytes/position then.
    self.count_positions = count_positions
    sampler.generate_batch(self.prompts[:1] * batch, opts)  # compiles every step function
    self.walls, self.cpus, self.totals, self.units = [], [], [], []

  def done(self, repeats: int, min_seconds: float) -> bool:
    return len(self.walls) >= repeats and sum(self.walls) >= min_seconds

  def call(self) -> None:
    # Call i samples with seed i: one draw of a batch-1 call decides its word (token)
    # lengths and so its speed; every model sees the same seeds, and the median covers
    # many samples.
    opts = dataclasses.replace(self.opts, seed=self.opts.seed + len(self.walls))
    start, cpu = time.perf_counter(), time.process_time()
    if self.many:
      self.outs = self.sampler.generate_many(self.prompts, opts, batch_size=self.batch)
    else:
      self.outs = self.sampler.generate_batch(self.prompts, opts)
    self.walls.append(time.perf_counter() - start)
    self.cpus.append(time.process_time() - cpu)
    self.totals.append(sum(map(len, self.outs)))
    self.units.append(None if self.many else _units(self.sampler))

  def result(self) -> dict:
    sampler, prompts, opts = self.sampler, self.prompts[:self.batch], self.opts
    walls, cpus, totals = self.walls, self.cpus, self.totals
    rates = [t / w for t, w in zip(totals, walls)]
    # Positions the prompts alone take (START/BOS + prompt words or tokens or chunks).
    sampler.generate_batch(prompts, SampleOptions(temperature=0.0, max_new_bytes=1))
    base_units = _units(sampler)
    outs = sampler.generate_batch(prompts, opts)
    held, alloc = kv_held(sampler.last_state)
    units = _units(sampler)
    # Positions are counted over the timed calls, or on one batch of the first prompts.
    counted = ([(sum(map(len, outs)), units)] if self.many
               else list(zip(totals, self.units)))
    bytes_per_position = (sum(t for t, _ in counted)
                          / sum(max(u - base_units, 1) for _, u in counted))
    bb = sampler.last_state.get("bb", {})
    extra = {}
    if "deleted_B" in bb:  # delete gate: fraction of committed words left out above it
      extra["deleted_fraction"] = float(np.sum(np.asarray(bb["deleted_B"]))) / max(units, 1)
    # Bytes a row decodes in a call: the longest row of each batch of prompts.
    longest = sum(max(map(len, self.outs[i:i + self.batch]))
                  for i in range(0, len(self.outs), self.batch))
    return {"batch": self.batch, "calls": len(walls), "bytes": totals[-1],
            "seconds": statistics.median(walls),
            "bytes_per_s": statistics.median(rates), "bytes_per_s_all": rates,
            "bytes_per_cpu_s": statistics.median([t / c for t, c in zip(totals, cpus)]),
            "ms_per_byte_per_row": 1e3 * statistics.median(walls) / max(longest, 1),
            "prompts": len(self.prompts),
            "bytes_per_position": bytes_per_position if self.count_positions else None,
            "kv_bytes_held": held, "kv_bytes_allocated": alloc,
            "kv_bytes_per_position": held / max(units, 1), **extra}


def time_side_by_side(samplers: dict, batch: int, opts: SampleOptions, repeats: int,
                      min_seconds: float, prompts: list[bytes],
                      count_positions: bool = True) -> dict[str, dict]:
  """Per model, the timing of `batch`-row calls over `prompts` (at least `batch`), the
  models' calls taken in turn.

  Round robin, one call each, until every model has `repeats` calls and `min_seconds`
  of them: whatever else loads the machine meanwhile loads every model alike.
  """
  timers = {name: _Timer(s, batch, opts, prompts, count_positions)
            for name, s in samplers.items()}
  while not all(t.done(repeats, min_seconds) for t in timers.values()):
    for t in timers.values():
      if not t.done(repeats, min_seconds):
        t.call()
  return {name: t.result() for name, t in timers.items()}


def _fmt(value, spec: str) -> str:
  return "-" if value is None else format(value, spec)


@entry_point
def main(argv=None) -> int:
  """Runs the benchmark and prints a markdown table; writes JSON with --out."""
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--run", action="append", default=[], metavar="NAME=WORKDIR",
                  help="a trained run (repeatable); without any, random-weight models")
  ap.add_argument("--models", default=",".join(CONFIGS),
                  help="random-weight mode: families to build from the tiny configs")
  ap.add_argument("--config", action="append", default=[], metavar="NAME=CONFIG",
                  help="random-weight mode: a config file to build instead (repeatable)")
  ap.add_argument("--bpe-vocab", type=int, default=2048)
  ap.add_argument("--bpe-train-bytes", type=int, default=2_000_000)
  ap.add_argument("--batches", default="1,32,128")
  ap.add_argument("--new-bytes", type=int, default=192)
  ap.add_argument("--repeats", type=int, default=3, help="timed calls per row, at least")
  ap.add_argument("--min-seconds", type=float, default=2.0,
                  help="keep timing calls until they took this long in all (median)")
  ap.add_argument("--prompts", type=int, default=0,
                  help="prompts per timed call, continued `batch` rows at a time "
                  "(generate_many, as lm-eval's generate_until); default: one batch")
  ap.add_argument("--prompt-bytes", default="", metavar="LO:HI",
                  help="prompts of LO..HI bytes cut from the English corpus at seeded "
                  "offsets (default: one 70-76 byte sentence)")
  ap.add_argument("--chunk-steps", type=int, default=CHUNK_STEPS,
                  help="most device ticks per call (host transfer)")
  ap.add_argument("--w-scale", type=float, default=10.0,
                  help="HAT [W] logit scale for random weights (words of a few bytes)")
  ap.add_argument("--out", default="", help="JSON results file")
  args = ap.parse_args(argv)
  if args.prompts < 0:
    ap.error(f"--prompts must be >= 0, got {args.prompts}")
  lengths = None
  if args.prompt_bytes:
    lo, _, hi = args.prompt_bytes.partition(":")
    if not (lo.isdigit() and hi.isdigit() and 0 <= int(lo) <= int(hi)):
      ap.error(f"--prompt-bytes wants LO:HI with 0 <= LO <= HI, got {args.prompt_bytes!r}")
    lengths = (int(lo), int(hi))

  models = {}
  if args.run:
    from hat.rundir import load_for_inference
    for spec in args.run:
      name, _, workdir = spec.partition("=")
      if not workdir:
        ap.error(f"--run wants NAME=WORKDIR, got {spec!r}")
      models[name] = (*load_for_inference(workdir), workdir)
  else:
    tok = None
    paths = {n: CONFIGS[n] for n in args.models.split(",") if n}
    if args.config:
      paths = {}
      for spec in args.config:
        name, _, path = spec.partition("=")
        if not path:
          ap.error(f"--config wants NAME=CONFIG, got {spec!r}")
        paths[name] = path
    if any(family_of(C.resolve(p, [])).tokenizer == "bpe" for p in paths.values()):
      from hat.text.bpe import train_bpe
      with tempfile.TemporaryDirectory() as tmp:
        tok = train_bpe(_corpus_texts(args.bpe_train_bytes), args.bpe_vocab,
                        pathlib.Path(tmp) / "bpe.model")
    for name, path in paths.items():
      models[name] = (*_random_model(path, tok, args.w_scale), path)
  opts = SampleOptions(temperature=1.0, top_k=50, max_new_bytes=args.new_bytes, seed=0)
  dev = jax.devices()[0]
  machine = {"platform": dev.platform, "device_kind": dev.device_kind,
             "num_devices": jax.device_count(), "host": platform.platform(),
             "processor": platform.processor(), "cpu_count": os.cpu_count(),
             "jax": jax.__version__}
  print(f"machine: {machine}", flush=True)
  rows = []
  samplers = {name: make_sampler(model, cfg, tok, chunk_steps=args.chunk_steps)
              for name, (model, cfg, tok, _) in models.items()}
  batches = [int(b) for b in args.batches.split(",")]
  # One prompt set for every model and batch (corpus prompts read once).
  prompts = make_prompts(max(args.prompts, *batches), lengths)
  for batch in batches:
    timed = time_side_by_side(samplers, batch, opts, args.repeats, args.min_seconds,
                              prompts[:max(args.prompts, batch)], lengths is None)
    for name, (_, cfg, _, source) in models.items():
      bb = cfg.model.backbone
      r = {"model": name, "family": family_of(cfg).name, "source": source, **timed[name],
           "backbone": f"{bb.num_layers}x{bb.d_model}"}
      rows.append(r)
      print(json.dumps(r), flush=True)
  many = f", {args.prompts} prompts per call" if args.prompts else ""
  many += f", prompts of {args.prompt_bytes} bytes" if lengths else ""
  print(f"\n{machine['platform']} ({machine['device_kind']}), new bytes per row "
        f"{args.new_bytes}{many}, median of >= {args.repeats} calls and >= "
        f"{args.min_seconds} s\n")
  print("| model | backbone | batch | bytes/s | bytes/CPU-s | ms/byte (per row) | "
        "bytes/position | KV bytes/position |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['model']} | {r['backbone']} | {r['batch']} | {r['bytes_per_s']:.0f} | "
          f"{r['bytes_per_cpu_s']:.0f} | {r['ms_per_byte_per_row']:.2f} | "
          f"{_fmt(r['bytes_per_position'], '.1f')} | {r['kv_bytes_per_position']:.0f} |")
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps({"machine": machine, "results": rows},
                                                 indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
