"""Top-k or top-p sampling on the device: the exact path against rejection, by kept mass.

    python tools/bench_sampling.py                      # 259 and 2,048 symbols, batch 1/32/128
    python tools/bench_sampling.py --vocabs 259 --batches 32 --scales 1,2,3,4,6
    python tools/bench_sampling.py --top-p 0.9          # top-p alone instead of top-k

Top-k or top-p alone draws by rejection (`hat.generate.sampling`): one draw from the
full distribution, kept when it lies in the row's kept set, a second round of draws, and
the exact path (bisection for the threshold, then a draw) for rows that missed. Its cost
depends on how much of the mass the kept set holds (a top-p set: at least top_p); the
exact path's does not.
Logits are Gaussian times `--scales` (larger: more mass in the top k); each row of the
table gives the mean mass of the kept set and microseconds per batched draw of either
path, timed as a compiled loop of `--draws` draws (best of `--repeats` loops), the
logits changing every draw so nothing is hoisted out of the loop.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from hat.cli import entry_point  # noqa: E402
from hat.generate import sampling  # noqa: E402

PATHS = {"exact": sampling._sample_exact,  # pylint: disable=protected-access
         "rejection": sampling._sample_by_rejection}  # pylint: disable=protected-access


def _draw_loop(path, draws: int):
  """A jitted loop of `draws` draws of one path (logits scaled a little each draw)."""

  def run(z_BxV, keys_BxK, top_k, top_p):
    def body(i, acc):
      keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(jax.random.wrap_key_data(keys_BxK))
      z = z_BxV * (1.0 + i.astype(jnp.float32) * 1e-7)
      return acc + path(z, jax.random.key_data(keys), top_k, top_p).sum()
    return jax.lax.fori_loop(0, draws, body, 0)

  return jax.jit(run)


def _best_us(fn, args, draws: int, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return 1e6 * best / draws


@entry_point
def main(argv=None) -> int:
  """Prints a markdown table (and writes JSON with --out)."""
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--vocabs", default="259,2048", help="symbols per draw (HAT bytes: 259)")
  ap.add_argument("--batches", default="1,32,128")
  ap.add_argument("--scales", default="1,3,6", help="logit scales (spread of the logits)")
  ap.add_argument("--top-k", type=int, default=50)
  ap.add_argument("--top-p", type=float, default=1.0,
                  help="below 1: top-p alone (top-k off) instead of top-k")
  ap.add_argument("--draws", type=int, default=200, help="draws per timed loop")
  ap.add_argument("--repeats", type=int, default=5, help="timed loops; the best is kept")
  ap.add_argument("--out", default="", help="JSON results file")
  args = ap.parse_args(argv)
  if args.top_k < 1:
    ap.error(f"--top-k must be >= 1, got {args.top_k}")
  if not 0 < args.top_p <= 1:
    ap.error(f"--top-p must be in (0, 1], got {args.top_p}")
  nucleus = args.top_p < 1
  kept = f"top-p {args.top_p:g}" if nucleus else f"top-{args.top_k}"
  loops = {name: _draw_loop(path, args.draws) for name, path in PATHS.items()}
  dev = jax.devices()[0]
  machine = {"platform": dev.platform, "device_kind": dev.device_kind,
             "host": platform.platform(), "jax": jax.__version__}
  print(f"machine: {machine}", flush=True)
  print(f"\n| symbols | batch | {kept} mass | exact us | rejection us | "
        "rejection / exact |")
  print("|---:|---:|---:|---:|---:|---:|")
  rows = []
  for vocab in [int(v) for v in args.vocabs.split(",")]:
    for batch in [int(b) for b in args.batches.split(",")]:
      for scale in [float(s) for s in args.scales.split(",")]:
        z_BxV = jax.random.normal(jax.random.key(1), (batch, vocab)) * scale
        probs_BxV = jax.nn.softmax(z_BxV, axis=-1)
        desc_BxV = -jnp.sort(-probs_BxV, axis=-1)
        if nucleus:  # the likeliest symbols until top_p of the mass (as `pick`)
          before_BxV = jnp.cumsum(desc_BxV, axis=-1) - desc_BxV
          mass = float(jnp.mean(jnp.sum(jnp.where(before_BxV < args.top_p, desc_BxV, 0), -1)))
        else:
          mass = float(jnp.mean(jnp.sum(desc_BxV[:, :min(args.top_k, vocab)], axis=-1)))
        keys_BxK = jax.random.key_data(jax.random.split(jax.random.key(0), batch))
        call = (z_BxV, keys_BxK, jnp.int32(0 if nucleus else args.top_k),
                jnp.float32(args.top_p))
        us = {name: _best_us(fn, call, args.draws, args.repeats) for name, fn in loops.items()}
        rows.append({"vocab": vocab, "batch": batch, "scale": scale, "kept": kept,
                     "kept_mass": mass,
                     **{f"{name}_us": t for name, t in us.items()}})
        print(f"| {vocab} | {batch} | {mass:.2f} | {us['exact']:.1f} | {us['rejection']:.1f} "
              f"| {us['rejection'] / us['exact']:.2f} |", flush=True)
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps({"machine": machine, "results": rows},
                                                 indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
