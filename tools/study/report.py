"""The study's figures, `report.md` and `results.json`."""

from __future__ import annotations

import json
import math
import pathlib
import platform

from study import analysis


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def ladder_figure(ladder: list[dict], sweep: dict, path: pathlib.Path) -> None:
  """Validation bpb against training FLOPs for both families, the ratio at each budget."""
  plt = _plt()
  fig, (ax, ax_r) = plt.subplots(1, 2, figsize=(10.5, 3.9))
  for family, color in (("hat", "C0"), ("bpe", "C1")):
    xs = [b[family]["flops"] for b in ladder]
    ys = [b[family]["en_bpb"] for b in ladder]
    ax.plot(xs, ys, marker="o", color=color, label=f"{family.upper()} (chosen setting)")
    tried = [r for r in sweep[family]["runs"]]
    ax.scatter([r["flops"] for r in tried], [r["en_bpb"] for r in tried], color=color,
               marker="x", alpha=0.5, label=f"{family.upper()} sweep / variants")
  ax.set_xscale("log")
  ax.set_xlabel("training FLOPs (analytic)")
  ax.set_ylabel("English validation bpb")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  ratios = [b["ratio"] for b in ladder]
  ax_r.plot([b["hat"]["flops"] for b in ladder], ratios, marker="o", color="C2")
  for b, r in zip(ladder, ratios):
    ax_r.annotate(f"{r:.3f}", (b["hat"]["flops"], r), textcoords="offset points",
                  xytext=(0, 6), ha="center", fontsize=8)
  ax_r.axhline(1.0, color="k", lw=0.8)
  ax_r.axhline(1.05, color="k", lw=0.8, ls=":")
  ax_r.set_xscale("log")
  ax_r.set_xlabel("training FLOPs (HAT)")
  ax_r.set_ylabel("HAT / BPE bpb")
  ax_r.grid(alpha=0.3, which="both")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def cpt_figure(cpt: dict, path: pathlib.Path) -> None:
  """German and English bpb along continued pretraining, against its FLOPs."""
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for family in ("hat", "bpe"):
    res = cpt[family]
    for ax, key, title in ((axes[0], "de_val", "German bpb (continued pretraining)"),
                           (axes[1], "en_val", "English bpb (retention)")):
      pts = sorted((int(s), v) for s, v in res["curve"][key].items())
      ax.plot([s * res["flops_per_step"] for s, _ in pts], [v for _, v in pts], marker="o",
              label=family.upper())
      ax.set_title(title)
      ax.set_xlabel("continued-pretraining FLOPs")
      ax.set_ylabel("bits per byte")
      ax.grid(alpha=0.3)
  if cpt.get("target_de_bpb") is not None:
    axes[0].axhline(cpt["target_de_bpb"], color="k", lw=0.8, ls=":",
                    label="BPE's final German bpb")
  for ax in axes:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _fmt_flops(x) -> str:
  return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def _section(path: pathlib.Path, out: pathlib.Path, demote: int = 1) -> list[str]:
  """A markdown file of another tool inlined: first heading dropped, sub-headings demoted
  by `demote` levels, image links made relative to `out`."""
  if not path.exists():
    return [f"({path.relative_to(out)} missing)"]
  lines = path.read_text().splitlines()
  if lines and lines[0].startswith("# "):
    lines = lines[1:]
  prefix = path.parent.relative_to(out).as_posix()
  fixed = []
  for line in lines:
    if line.startswith("#"):
      line = "#" * demote + line
    if "![" in line:
      line = line.replace("](", f"]({prefix}/")
    fixed.append(line)
  return fixed


