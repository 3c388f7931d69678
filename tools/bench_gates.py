"""Dynamic gates side by side at the tiny config, on the same training bytes.

    python tools/bench_gates.py --data text:../shared/data/corpus/en --steps 300

Rows: plain HAT; deletion-gated HAT at each --deltas (bpb with soft and hard deletion,
measured deletion ratio, backbone KV-cache entries relative to plain HAT, greedy
generation bytes/s with word-level KV caches); merge-gated HAT (bpb, bytes per backbone
position, training bytes/s). Every model trains `--steps` steps on the identical window
stream (same data seed and window size) with the trainer's own jitted step and the
host-side gate controller; bpb is measured on `--eval-batches` validation batches.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from hat.cli import entry_point  # noqa: E402
from hat.config import resolve  # noqa: E402
from hat.data import pipeline  # noqa: E402
from hat.family import family_of  # noqa: E402
from hat.data.sources import parse_eval_sets  # noqa: E402
from hat.models import gates, model_vocab_size  # noqa: E402
from hat.models.losses import bits_per_byte  # noqa: E402
from hat.sharding import make_mesh  # noqa: E402
from hat.train.state import MODEL, init_state, model_from_state, state_spec  # noqa: E402
from hat.train.step import make_eval_step, make_train_step  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def train_and_eval(cfg, eval_batches: int):
  """Trains cfg (controller on the host) -> (model, summed eval metrics, train stats)."""
  mesh = make_mesh("data=1", jax.devices()[:1])
  vocab = model_vocab_size(cfg)
  spec = state_spec(cfg, vocab, mesh)
  state = init_state(cfg, vocab, mesh, spec)
  it = pipeline.make_train_iterator(cfg, process_index=0, process_count=1)
  batch = pipeline.global_batch(next(it), mesh)
  step = make_train_step(cfg, spec, mesh, batch)
  controller = family_of(cfg).make_controller(cfg)
  ratios, t0, trained_bytes, timed_bytes = [], None, 0.0, 0.0
  with jax.set_mesh(mesh):
    for s in range(cfg.steps):
      alpha = controller.alpha if controller else 0.0
      state, m = step(state, batch, np.float32(1.0), alpha)
      m = jax.device_get(m)
      trained_bytes += float(m["num_bytes"])
      if s == 0:
        t0 = time.perf_counter()  # excludes compilation
      else:
        timed_bytes += float(m["num_bytes"])
      r = gates.measured_ratio(m)
      if r is not None:
        ratios.append(r)
        if controller:
          controller.update(r)
      batch = pipeline.global_batch(next(it), mesh)
    train_s = time.perf_counter() - t0
    eval_step = make_eval_step(cfg, spec, mesh, batch)
    model = model_from_state(spec, state)
    sums: dict[str, float] = {}
    hard = _hard_eval_fn(model) if family_of(cfg).gate == "delete" else None
    name = next(iter(parse_eval_sets(cfg.data.eval, cfg.data.train)))
    for local in pipeline.make_eval_iterator(cfg, name, max_batches=eval_batches,
                                             process_index=0, process_count=1):
      b = pipeline.global_batch(local, mesh)
      for k, v in jax.device_get(eval_step(state[MODEL], b)).items():
        sums[k] = sums.get(k, 0.0) + float(v)
      if hard is not None:
        for k, v in jax.device_get(hard(b)).items():
          sums["hard_" + k] = sums.get("hard_" + k, 0.0) + float(v)
  stats = {"train_bytes": trained_bytes, "train_bytes_per_s": timed_bytes / train_s,
           # The per-step ratio oscillates around delta: report its mean and spread over
           # the last 100 steps (or the last half of a shorter run).
           "train_ratio_tail_mean": _tail(ratios, np.mean),
           "train_ratio_tail_std": _tail(ratios, np.std),
           "alpha": controller.alpha if controller else None}
  return model, sums, stats


def _tail(values, fn):
  tail = values[-min(100, max(1, len(values) // 2)):]
  return float(fn(tail)) if tail else None


def _hard_eval_fn(model):
  """Jitted hard-deletion forward -> nll sum and KV statistics."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(batch):
    m = nnx.merge(graphdef, state)
    logits, aux = m(batch, hard=True)
    lse = jax.nn.logsumexp(logits, -1)
    tgt = jnp.take_along_axis(logits, batch["targets_BxS"][..., None], -1)[..., 0]
    nll = jnp.sum((lse - tgt) * batch["target_mask_BxS"])
    return {"nll_sum": nll, "gate_units": aux["gate_units"],
            "gate_deleted": aux["gate_deleted"], "kv_overflow": aux["kv_overflow"]}

  return run


