"""Estimates step time, throughput and days to a byte budget for a config on a pod.

  python tools/plan.py --config configs/hat_7b.py --device h100 --chips 256 \
      [--mfu 0.4] [--batch 1024] [--train_bytes 1.2e12]

From the analytic training FLOPs (hat.flops: matmuls and attention, 3x forward, no
remat recompute) and an assumed model-FLOPs utilisation:
  step time = FLOPs per step / (chips x peak FLOP/s x MFU).
Two FLOP counts are shown: *executed* (the config's static padded layout, what the
chips really run) and *ideal* (perfect packing of full windows). Prints its assumptions.
`--paper` prints the comparison with the paper's 256 x H100 step times instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from hat import flops, params  # noqa: E402
from hat.cli import entry_point, user_input  # noqa: E402
from hat.family import family_of  # noqa: E402
from hat.config import TrainConfig, resolve  # noqa: E402

_ROOT = pathlib.Path(__file__).resolve().parents[1]

# Short device names -> the device_kind keys of hat.flops.PEAK_FLOPS.
DEVICES = {
    "h100": "NVIDIA H100 80GB HBM3",
    "h200": "NVIDIA H200",
    "a100": "NVIDIA A100-SXM4-80GB",
    "v4": "TPU v4",
    "v5e": "TPU v5e",
    "v5p": "TPU v5p",
    "v6e": "TPU v6e",
}
# Paper (HAT vs BPE, 256 x H100, batch 1024 x 16,384 bytes), seconds per step.
PAPER_STEP_S = {"1b": (0.9, 0.9), "3b": (2.3, 1.6), "7b": (4.5, 4.7)}


@dataclasses.dataclass(frozen=True)
class Plan:
  """One estimate; every figure follows from the fields before `step_s`."""

  kind: str
  device: str
  chips: int
  mfu: float
  batch: int
  window_bytes: int
  executed_flops: float  # per step
  ideal_flops: float  # per step
  step_s: float  # from executed FLOPs
  ideal_step_s: float
  bytes_per_s: float
  units_per_s: float  # words/s (HAT) or tokens/s (BPE, byte)
  unit_name: str
  days: float


def estimate(cfg: TrainConfig, device: str, chips: int, mfu: float = 0.4,
             train_bytes: float = 1.2e12, bytes_per_word: float = 5.97,
             bytes_per_token: float = 4.12) -> Plan:
  """Step time and throughput of `cfg` on `chips` devices of kind `device` at `mfu`."""
  kind = DEVICES.get(device.lower(), device)
  peak = flops.peak_flops(kind)
  if peak is None:
    raise ValueError(f"unknown device {device!r}; known: {sorted(DEVICES)} or a device_kind "
                     f"from hat.flops.PEAK_FLOPS")
  if not 0 < mfu <= 1:
    raise ValueError(f"--mfu must be in (0, 1], got {mfu}")
  batch, window = cfg.data.batch_size, cfg.data.window_bytes
  executed = flops.train_flops_per_step(cfg)
  ideal = flops.real_train_flops_per_window(cfg, bytes_per_word, bytes_per_token)["total"] * batch
  rate = chips * peak * mfu
  step_s = executed / rate
  bytes_per_s = batch * window / step_s
  family = family_of(cfg)
  unit_name, per_unit = {"hat_rows": ("words", bytes_per_word)}.get(
      family.layout, ("tokens", bytes_per_token if family.tokenizer == "bpe" else 1.0))
  return Plan(kind=family.name, device=kind, chips=chips, mfu=mfu, batch=batch,
              window_bytes=window, executed_flops=executed, ideal_flops=ideal, step_s=step_s,
              ideal_step_s=ideal / rate, bytes_per_s=bytes_per_s,
              units_per_s=bytes_per_s / per_unit, unit_name=unit_name,
              days=train_bytes / bytes_per_s / 86400)


def print_plan(p: Plan, cfg: TrainConfig, train_bytes: float, bpw: float, bpt: float) -> None:
  """Human-readable estimate with its assumptions."""
  total = params.count_params(cfg.model)["total"]
  print("assumptions:")
  print(f"  {p.chips} x {p.device}, peak {flops.peak_flops(p.device) / 1e12:.0f} TFLOP/s "
        f"dense bf16 each, MFU {p.mfu:.0%}")
  print(f"  batch {p.batch} x {p.window_bytes:,} bytes = {p.batch * p.window_bytes / 1e6:.1f} MB "
        f"per step; corpus {bpw} bytes/word, {bpt} bytes/token")
  print("  FLOPs = matmuls + attention (causal counted as half), x3 for training, "
        "remat recompute not counted (it lowers the achievable MFU instead)")
  print(f"model: {p.kind}, {params.format_count(total)} parameters")
  print(f"FLOPs/step   executed {p.executed_flops:.4g} (padded layout), "
        f"ideal {p.ideal_flops:.4g} (perfect packing; ratio {p.executed_flops / p.ideal_flops:.3f})")
  print(f"step time    {p.step_s:.3f} s (ideal packing {p.ideal_step_s:.3f} s)")
  print(f"throughput   {p.bytes_per_s / 1e6:.2f} MB/s, {p.units_per_s / 1e6:.3f} M {p.unit_name}/s")
  print(f"to {train_bytes:.3g} bytes: {train_bytes / (p.batch * p.window_bytes):,.0f} steps, "
        f"{p.days:.2f} days")


def paper_table(mfu: float, bpw: float, bpt: float) -> list[str]:
  """Markdown rows: estimated vs published step times on 256 x H100 at batch 1024."""
  rows = ["| scale | model | executed TFLOP/step | estimate (s) | paper (s) | implied MFU |",
          "|---|---|---:|---:|---:|---:|"]
  for scale, published in PAPER_STEP_S.items():
    for kind, paper_s in zip(("hat", "bpe"), published):
      cfg = resolve(str(_ROOT / f"configs/{kind}_{scale}.py"), ["data.batch_size=1024"])
      p = estimate(cfg, "h100", 256, mfu, bytes_per_word=bpw, bytes_per_token=bpt)
      implied = p.executed_flops / (paper_s * 256 * flops.peak_flops(p.device))
      rows.append(f"| {scale.upper()} | {kind.upper()} | {p.executed_flops / 1e12:,.0f} | "
                  f"{p.step_s:.2f} | {paper_s} | {implied:.0%} |")
  return rows


@entry_point
def main(argv: list[str] | None = None) -> int:
  """CLI entry point."""
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default=str(_ROOT / "configs/hat_1b.py"), help="config file")
  ap.add_argument("--device", default="h100", help=f"one of {sorted(DEVICES)}")
  ap.add_argument("--chips", type=int, default=256, help="number of devices (GPUs or TPU chips)")
  ap.add_argument("--mfu", type=float, default=0.4, help="assumed model-FLOPs utilisation")
  ap.add_argument("--batch", type=int, default=0, help="global batch (default: the config's)")
  ap.add_argument("--train_bytes", type=float, default=1.2e12, help="training budget in bytes")
  ap.add_argument("--bytes_per_word", type=float, default=5.97)
  ap.add_argument("--bytes_per_token", type=float, default=4.12)
  ap.add_argument("--paper", action="store_true",
                  help="print estimate vs the paper's 256 x H100 step times (markdown)")
  args, overrides = ap.parse_known_args(argv)
  if args.paper:
    print("\n".join(paper_table(args.mfu, args.bytes_per_word, args.bytes_per_token)))
    return 0
  for item in overrides:
    if not item.startswith("--config."):
      ap.error(f"unrecognised argument {item!r} (overrides look like --config.key=value)")
  extra = list(overrides) + ([f"data.batch_size={args.batch}"] if args.batch else [])
  cfg = resolve(args.config, extra)
  with user_input(ValueError):  # an unknown --device or an --mfu out of range
    p = estimate(cfg, args.device, args.chips, args.mfu, args.train_bytes, args.bytes_per_word,
                 args.bytes_per_token)
  print_plan(p, cfg, args.train_bytes, args.bytes_per_word, args.bytes_per_token)
  return 0


if __name__ == "__main__":
  sys.exit(main())
