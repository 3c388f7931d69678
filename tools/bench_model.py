"""HAT vs the BPE baseline on the same backbone: throughput, FLOPs per byte, slot use.

    python tools/bench_model.py --data text:../shared/data/corpus/en --steps 20

Both models use the tiny configs' identical backbone and the identical byte windows
(same `window_bytes` and batch size, BPE `max_tokens` large enough that no window
carries over, so every batch holds the same bytes). Reports per model: step time,
real text bytes/s, analytic FLOPs per real byte (what the executed, padded shapes cost),
HAT byte-slot utilisation, and the HAT/BPE step-time and bytes/s ratios; writes JSON.
The 1B paper configs' analytic FLOPs per byte are compared too (no allocation).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from hat import flops  # noqa: E402
from hat.cli import entry_point  # noqa: E402
from hat.config import load_config_file, from_config_dict  # noqa: E402
from hat.data.pipeline import batch_stats, summarize_stats  # noqa: E402
from hat.train.bench import ROOT, bpe_tokenizer, time_model  # noqa: E402


@entry_point
def main(argv=None) -> int:
  """CLI entry point."""
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", default="builtin", help="training source spec (data.train)")
  p.add_argument("--steps", type=int, default=20, help="timed steps per model")
  p.add_argument("--tokenizer", default="", help="BPE model (default: train a 4k one)")
  p.add_argument("--max-tokens", type=int, default=320,
                 help="BPE positions per 512-byte window (no window may carry over)")
  p.add_argument("--out", default="runs/bench_model.json")
  args = p.parse_args(argv)
  common = [f"data.train={args.data}"]
  res = {}
  with tempfile.TemporaryDirectory() as tmp:
    tok = args.tokenizer or bpe_tokenizer(args.data, pathlib.Path(tmp), common, 4096)
    runs = {"hat": common, "bpe": common + [f"data.tokenizer={tok}",
                                            f"data.max_tokens={args.max_tokens}"]}
    for kind, ov in runs.items():
      r = time_model(kind, ov, args.steps)
      stats = summarize_stats([batch_stats(jax.device_get(b)) for b in r["_batches"]])
      cfg = r["_cfg"]
      per_byte = r["train_flops_per_step"] / r["bytes_per_batch"]
      row = {k: v for k, v in r.items() if not k.startswith("_")}
      row.update(flops_per_real_byte=per_byte, overflow_sequences=stats["overflow_sequences"],
                 backbone=str(cfg.model.backbone))
      if kind == "hat":
        row.update(slot_util=stats["slot_util"], byte_slot_util=stats["byte_slot_util"],
                   unit_util=stats["unit_util"], bytes_per_word=stats["bytes_per_word"])
      else:
        row.update(token_util=stats.get("token_util"),
                   bytes_per_token=stats.get("bytes_per_token"))
      res[kind] = row
      print(json.dumps(row), flush=True)
  h, b = res["hat"], res["bpe"]
  paper = {}
  for name in ("hat_1b", "bpe_1b"):
    cfg = from_config_dict(load_config_file(ROOT / f"configs/{name}.py"))
    paper[name] = flops.flops_per_byte(cfg, 5.97, 4.12)["total"]
  summary = {
      "device": jax.devices()[0].device_kind, "device_count": jax.device_count(),
      "same_bytes_per_batch": bool(h["bytes_per_batch"] == b["bytes_per_batch"]),
      "step_time_ratio_hat_over_bpe": h["step_ms"] / b["step_ms"],
      "bytes_per_s_ratio_hat_over_bpe": h["bytes_per_s"] / b["bytes_per_s"],
      "paper_1b_flops_per_byte": paper,
      "paper_1b_ratio_hat_over_bpe": paper["hat_1b"] / paper["bpe_1b"]}
  print(f"\ndevice: {summary['device']} x{summary['device_count']}; timed steps: {args.steps}")
  print("| model | step ms | bytes/batch | bytes/s | FLOPs/real byte | slot util | overflow |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  for k, r in res.items():
    util = f"{r['slot_util']:.3f} ({r['byte_slot_util']:.3f} bytes)" if k == "hat" else \
        f"{r['token_util']:.3f} (tokens)"
    print(f"| {k.upper()} | {r['step_ms']:.1f} | {r['bytes_per_batch']:.0f} | "
          f"{r['bytes_per_s']:.0f} | {r['flops_per_real_byte']:.3g} | {util} | "
          f"{r['overflow_sequences']} |")
  print(f"\nHAT/BPE step time {summary['step_time_ratio_hat_over_bpe']:.3f}, bytes/s "
        f"{summary['bytes_per_s_ratio_hat_over_bpe']:.3f}; paper 1B FLOPs/byte HAT/BPE "
        f"{summary['paper_1b_ratio_hat_over_bpe']:.3f}")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"summary": summary, "results": res}, indent=2) + "\n")
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
