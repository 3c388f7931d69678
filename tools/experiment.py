"""The small-scale HAT vs BPE study, end to end, with the project's own commands.

    python tools/experiment.py --out runs/study                  # ~75 min on a 2-core CPU
    python tools/experiment.py --out runs/study_quick --preset quick   # a few minutes
    python tools/experiment.py --out runs/study_gpu --preset gpu       # ~8 min, one H100/H200

Stages (each skips what is done, and a half-trained run resumes from its checkpoint, so
an interrupted study is simply restarted with the same command):
  0. BPE tokenizers (two vocabulary sizes) on the English corpus; bytes/word and
     bytes/token measured; the HAT backbone sized to the BPE model's FLOPs per byte;
  1. at the smallest budget: a learning-rate sweep per family (one more rate when the best
     is at an edge), BPE's other vocabulary and HAT's knobs (decoder depth, encoder depth,
     byte-stack width, unicode splitter), each at the family's best rate;
  2. the compute ladder: each family's best setting at every larger budget, fed the
     identical byte windows;
  3. continued pretraining on German with English replay from the ladder top;
  4. robustness (`hat.robustness`): the fair protocol (canonical cut, exact BPE scoring,
     bootstrap intervals over examples and perturbation seeds) at final quality and
     against the BPE checkpoint of matched clean bpb, and the old protocol for comparison;
  5. the loss decomposition by whitespace word (`tools/decompose.py`); samples;
and `report.md` (figures) and `results.json` in --out; `--publish DIR` copies them (and
the tables and figures of stages 4-5) into DIR, e.g. docs/experiment.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from hat.cli import UserError, entry_point  # noqa: E402
from study import report  # noqa: E402
from study.presets import PRESETS  # noqa: E402
from study.runner import Runner  # noqa: E402
from study.setup import prepare  # noqa: E402
from study.stages import VARIANT_FLOPS_CAP, Study  # noqa: E402


def _ladder_rows(ladder: dict, window_bytes: int, batch: int) -> list[dict]:
  rows = []
  for h, b in zip(ladder["hat"], ladder["bpe"]):
    rows.append({"steps": h.steps, "bytes_seen": h.steps * window_bytes * batch,
                 "hat": h.row(), "bpe": b.row(), "ratio": h.en_bpb / b.en_bpb,
                 "ratio_de": h.de_bpb / b.de_bpb})
  return rows


def _sweep_rows(sweep: dict) -> dict:
  out = {}
  for family, sw in sweep.items():
    runs = list(sw["lrs"].values()) + [t for n, t in sw["variants"].items()
                                       if t not in sw["lrs"].values()]
    out[family] = {"best_lr": sw["best_lr"], "best_variant": sw["best_variant"],
                   "lrs_tried": {f"{lr:g}": t.en_bpb for lr, t in sorted(sw["lrs"].items())},
                   "variants": {n: {"en_bpb": t.en_bpb, "flops": t.flops}
                                for n, t in sw["variants"].items()},
                   "runs": [t.row() for t in runs]}
  return out


def _read_json(path: pathlib.Path):
  import json
  return json.loads(path.read_text()) if path.exists() else None


def _publish(out: pathlib.Path, dest: pathlib.Path, out_arg: str) -> None:
  """Copies the report, results and the stage reports (no checkpoints) into `dest`.

  The study's own folder is machine-specific: in the published text files it reads
  `<out>` (the --out given), so the copy holds no absolute paths of this machine.
  """
  dest.mkdir(parents=True, exist_ok=True)
  files = [pathlib.Path(n) for n in ("report.md", "results.json", "ladder.png",
                                     "cpt_curves.png")]
  for sub in ("robustness", "decompose"):
    files += [p.relative_to(out) for p in sorted((out / sub).rglob("*"))
              if p.is_file() and p.suffix in (".md", ".json", ".png")]
  for rel in files:
    (dest / rel).parent.mkdir(parents=True, exist_ok=True)
    if rel.suffix == ".png":
      shutil.copy2(out / rel, dest / rel)
    else:
      text = (out / rel).read_text()
      for prefix in (str(out), out_arg):
        text = text.replace(prefix, "<out>")
      (dest / rel).write_text(text)


@entry_point
def main(argv: list[str] | None = None) -> int:
  """Runs every stage and writes the report."""
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="output directory for runs and the report")
  p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                 help="cpu: ~75 min on 2 cores; quick: minutes (smoke test); gpu: ~8 min "
                      "on one H100/H200")
  p.add_argument("--quick", action="store_true", help="same as --preset quick")
  p.add_argument("--en", default="../shared/data/corpus/en", help="English text (file/dir)")
  p.add_argument("--de", default="../shared/data/corpus/de", help="German text (file/dir)")
  p.add_argument("--budgets", default=None,
                 help="comma-separated pretraining steps of the ladder rungs, replacing the "
                      "preset's (e.g. 300,600,1200)")
  p.add_argument("--jobs", type=int, default=1,
                 help="runs of the learning-rate sweep and of the knobs trained at once "
                      "(default 1; more only helps with spare cores)")
  p.add_argument("--publish", default=None,
                 help="copy report.md, results.json, figures and stage reports here")
  args = p.parse_args(argv)
  preset = PRESETS["quick" if args.quick else args.preset]
  if args.budgets:
    try:
      budgets = tuple(sorted(int(b) for b in args.budgets.split(",")))
    except ValueError:
      raise UserError(f"--budgets: comma-separated step counts, got {args.budgets!r}") from None
    preset = dataclasses.replace(preset, budgets=budgets)
  out = pathlib.Path(args.out)
  out = out if out.is_absolute() else (ROOT / out)
  out.mkdir(parents=True, exist_ok=True)
  for path in (args.en, args.de):
    if not (ROOT / path).exists() and not pathlib.Path(path).exists():
      raise UserError(f"corpus not found: {path} (give --en/--de)")

  runner = Runner(out.resolve(), jobs=args.jobs)
  setup = prepare(runner, preset, args.en, args.de)
  print(f"setup: bytes/word {setup.bytes_per_word}, bytes/token {setup.bytes_per_token}; "
        f"HAT backbone {setup.matched} at {setup.match_ratio:.3f}x BPE FLOPs/byte",
        flush=True)
  study = Study(runner, preset, setup, args.en, args.de)
  sweep = study.sweep()
  ladder = study.ladder(sweep)
  top = {f: runs[-1] for f, runs in ladder.items()}
  cpt = study.cpt(top, preset.replay)
  matched = study.matched_bpe_checkpoint(top["hat"], top["bpe"])
  study.robustness(top["hat"], top["bpe"], matched)
  study.decompose(top["hat"], top["bpe"], args.en)
  samples = study.samples({"hat_en": top["hat"].workdir, "bpe_en": top["bpe"].workdir,
                           "hat_cpt": out / "runs" / "hat_cpt",
                           "bpe_cpt": out / "runs" / "bpe_cpt"})

  window, batch = int(preset.common["data.window_bytes"]), int(preset.common["data.batch_size"])
  command = " ".join(["python tools/experiment.py", *(argv if argv is not None
                                                      else sys.argv[1:])])
  results = {
      "preset": preset.name, "command": command, "machine": report.machine(),
      "en": args.en, "de": args.de, "window_bytes": window, "batch_size": batch,
      "vocabs": list(preset.vocabs), "setup": setup.to_json(),
      "ladder": _ladder_rows(ladder, window, batch), "sweep": _sweep_rows(sweep),
      "cpt": cpt, "matched": matched, "variant_flops_cap": VARIANT_FLOPS_CAP,
      "robustness": {n: _read_json(out / "robustness" / n / "robustness.json")
                     for n in ("final", "matched", "old_protocol")},
      "decomposition": _read_json(out / "decompose" / "decompose.json"),
      "samples": samples}
  path = report.write(out, results, command)
  print(f"report: {path}")
  if args.publish:
    _publish(out, pathlib.Path(args.publish), args.out)
    print(f"published to {args.publish}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
