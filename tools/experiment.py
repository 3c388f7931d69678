"""The paper's study end to end at small scale, with the project's own commands.

    python tools/experiment.py --out runs/experiment              # ~1 hour on a 2-core CPU
    python tools/experiment.py --out runs/experiment_quick --quick  # a few minutes

Stages (each resumes or is skipped when its outputs exist, so an interrupted study can
simply be restarted):
  1. a BPE tokenizer trained on the English corpus;
  2. HAT and a compute-matched BPE baseline pretrained on English on the identical byte
     windows (same window size, batch and steps, so the same bytes) with equal FLOPs per
     byte (the HAT backbone is sized by `hat.flops.match_hat_to_bpe`);
  3. both continued on German with an English replay share;
  4. bpb per language before and after (`python -m hat.evaluate`);
  5. the robustness suite on the English models (`python -m hat.robustness`);
  6. a generated sample from each model;
and a report (`report.md` with PNG figures) in the output directory.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hat import config as config_lib  # noqa: E402
from hat import flops  # noqa: E402
from hat.cli import UserError, entry_point  # noqa: E402

SCALES = {
    # name: (pretrain steps, continued-pretraining steps, robustness examples, final eval
    # batches; None = the whole validation split, so both models score the same bytes)
    "full": (1500, 600, 150, None),
    "quick": (60, 30, 12, 4),
}


def _run(cmd: list[str], log: pathlib.Path) -> None:
  """Runs a project command, echoing it, with its output teed into `log`."""
  print("+", " ".join(cmd), flush=True)
  log.parent.mkdir(parents=True, exist_ok=True)
  with log.open("a") as f:
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    f.write(proc.stdout)
  if proc.returncode:
    print(proc.stdout[-3000:])
    raise SystemExit(f"command failed ({proc.returncode}); log: {log}")


def _overrides(d: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in d.items()]


def matched_hat_backbone(bpe_cfg, hat_cfg, bpw: float, bpt: float) -> dict:
  """HAT backbone overrides with the BPE model's FLOPs per byte (small widths)."""
  m = flops.match_hat_to_bpe(bpe_cfg, bpw, bpt, hat_cfg, layers=range(2, 7), head_dim=32,
                             aspect=64.0, tolerance=0.1)
  bb = m.backbone
  return {"model.backbone.num_layers": bb.num_layers, "model.backbone.d_model": bb.d_model,
          "model.backbone.num_heads": bb.num_heads,
          "model.backbone.num_kv_heads": bb.num_kv_heads,
          "model.backbone.head_dim": bb.head_dim, "model.backbone.mlp_dim": bb.mlp_dim,
          "_ratio": m.ratio}


def _metrics(workdir: pathlib.Path) -> list[dict]:
  path = workdir / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _eval_curve(workdir: pathlib.Path, key: str) -> list[tuple[int, float]]:
  return [(m["step"], m[key]) for m in _metrics(workdir) if key in m]


