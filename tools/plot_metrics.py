"""Plot training curves of one or more runs from their metrics.jsonl.

    python tools/plot_metrics.py runs/hat_en runs/bpe_en --keys train/bpb,eval/en_val/bpb \
        --x bytes --out runs/curves.png

`--x` is `step` (default) or `bytes`: the run's byte budget, `data.batch_size *
data.window_bytes` per step from its config.json (HAT and BPE runs with equal budgets see
the identical windows). A run directory may also be given as `label=path`; runs and
the output may be gs:// locations.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from hat.cli import UserError, entry_point  # noqa: E402


from hat import storage  # noqa: E402


def load(run: storage.Path) -> list[dict]:
  """The run's metrics records (a resumed run's later records win per step and key)."""
  path = run / "metrics.jsonl"
  if not path.exists():
    raise UserError(f"no metrics.jsonl in {run}")
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of one metric, last record per step."""
  by_step = {r["step"]: r[key] for r in records if r.get(key) is not None}
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


def bytes_per_step(run: storage.Path) -> float:
  """Window bytes times global batch: the run's byte budget per step."""
  cfg = json.loads((run / "config.json").read_text())
  cfg = cfg.get("config", cfg)
  return float(cfg["data"]["window_bytes"] * cfg["data"]["batch_size"])


@entry_point
def main(argv: list[str] | None = None) -> int:
  """CLI entry point."""
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("runs", nargs="+", help="run directories (or label=path)")
  p.add_argument("--keys", default="train/bpb", help="comma list of metric keys")
  p.add_argument("--x", choices=("step", "bytes"), default="step")
  p.add_argument("--out", required=True, help="PNG path")
  args = p.parse_args(argv)
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  keys = [k for k in args.keys.split(",") if k]
  fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
  for item in args.runs:
    label, sep, path = item.partition("=")
    run = storage.path(path if sep else item)
    label = label if sep else run.name
    records = load(run)
    scale = bytes_per_step(run) if args.x == "bytes" else 1.0
    for ax, key in zip(axes[0], keys):
      steps, values = series(records, key)
      if steps:
        ax.plot([s * scale for s in steps], values, marker="." if len(steps) < 50 else None,
                label=label)
  for ax, key in zip(axes[0], keys):
    ax.set_title(key)
    ax.set_xlabel("training bytes (budget)" if args.x == "bytes" else "step")
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  out = storage.path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  with out.open("wb") as f:  # a file object: matplotlib cannot open a gs:// URL
    fig.savefig(f, format="png", dpi=120)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
