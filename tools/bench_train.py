"""Train-step throughput of HAT, BPE and the byte LM side by side, and checkpoint overhead.

    python tools/bench_train.py --data text:../shared/data/corpus/en.txt --steps 20 \\
        --out runs/bench_train.json

Every model sees windows of the same `data.window_bytes` and the same batch size, i.e.
the same text bytes per batch. A few real batches are put on the device first and cycled,
so the timing is the step alone (no input pipeline). Reported per model: steps/s, real
text bytes/s, analytic TFLOP/s per device and MFU (None where the device's peak is
unknown, e.g. CPU). The checkpoint figure compares the time of steps around an async
save (the save's blocking device->host copy included) with steps that do not save.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from hat import flops  # noqa: E402
from hat.config import resolve  # noqa: E402
from hat.data import pipeline  # noqa: E402
from hat.models import model_vocab_size  # noqa: E402
from hat.train.checkpoint import Checkpointer  # noqa: E402
from hat.train.loop import make_run_mesh  # noqa: E402
from hat.train.state import init_state, state_spec  # noqa: E402
from hat.train.step import make_train_step  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = {"hat": "configs/tiny_hat.py", "bpe": "configs/tiny_bpe.py",
           "byte": "configs/tiny_byte.py"}


class _NoData:
  def get_state(self):
    return {}


def _bpe_tokenizer(data: str, workdir: pathlib.Path, overrides: list[str]) -> str:
  """A small BPE model trained on the benchmark's own training text."""
  from hat.text.bpe import train_bpe  # pylint: disable=g-import-not-at-top

  cfg = resolve(str(ROOT / CONFIGS["hat"]), [f"data.train={data}", *overrides])
  from hat.data.sources import open_from_config, parse_mixture  # pylint: disable=g-import-not-at-top

  docs = open_from_config(cfg.data, parse_mixture(data)[0], "train")
  texts = [docs[i] for i in range(min(len(docs), 5000))]
  path = workdir / "bench_bpe.model"
  train_bpe(texts, vocab_size=1024, model_path=path)
  return str(path)


def bench_model(kind: str, overrides: list[str], steps: int, ckpt_dir: pathlib.Path | None):
  """Compile + timed steps of one model kind; optionally the async-save overhead."""
  cfg = resolve(str(ROOT / CONFIGS[kind]), overrides)
  mesh = make_run_mesh(cfg)
  tokenizer = pipeline.default_tokenizer(cfg)
  vocab = model_vocab_size(cfg.model, tokenizer)
  spec = state_spec(cfg, vocab, mesh)
  state = init_state(cfg, vocab, mesh, spec)
  it = pipeline.make_train_iterator(cfg, tokenizer)
  batches = [pipeline.global_batch(next(it), mesh) for _ in range(4)]
  step_fn = make_train_step(cfg, spec, mesh, batches[0])
  one = np.float32(1.0)

  def run(n, state, start=0):
    m = None
    for i in range(n):
      state, m = step_fn(state, batches[(start + i) % len(batches)], one)
    jax.block_until_ready(m)
    return state

  with jax.set_mesh(mesh):
    t0 = time.perf_counter()
    state = run(1, state)
    compile_s = time.perf_counter() - t0
    state = run(2, state)  # settle
    t0 = time.perf_counter()
    state = run(steps, state)
    dt = time.perf_counter() - t0
    bytes_per_batch = np.mean([float(np.sum(np.asarray(b["num_bytes_B"]))) for b in batches])
    flops_step = flops.train_flops_per_step(cfg, vocab)
    kind_dev = jax.devices()[0].device_kind
    per_dev = flops_step * steps / dt / jax.device_count()
    out = {"kind": kind, "compile_s": compile_s, "steps_per_s": steps / dt,
           "step_ms": 1e3 * dt / steps, "bytes_per_batch": bytes_per_batch,
           "bytes_per_s": bytes_per_batch * steps / dt,
           "tflops_per_s_per_device": per_dev / 1e12, "mfu": flops.mfu(per_dev, kind_dev),
           "train_flops_per_step": flops_step}
    if ckpt_dir is not None:
      out.update(_ckpt_overhead(cfg, state, run, ckpt_dir))
  return out


def _ckpt_overhead(cfg, state, run, ckpt_dir, reps: int = 5, window: int = 5):
  """A save followed by `window` steps vs `window + 1` plain steps (medians of `reps`).

  The save's blocking part (device->host copy) and the background write competing with
  the following steps are both inside the timed window.
  """
  ckpt = Checkpointer(ckpt_dir, keep=2)
  base, with_save, blocking = [], [], []
  for rep in range(reps):
    t0 = time.perf_counter()
    state = run(window + 1, state)
    base.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    ckpt.save(1000 + rep, state, _NoData(), cfg)
    blocking.append(time.perf_counter() - t0)
    state = run(window, state)
    with_save.append(time.perf_counter() - t0)
    ckpt.wait()
  ckpt.close()
  b, w = float(np.median(base)), float(np.median(with_save))
  step_s = b / (window + 1)
  extra = w - (b - step_s)  # the save's cost in units of time, replacing one step
  return {"ckpt_save_blocking_ms": 1e3 * float(np.median(blocking)),
          "ckpt_step_ms": 1e3 * step_s,
          "ckpt_extra_ms": 1e3 * (extra - step_s),
          "ckpt_overhead_one_step": (extra - step_s) / step_s,
          "ckpt_overhead_amortised_at_ckpt_every": (extra - step_s) / (cfg.ckpt_every * step_s)}


def main(argv=None) -> int:
  """CLI entry point."""
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", default="builtin", help="training source spec (data.train)")
  p.add_argument("--models", default="hat,bpe,byte")
  p.add_argument("--steps", type=int, default=20, help="timed steps per model")
  p.add_argument("--tokenizer", default="", help="BPE model (default: train a 1k one)")
  p.add_argument("--no-ckpt", action="store_true", help="skip the checkpoint overhead test")
  p.add_argument("--out", default="runs/bench_train.json")
  p.add_argument("overrides", nargs="*", help="extra key=value config overrides")
  args = p.parse_args(argv)
  kinds = [k for k in args.models.split(",") if k]
  common = [f"data.train={args.data}", *args.overrides]
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    for kind in kinds:
      ov = list(common)
      if kind == "bpe":
        ov.append(f"data.tokenizer={args.tokenizer or _bpe_tokenizer(args.data, tmp, common)}")
      ckpt_dir = None if args.no_ckpt else tmp / f"ckpt_{kind}"
      results.append(bench_model(kind, ov, args.steps, ckpt_dir))
      print(json.dumps(results[-1]), flush=True)
  device = {"device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
            "platform": jax.devices()[0].platform}
  print(f"\ndevice: {device['device_kind']} x{device['device_count']}")
  print(f"{'model':6} {'steps/s':>9} {'bytes/s':>11} {'TFLOP/s/dev':>12} {'MFU':>7} "
        f"{'ckpt ovh (1 step)':>18} {'ckpt ovh (amortised)':>21}")
  for r in results:
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    one = r.get("ckpt_overhead_one_step")
    am = r.get("ckpt_overhead_amortised_at_ckpt_every")
    print(f"{r['kind']:6} {r['steps_per_s']:9.2f} {r['bytes_per_s']:11.0f} "
          f"{r['tflops_per_s_per_device']:12.4f} {mfu:>7} "
          f"{'' if one is None else f'{100 * one:.0f}%':>18} "
          f"{'' if am is None else f'{100 * am:.2f}%':>21}")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"device": device, "results": results}, indent=2) + "\n")
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