def _plot_report(out: pathlib.Path, runs: dict, flops_per_step: dict, evals: dict,
                 samples: dict, matched: dict, args) -> pathlib.Path:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for kind in ("hat", "bpe"):
    for ax, key, title in ((axes[0], "eval/de_val/bpb", "German bpb (continued pretraining)"),
                           (axes[1], "eval/en_val/bpb", "English bpb (retention)")):
      start = evals[f"{kind}_en"][key.split("/")[1]]["bpb"]
      curve = [(0, start)] + _eval_curve(runs[f"{kind}_de"], key)
      xs = [s * flops_per_step[f"{kind}_de"] for s, _ in curve]
      ax.plot(xs, [v for _, v in curve], marker="o", label=kind.upper())
      ax.set_title(title)
      ax.set_xlabel("continued-pretraining FLOPs")
      ax.set_ylabel("bits per byte")
      ax.grid(alpha=0.3)
      ax.legend()
  fig.tight_layout()
  fig.savefig(out / "cpt_curves.png", dpi=120)
  plt.close(fig)

  lines = ["# HAT vs BPE: pretraining, continued pretraining, robustness", "",
           f"Produced by `python tools/experiment.py --out {args.out}"
           f"{' --quick' if args.quick else ''}` on the shared corpora "
           f"(English `{args.en}`, German `{args.de}`).", "",
           f"- pretraining: {args.pretrain_steps} steps on English; continued pretraining: "
           f"{args.cpt_steps} steps on German + {args.replay:.0%} English replay",
           f"- BPE tokenizer: {args.vocab} pieces, trained on the English corpus",
           f"- compute matching: HAT backbone {matched['model.backbone.num_layers']} layers x "
           f"{matched['model.backbone.d_model']} for {matched['_ratio']:.3f}x the BPE FLOPs "
           "per byte (analytic, at the corpus's measured bytes/word and bytes/token)",
           "- training FLOPs per step (analytic, padded shapes): " + ", ".join(
               f"{k} {v:.3g}" for k, v in flops_per_step.items()), "",
           "## bits per byte (validation)", "",
           "| model | stage | en_val bpb | de_val bpb | word acc (en) | bytes scored (en / de) |",
           "|---|---|---:|---:|---:|---:|"]
  for name, res in evals.items():
    kind, stage = name.split("_")
    wa = res["en_val"].get("word_acc")
    lines.append(f"| {kind.upper()} | {'after German' if stage == 'de' else 'English only'} | "
                 f"{res['en_val']['bpb']:.4f} | {res['de_val']['bpb']:.4f} | "
                 f"{'-' if wa is None else f'{wa:.4f}'} | "
                 f"{int(res['en_val']['bytes']):,} / {int(res['de_val']['bytes']):,} |")
  lines += ["", "![continued pretraining](cpt_curves.png)", "",
            "## Robustness (English models)", "",
            "See [robustness/robustness.md](robustness/robustness.md).", "",
            "![robustness](robustness/robustness.png)", "", "## Samples", ""]
  for name, text in samples.items():
    lines += [f"**{name}**", "", "```", text.strip(), "```", ""]
  path = out / "report.md"
  path.write_text("\n".join(lines))
  return path


