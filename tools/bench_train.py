"""Train-step throughput of HAT, BPE and the byte LM side by side, and checkpoint overhead.

    python tools/bench_train.py --data text:../shared/data/corpus/en.txt --steps 20 \\
        --out runs/bench_train.json

Every model sees windows of the same `data.window_bytes` and the same batch size, i.e.
the same text bytes per batch. A few real batches are put on the device first and cycled,
so the timing is the step alone (no input pipeline). Reported per model: steps/s, real
text bytes/s, analytic TFLOP/s per device and MFU (None where the device's peak is
unknown, e.g. CPU). The checkpoint figure compares the time of steps around an async
save (the save's blocking device->host copy included) with steps that do not save:
`block ms` is the part the training thread waits for, `save ms` all a save adds to
training, `whole ms` the time until the checkpoint is committed.
`--ckpt-dir gs://BUCKET/...` puts those saves on cloud storage (for the emulator, run
this under `tools/gcs_emulator.py --`).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from hat.cli import entry_point  # noqa: E402
from hat.train.bench import bpe_tokenizer, time_model  # noqa: E402


@entry_point
def main(argv=None) -> int:
  """CLI entry point."""
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", default="builtin", help="training source spec (data.train)")
  p.add_argument("--models", default="hat,bpe,byte")
  p.add_argument("--steps", type=int, default=20, help="timed steps per model")
  p.add_argument("--tokenizer", default="", help="BPE model (default: train a 1k one)")
  p.add_argument("--no-ckpt", action="store_true", help="skip the checkpoint overhead test")
  p.add_argument("--ckpt-dir", default="", help="where the timed saves go, local or gs:// "
                 "(default: a temporary local folder)")
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
        ov.append(f"data.tokenizer={args.tokenizer or bpe_tokenizer(args.data, tmp, common)}")
      ckpt_dir = None if args.no_ckpt else f"{args.ckpt_dir or tmp}/ckpt_{kind}"
      r = time_model(kind, ov, args.steps, ckpt_dir)
      results.append({k: v for k, v in r.items() if not k.startswith("_")})
      print(json.dumps(results[-1]), flush=True)
  device = {"device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
            "platform": jax.devices()[0].platform}
  print(f"\ndevice: {device['device_kind']} x{device['device_count']}")
  print(f"{'model':6} {'steps/s':>9} {'bytes/s':>11} {'TFLOP/s/dev':>12} {'MFU':>7} "
        f"{'step ms':>8} {'block ms':>8} {'save ms':>8} {'whole ms':>8} "
        f"{'ckpt ovh (1 step)':>18} {'ckpt ovh (amortised)':>21}"
        f" {'previous save ms':>19} {'previous ovh':>15}")
  for r in results:
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    one = r.get("ckpt_overhead_one_step")
    am = r.get("ckpt_overhead_amortised_at_ckpt_every")
    pct = lambda v, p=0: "" if v is None else f"{100 * v:.{p}f}%"
    ms = lambda v: "" if v is None else f"{v:.0f}"
    print(f"{r['kind']:6} {r['steps_per_s']:9.2f} {r['bytes_per_s']:11.0f} "
          f"{r['tflops_per_s_per_device']:12.4f} {mfu:>7} {ms(r.get('ckpt_step_ms')):>8} "
          f"{ms(r.get('ckpt_save_blocking_ms')):>8} {ms(r.get('ckpt_extra_ms')):>8} "
          f"{ms(r.get('ckpt_save_total_ms')):>8} {pct(one):>18} {pct(am, 2):>21} "
          f"{ms(r.get('ckpt_extra_ms_previous')):>19} "
          f"{pct(r.get('ckpt_overhead_one_step_previous')):>15}")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"device": device, "results": results}, indent=2) + "\n")
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