def generation_stats(model, cfg, n_bytes: int):
  """Greedy generation bytes/s (after a warm-up call) and KV entries per backbone layer."""
  from hat.generate import HATSampler, SampleOptions  # pylint: disable=g-import-not-at-top
  sampler = HATSampler(model, cfg, max_units=512)
  opts = SampleOptions(temperature=0.0, max_new_bytes=n_bytes)
  sampler.generate(b"The ", opts)  # compile
  t0 = time.perf_counter()
  out = sampler.generate(b"It was the best of times, it was the ", opts)
  dt = time.perf_counter() - t0
  caches = sampler.last_state["bb"]
  # Per layer; a gate on the word inputs (layer 0) has no lower stack, hence no cache.
  lens = [int(c["length_B"][0]) for key in ("bb", "lower", "upper") if caches.get(key)
          for c in [caches[key]] for _ in c["k"]]
  return {"gen_bytes_per_s": len(out) / dt, "gen_kv_entries": sum(lens),
          "gen_kv_per_layer": lens, "sample": out.decode("utf-8", "replace")[:60]}


@entry_point
def main(argv=None) -> int:
  """CLI: train every variant, print a JSON line per model and a markdown table."""
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--data", default="text:../shared/data/corpus/en")
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--eval-batches", type=int, default=8)
  ap.add_argument("--deltas", default="0.3,0.5")
  ap.add_argument("--layer0-deltas", default="0.5",
                  help="target ratios of extra rows with the gate on the word inputs (layer 0)")
  ap.add_argument("--gen-bytes", type=int, default=200)
  ap.add_argument("--merge-controller", default="ratio", choices=("ratio", "pi"))
  ap.add_argument("--only", default="", help="comma list of rows: hat,delete,merge")
  ap.add_argument("--out", default="", help="append JSON lines here")
  args = ap.parse_args(argv)
  common = [f"data.train={args.data}", f"steps={args.steps}", "optim.warmup_steps=30",
            "sample_bytes=0", "eval_every=0"]
  rows = [("hat", "tiny_hat.py", [])]
  rows += [(f"delete δ={d}", "tiny_hat_delete.py", [f"model.gate.delete.target_ratio={d}"])
           for d in args.deltas.split(",") if d]
  rows += [(f"delete δ={d} layer 0", "tiny_hat_delete.py",
            [f"model.gate.delete.target_ratio={d}", "model.gate.delete.layer=0"])
           for d in args.layer0_deltas.split(",") if d]
  rows += [("merge", "tiny_hat_merge.py", [f"model.gate.controller={args.merge_controller}"])]
  only = set(filter(None, args.only.split(",")))
  results = []
  for name, config, over in rows:
    if only and name.split(" ")[0] not in only:
      continue
    cfg = resolve(str(ROOT / "configs" / config), [*common, *over])
    t0 = time.time()
    model, sums, stats = train_and_eval(cfg, args.eval_batches)
    res = {"model": name, "bpb": bits_per_byte(sums["nll_sum"], sums["num_bytes"]), **stats}
    family, g = family_of(cfg), cfg.model.gate.delete
    if family.gate == "delete":
      res["hard_bpb"] = bits_per_byte(sums["hard_nll_sum"], sums["num_bytes"])
      res["eval_deletion_ratio"] = sums["hard_gate_deleted"] / sums["hard_gate_units"]
      res["kv_overflow"] = sums["hard_kv_overflow"]
      n, l_all = cfg.model.backbone.num_layers, cfg.model.backbone.num_layers
      kept = 1 - res["eval_deletion_ratio"]
      res["kv_cache_vs_plain"] = (g.layer + (n - g.layer) * kept) / l_all
    if family.gate == "merge":
      res["bytes_per_backbone_position"] = sums["num_bytes"] / sums["chunks"]
      res["chunk_overflow"] = sums.get("chunk_overflow", 0.0)
    elif sums.get("num_words"):
      # Backbone positions of rule-based HAT: words + START/END units (= predicted units).
      res["bytes_per_backbone_position"] = sums["num_bytes"] / sums["num_words"]
    if family.words:
      res.update(generation_stats(model, cfg, args.gen_bytes))
    res["wall_s"] = time.time() - t0
    print(json.dumps(res), flush=True)
    results.append(res)
    if args.out:
      with open(args.out, "a") as f:
        f.write(json.dumps(res) + "\n")
  print("\n| model | bpb | hard bpb | deletion (eval) | train ratio (tail mean ± std) | "
        "KV vs plain | bytes/pos | train B/s | gen B/s |")
  print("|---|---|---|---|---|---|---|---|---|")
  f = lambda v, p=3: "–" if v is None else f"{v:.{p}f}"
  for r in results:
    print(f"| {r['model']} | {f(r['bpb'])} | {f(r.get('hard_bpb'))} | "
          f"{f(r.get('eval_deletion_ratio'))} | {f(r.get('train_ratio_tail_mean'))} ± "
          f"{f(r.get('train_ratio_tail_std'))} | {f(r.get('kv_cache_vs_plain'), 2)} | "
          f"{f(r.get('bytes_per_backbone_position'), 2)} | {f(r['train_bytes_per_s'], 0)} | "
          f"{f(r.get('gen_bytes_per_s'), 0)} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