def write(out: pathlib.Path, results: dict, command: str) -> pathlib.Path:
  """Writes report.md (with figures) and results.json into `out`; returns report.md."""
  slim = dict(results, robustness={
      n: {k: v for k, v in r.items() if k not in ("per_example", "examples")}
      for n, r in (results.get("robustness") or {}).items() if r})
  (out / "results.json").write_text(json.dumps(slim, indent=2, default=str))
  ladder, sweep, cpt = results["ladder"], results["sweep"], results["cpt"]
  ladder_figure(ladder, sweep, out / "ladder.png")
  cpt_figure(cpt, out / "cpt_curves.png")
  s, m = results["setup"], results["machine"]
  ratios = [b["ratio"] for b in ladder]
  lines = [
      "# HAT vs BPE at small scale: a compute ladder, the loss by word, robustness at "
      "equal quality, continued pretraining", "",
      f"Produced by `{command}` on {m['machine']} ({m['cores']} cores, {m['backend']}, "
      f"jax {m['jax']}), {m['finished']}.", "",
      "## Setup", "",
      f"- English `{results['en']}`, German `{results['de']}` (the shared corpora); both "
      "families read the identical byte windows at every budget "
      f"({results['window_bytes']} bytes x batch {results['batch_size']}).",
      f"- Bytes per word (English): whitespace {s['bytes_per_word']['whitespace']:.2f}, "
      f"unicode {s['bytes_per_word']['unicode']:.2f}; bytes per BPE token: " + ", ".join(
          f"{v} pieces {s['bytes_per_token'][v]:.2f} (German {s['bytes_per_token_de'][v]:.2f})"
          for v in s["bytes_per_token"]) + ".",
      f"- HAT backbone compute-matched to the {results['vocabs'][0]}-piece BPE model: "
      f"{s['matched']['model.backbone.num_layers']} x {s['matched']['model.backbone.d_model']}"
      f" ({s['match_ratio']:.3f}x its analytic training FLOPs per byte); each HAT knob "
      "gets its own re-matched backbone: " + ", ".join(
          f"{k} {v['backbone']['model.backbone.num_layers']} x "
          f"{v['backbone']['model.backbone.d_model']} ({v['ratio']:.3f}x)"
          for k, v in s.get("matched_knobs", {}).items()) + ".",
      "- FLOPs are the analytic training FLOPs of the padded layouts (`hat.flops`), per "
      "step x steps; bpb is on the whole English validation split unless noted.", "",
      *summary(results), "",
      "## 1. The compute ladder", "",
      "![ladder](ladder.png)", "",
      "| budget (steps) | bytes seen | HAT FLOPs | HAT en bpb | BPE FLOPs | BPE en bpb | "
      "HAT / BPE bpb | HAT / BPE FLOPs | HAT / BPE de bpb |",
      "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for b in ladder:
    lines.append(f"| {b['steps']} | {b['bytes_seen']:,} | {b['hat']['flops']:.3g} | "
                 f"{b['hat']['en_bpb']:.4f} | {b['bpe']['flops']:.3g} | "
                 f"{b['bpe']['en_bpb']:.4f} | {b['ratio']:.3f} | "
                 f"{b['hat']['flops'] / b['bpe']['flops']:.3f} | {b['ratio_de']:.3f} |")
  lines += ["", f"The HAT/BPE bpb ratio {analysis.ratio_trend(ratios)} "
            f"({' -> '.join(f'{r:.3f}' for r in ratios)}); at the largest budget it is "
            f"{ratios[-1]:.3f}, {'within' if ratios[-1] <= 1.05 else 'outside'} the 1.05 "
            "aimed for. Both families see the same bytes at each budget; the FLOPs column "
            "shows how far apart their compute is (the x axis of the figure is FLOPs).", "",
            "### Tuning at the smallest budget", "",
            "Each family's learning rates are swept (one more when the best is at an edge); "
            "BPE's other vocabulary and each HAT knob get one run at the family's best rate, "
            "the knob's HAT with its backbone re-matched to the BPE FLOPs per byte. "
            "A variant is carried up the ladder when it beats the base setting and costs at "
            f"most {results['variant_flops_cap']:.2f}x its FLOPs per step, so the ladder "
            "stays compute-matched.", ""]
  for family in ("hat", "bpe"):
    sw = sweep[family]
    lines += [f"**{family.upper()}** learning rates (best {sw['best_lr']:g}) and variants "
              f"(chosen: `{sw['best_variant']}`):", "",
              "| run | lr | FLOPs | en bpb |", "|---|---:|---:|---:|"]
    for r in sw["runs"]:
      lines.append(f"| {r['name']} | {r['lr']:g} | {r['flops']:.3g} | {r['en_bpb']:.4f} |")
    lines.append("")
  lines += ["## 2. Where HAT loses: the loss by word", ""]
  lines += _section(out / "decompose" / "decompose.md", out)
  lines += ["", "## 3. Robustness", "",
            f"At final quality (HAT and BPE at the ladder top) and at matched clean quality "
            f"(HAT's final model against the BPE checkpoint at step "
            f"{results['matched']['step']}, in-training clean bpb "
            f"{results['matched']['curve_bpb']:.4f} against HAT's "
            f"{results['matched']['hat_curve_bpb']:.4f}; whole-split "
            f"{results['matched']['final_eval']['bpb']:.4f}). The fair protocol cuts "
            "examples canonically (the whitespace opens the continuation) and scores BPE "
            "exactly at the byte split; the old protocol cut at a word start and scored BPE "
            "with the lm-eval convention.", ""]
  for name, title in (("final", "Fair protocol, final models"),
                      ("matched", "Fair protocol, matched clean quality"),
                      ("old_protocol", "Old protocol (word-start cut), final models")):
    lines += [f"### {title}", ""]
    lines += _section(out / "robustness" / name / "robustness.md", out, demote=2) + [""]
  lines += ["## 4. Continued pretraining on German", "",
            "![continued pretraining](cpt_curves.png)", "",
            "| model | en bpb before | en bpb after | de bpb before | de bpb after | "
            "CPT FLOPs | FLOPs to reach BPE's final de bpb |",
            "|---|---:|---:|---:|---:|---:|---:|"]
  for family in ("hat", "bpe"):
    c = cpt[family]
    lines.append(
        f"| {family.upper()} | {c['before']['en_val']['bpb']:.4f} | "
        f"{c['after']['en_val']['bpb']:.4f} | {c['before']['de_val']['bpb']:.4f} | "
        f"{c['after']['de_val']['bpb']:.4f} | {c['steps'] * c['flops_per_step']:.3g} | "
        f"{_fmt_flops(c['flops_to_bpe_final_de']) if c['flops_to_bpe_final_de'] else 'not reached'} |")
  lines += ["", f"(The target is BPE's final German bpb on the in-training eval windows, "
            f"{_fmt_flops(cpt.get('target_de_bpb'))}; reaching it is interpolated on each "
            "model's eval curve.)", "", "## Samples", ""]
  for name, text in results["samples"].items():
    lines += [f"**{name}**", "", "```", text.strip()[-600:], "```", ""]
  path = out / "report.md"
  path.write_text("\n".join(lines) + "\n")
  return path


def summary(results: dict) -> list[str]:
  """The headline findings, computed from the results (no hand-written numbers)."""
  ladder, cpt = results["ladder"], results["cpt"]
  ratios = [b["ratio"] for b in ladder]
  lines = ["## Summary", "",
           f"- **Ladder** ({ladder[0]['steps']} to {ladder[-1]['steps']} steps, "
           f"{ladder[-1]['hat']['flops'] / ladder[0]['hat']['flops']:.1f}x the FLOPs): HAT / "
           f"BPE English bpb {' -> '.join(f'{r:.3f}' for r in ratios)} "
           f"({analysis.ratio_trend(ratios)})."]
  dec = results.get("decomposition")
  if dec:
    # Buckets of at least 1% of the bytes; `worst` holds the most gap beyond its bytes.
    groups = {g: [r for r in dec["groups"][g] if r["byte_share"] >= 0.01]
              for g in ("frequency", "length")}
    fr, ln = (max(groups[g], key=lambda r: r["gap_share"] - r["byte_share"])
              for g in ("frequency", "length"))
    freq_ratios = [r["ratio"] for r in groups["frequency"]]
    names = list(dec["totals"])
    parts = {n: dec["parts"][n]["shares"] for n in names}
    lines.append(
        f"- **Where the gap sits**: spread over every bucket (ratios "
        f"{min(freq_ratios):.2f}–{max(freq_ratios):.2f}"
        f" by frequency); most in excess of its bytes in `{fr['bucket']}` words "
        f"({fr['gap_share']:.0%} of the gap for {fr['byte_share']:.0%} of the bytes, ratio "
        f"{fr['ratio']:.3f}) and words of `{ln['bucket']}` bytes ({ln['gap_share']:.0%} for "
        f"{ln['byte_share']:.0%}, ratio {ln['ratio']:.3f}). {names[0]} pays "
        f"{parts[names[0]]['first']:.0%} of its NLL at a word's first byte, "
        f"{parts[names[0]]['later']:.0%} at later bytes and {parts[names[0]]['word_end']:.1%} "
        f"at `[W]` ({names[1]}: {parts[names[1]]['first']:.0%} at a word's first token).")
  for name, label in (("final", "final models"), ("matched", "matched clean quality")):
    rob = (results.get("robustness") or {}).get(name)
    if not rob:
      continue
    comp = next(iter(rob["comparisons"].values()))
    cells = []
    for kind, by_rate in comp.items():
      rate = max(by_rate, key=float)
      c = by_rate[rate]
      lo, hi = c["degradation_ci95"]
      cells.append(f"{kind} {100 * c['degradation']:+.2f} pp [{100 * lo:+.2f}, {100 * hi:+.2f}]"
                   f"{'' if c['degradation_excludes_zero'] else ' (n.s.)'}")
    lines.append(f"- **Robustness, {label}** (HAT minus BPE degradation of continuation "
                 f"bpb at {float(rate):.0%} perturbed characters, 95% bootstrap interval; "
                 "negative = HAT degrades less): " + "; ".join(cells) + ".")
  reach = {f: cpt[f]["flops_to_bpe_final_de"] for f in ("hat", "bpe")}
  lines.append(
      "- **Continued pretraining on German**: HAT " + (
          f"reaches BPE's final German bpb at {reach['hat'] / reach['bpe']:.2f}x BPE's FLOPs"
          if reach["hat"] else "does not reach BPE's final German bpb") +
      f"; English bpb {cpt['hat']['before']['en_val']['bpb']:.3f} -> "
      f"{cpt['hat']['after']['en_val']['bpb']:.3f} (HAT) and "
      f"{cpt['bpe']['before']['en_val']['bpb']:.3f} -> "
      f"{cpt['bpe']['after']['en_val']['bpb']:.3f} (BPE).")
  return lines


def machine() -> dict:
  """Where the study ran."""
  import datetime
  import os

  import jax
  dev = jax.devices()[0]
  return {"machine": f"{platform.machine()} {dev.device_kind}", "cores": os.cpu_count(),
          "backend": jax.default_backend(), "jax": jax.__version__,
          "finished": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