@entry_point
def main(argv: list[str] | None = None) -> int:
  """Runs every stage and writes the report."""
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="output directory for runs and the report")
  p.add_argument("--en", default="../shared/data/corpus/en", help="English text (file/dir)")
  p.add_argument("--de", default="../shared/data/corpus/de", help="German text (file/dir)")
  p.add_argument("--quick", action="store_true", help="a few minutes instead of ~1 hour")
  p.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary size")
  p.add_argument("--replay", type=float, default=0.1, help="English share during German CPT")
  args = p.parse_args(argv)
  scale = SCALES["quick" if args.quick else "full"]
  args.pretrain_steps, args.cpt_steps, n_examples, eval_batches = scale
  out = (ROOT / args.out).resolve() if not pathlib.Path(args.out).is_absolute() \
      else pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  logs = out / "logs"
  py = sys.executable
  for path in (args.en, args.de):
    if not (ROOT / path).exists() and not pathlib.Path(path).exists():
      raise UserError(f"corpus not found: {path}")

  # 1. Tokenizer.
  tok = out / "bpe.model"
  if not tok.exists():
    _run([py, "tools/train_tokenizer.py", args.en, "--vocab-size", str(args.vocab),
          "--out", str(tok), "--max-bytes", str(20_000_000)], logs / "tokenizer.log")

  en, de = f"text:{args.en}", f"text:{args.de}"
  evals_spec = f"en_val={en},de_val={de}"
  common = {"data.eval": evals_spec, "eval_every":
            max(10, args.pretrain_steps // 6), "eval_batches": (eval_batches or 40) // 2 or 1,
            "ckpt_every": max(10, args.pretrain_steps // 3)}
  bpe_over = {**common, "data.tokenizer": str(tok), "data.max_tokens": 256}
  # Compute matching at the corpus's own bytes/word and bytes/token.
  from hat.text.bpe import BPETokenizer
  from hat.text.splitter import Splitter
  sample = b"".join(p.read_bytes()[:200_000]
                    for p in sorted((ROOT / args.en).rglob("*.txt"))[:10]) \
      if (ROOT / args.en).is_dir() else (ROOT / args.en).read_bytes()[:2_000_000]
  bpw = len(sample) / len(Splitter("whitespace", 31).split(sample))
  tokenizer = BPETokenizer.load(tok)
  bpt = len(sample) / len(tokenizer.encode(sample))
  bpe_cfg = config_lib.resolve("configs/tiny_bpe.py", _overrides(
      {**bpe_over, "model.vocab_size": tokenizer.vocab_size}))
  hat_cfg = config_lib.resolve("configs/tiny_hat.py", _overrides(common))
  matched = matched_hat_backbone(bpe_cfg, hat_cfg, bpw, bpt)
  hat_over = {**common, **{k: v for k, v in matched.items() if not k.startswith("_")}}
  hat_cfg = config_lib.resolve("configs/tiny_hat.py", _overrides(hat_over))
  print(f"bytes/word {bpw:.2f}, bytes/token {bpt:.2f}; HAT backbone matched to BPE: "
        f"{matched['model.backbone.num_layers']}x{matched['model.backbone.d_model']} "
        f"(FLOPs/byte ratio {matched['_ratio']:.3f})", flush=True)

  runs = {n: out / n for n in ("hat_en", "bpe_en", "hat_de", "bpe_de")}
  cfgs = {"hat": ("configs/tiny_hat.py", hat_over), "bpe": ("configs/tiny_bpe.py", bpe_over)}
  mix = f"{de}={1 - args.replay:g},{en}={args.replay:g}"
  for kind, (cfg_file, over) in cfgs.items():
    # 2. Pretraining on English.
    _run([py, "-m", "hat.train", "--no-progress", "--config", cfg_file, "--workdir",
          str(runs[f"{kind}_en"])] + _overrides({**over, "data.train": en,
                                                 "steps": args.pretrain_steps}),
         logs / f"{kind}_en.log")
    # 3. Continued pretraining on German with English replay, its own schedule.
    _run([py, "-m", "hat.train", "--no-progress", "--config", cfg_file, "--workdir",
          str(runs[f"{kind}_de"])] + _overrides({
              **over, "data.train": mix, "steps": args.cpt_steps,
              "init_from": str(runs[f"{kind}_en"]), "optim.warmup_steps":
              max(1, args.cpt_steps // 10),
              "eval_every": max(5, args.cpt_steps // 6)}), logs / f"{kind}_de.log")

  # 4. bpb per language, before and after.
  evals = {}
  for name, wd in runs.items():
    res = wd / "eval_final.json"
    if not res.exists():
      cap = [] if eval_batches is None else ["--max-batches", str(eval_batches)]
      _run([py, "-m", "hat.evaluate", "--workdir", str(wd), "--eval", "en_val", "--eval",
            "de_val", *cap, "--out", str(res)], logs / f"eval_{name}.log")
    evals[name] = json.loads(res.read_text())["results"]

  # 5. Robustness on the English models.
  rob = out / "robustness"
  if not (rob / "robustness.json").exists():
    _run([py, "-m", "hat.robustness", "--run", f"HAT={runs['hat_en']}", "--run",
          f"BPE={runs['bpe_en']}", "--eval", "en_val", "--examples", str(n_examples),
          "--out", str(rob)], logs / "robustness.log")

  # 6. Samples.
  samples = {}
  for name, wd in runs.items():
    prompt = "Der alte Mann sagte, dass " if name.endswith("_de") else "The old man said that "
    proc = subprocess.run([py, "-m", "hat.generate", "--workdir", str(wd), "--prompt", prompt,
                           "--max-new-bytes", "160", "--seed", "0"], cwd=ROOT,
                          capture_output=True, text=True)
    samples[name] = proc.stdout if proc.returncode == 0 else f"(failed: {proc.stderr[-300:]})"

  flops_per_step = {
      "hat_de": flops.train_flops_per_step(hat_cfg),
      "bpe_de": flops.train_flops_per_step(bpe_cfg, tokenizer.vocab_size)}
  report = _plot_report(out, runs, flops_per_step, evals, samples, matched, args)
  print(f"report: {report}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
