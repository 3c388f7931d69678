"""Files of a loss decomposition: decompose.json, decompose.md and decompose.png.

Written through `hat.storage`, so the output folder may be local or gs://.
"""

from __future__ import annotations

import json

from hat import storage
from hat.eval.decompose import PARTS, WORD_RULE

JSON_FILE, MD_FILE, PNG_FILE = "decompose.json", "decompose.md", "decompose.png"


def _num(x, fmt: str) -> str:
  return "-" if x is None else format(x, fmt)


def _meta_value(v) -> str:
  if isinstance(v, dict):
    return ", ".join(f"{k}={x}" for k, x in v.items())
  return f"{v:,}" if isinstance(v, int) else str(v)


def markdown(result: dict, meta: dict) -> str:
  """The decomposition as markdown tables."""
  a, b = result["runs"]
  tot = result["totals"]
  lines = [f"# Where {a} loses bits against {b}", "",
           *(f"- {k}: {_meta_value(v)}" for k, v in meta.items()),
           f"- scored: {result['bytes']:,} bytes, {result['words']:,} words, "
           f"{result['documents']:,} documents",
           f"- {WORD_RULE}", "",
           "| run | bpb | bits | targets |", "|---|---:|---:|---:|"]
  for r in (a, b):
    lines.append(f"| {r} | {tot[r]['bpb']:.4f} | {tot[r]['bits']:,.0f} | "
                 f"{tot[r]['targets']:,} |")
  lines += ["", f"Gap ({a} - {b}): {result['gap_bits']:,.0f} bits, "
            f"{result['gap_bits'] / result['bytes']:.4f} bpb. Per bucket: bpb of each run "
            f"(bits / bytes of the bucket's words), ratio {a}/{b}, the bucket's share of the "
            "bytes and of the gap.", ""]
  for group, rows in result["groups"].items():
    lines += [f"## {group}", "",
              f"| bucket | words | bytes share | {a} bpb | {b} bpb | ratio | gap share |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
      if not row["words"]:
        continue
      lines.append(f"| {row['bucket']} | {row['words']:,} | {row['byte_share']:.1%} | "
                   f"{_num(row['bpb'][a], '.3f')} | {_num(row['bpb'][b], '.3f')} | "
                   f"{_num(row['ratio'], '.3f')} | {_num(row['gap_share'], '.1%')} |")
    lines.append("")
  lines += ["## Where in a word", "",
            "Share of each run's NLL paid at a word's first byte / token, at its later "
            "bytes / tokens, at word ends and at document ends.", "",
            f"| part | {a} | {a} share | {b} | {b} share |", "|---|---|---:|---|---:|"]
  pa, pb = result["parts"][a], result["parts"][b]
  for p in PARTS:
    lines.append(f"| {p} | {pa['labels'][p]} | {pa['shares'][p]:.1%} | {pb['labels'][p]} | "
                 f"{pb['shares'][p]:.1%} |")
  lines += [""] + _parts_by_bucket(result, ("frequency", "length"))
  lines += ["", "## Words that add most to the gap", "",
            f"| word | count | {a} bits | {b} bits | gap bits | gap share |",
            "|---|---:|---:|---:|---:|---:|"]
  for w in result["top_gap_words"]:
    share = w["gap_bits"] / result["gap_bits"] if result["gap_bits"] else None
    word = w["word"].replace("|", "\\|").replace("`", "'")
    lines.append(f"| `{word}` | {w['count']:,} | {w['bits'][a]:,.0f} | {w['bits'][b]:,.0f} | "
                 f"{w['gap_bits']:,.0f} | {_num(share, '.1%')} |")
  lines += ["", f"![decomposition]({PNG_FILE})", ""]
  return "\n".join(lines)


def _parts_by_bucket(result: dict, groups) -> list[str]:
  """Tables: each bucket's bpb split into first / later / end parts, per run."""
  a, b = result["runs"]
  lines = ["Per bucket, each run's bpb split by where in the word it is paid (first byte "
           "or token, later ones, word and document ends); the parts add up to the "
           "bucket's bpb.", ""]
  for group in groups:
    lines += [f"| {group} | {a} first | {a} later | {a} ends | {b} first | {b} later | "
              f"{b} ends |", "|---|" + "---:|" * 6]
    for row in result["groups"][group]:
      if not row.get("part_bits") or not row["bytes"]:
        continue
      cells = []
      for r in (a, b):
        pb = row["part_bits"][r]
        cells += [pb["first"], pb["later"], pb["word_end"] + pb["doc_end"]]
      lines.append(f"| {row['bucket']} | " + " | ".join(f"{c / row['bytes']:.3f}"
                                                         for c in cells) + " |")
    lines.append("")
  return lines


def plot(result: dict, path: storage.Path) -> None:
  """Per-bucket bpb of both runs side by side, and each bucket's share of the gap."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  a, b = result["runs"]
  rows = [(g, r) for g, rs in result["groups"].items() for r in rs if r["words"]]
  xs = list(range(len(rows)))
  labels = [r["bucket"] for _, r in rows]
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8.0, 0.45 * len(rows)), 7),
                                    sharex=True)
  w = 0.4
  for off, run in ((-w / 2, a), (w / 2, b)):
    top.bar([x + off for x in xs], [r["bpb"][run] or 0.0 for _, r in rows], w, label=run)
  top.axhline(result["totals"][a]["bpb"], color="C0", ls=":", lw=1)
  top.axhline(result["totals"][b]["bpb"], color="C1", ls=":", lw=1)
  top.set_ylabel("bits per byte")
  top.set_title("bpb per word bucket (dotted: overall)")
  top.legend()
  shares = [100 * (r["gap_share"] or 0.0) for _, r in rows]
  # Next to each bucket's share of the bytes: a bucket whose gap share exceeds its byte
  # share is where the first run loses more than its average.
  byte_shares = [100 * r["byte_share"] for _, r in rows]
  bottom.bar([x - w / 2 for x in xs], byte_shares, w, color="lightgrey")
  bottom.bar([x + w / 2 for x in xs], shares, w,
             color=["C3" if s >= 0 else "C2" for s in shares])
  bottom.axhline(0, color="k", lw=0.8)
  bottom.set_ylim(top=1.15 * max(byte_shares + shares))  # room for the group names
  bottom.set_ylabel("share (%)")
  bottom.set_title(f"share of the bytes (grey) and of the gap {a} - {b} (red; green: "
                   f"{a} better)")
  bottom.set_xticks(xs)
  bottom.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
  # Group boundaries and names, so the buckets of one grouping read together.
  starts = [x for x, (g, _) in enumerate(rows) if x == 0 or rows[x - 1][0] != g]
  for ax in (top, bottom):
    ax.grid(axis="y", alpha=0.3)
    for x in starts[1:]:
      ax.axvline(x - 0.5, color="grey", lw=0.8)
  for x in starts:
    bottom.annotate(rows[x][0], (x - 0.4, 1.0), xycoords=("data", "axes fraction"),
                    va="top", fontsize=8, color="grey")
  fig.tight_layout()
  with path.open("wb") as f:  # a file object: matplotlib cannot open a gs:// URL
    fig.savefig(f, format="png", dpi=120)
  plt.close(fig)


def write_report(result: dict, out_dir: storage.PathLike, meta: dict) -> storage.Path:
  """Writes decompose.json, decompose.md and decompose.png; returns the markdown path."""
  out_dir = storage.path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / JSON_FILE).write_text(json.dumps({"meta": meta, **result}, indent=2) + "\n")
  md = out_dir / MD_FILE
  md.write_text(markdown(result, meta))
  plot(result, out_dir / PNG_FILE)
  return md
