"""Compares HAT and BPE training FLOPs per byte and proposes a compute-matched HAT.

  python tools/compute_match.py --bpe configs/bpe_1b.py --hat configs/hat_1b.py

prints both models' parameters and FLOPs per byte by module, their ratio, and the HAT
backbone (depth, width) whose FLOPs per byte match the BPE model's, keeping the HAT
config's encoder and decoder.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from hat import flops, params  # noqa: E402
from hat.cli import entry_point  # noqa: E402
from hat.config import from_config_dict, load_config_file  # noqa: E402
from hat.family import family_of  # noqa: E402

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _describe(name: str, cfg, vocab_size: int | None, bpw: float, bpt: float) -> float:
  """Prints one model's parameter groups and FLOPs/byte per module; returns the total."""
  groups = params.paper_groups(cfg.model, vocab_size)
  fpb = flops.flops_per_byte(cfg, bpw, bpt, vocab_size)
  print(f"{name}: family={family_of(cfg).name}  parameters: "
        + ", ".join(f"{k} {params.format_count(v)}" for k, v in groups.items()))
  for k, v in fpb.items():
    print(f"  {k:>13s}  {v / 1e9:9.4f} GFLOP/byte")
  return fpb["total"]


@entry_point
def main(argv: list[str] | None = None) -> int:
  """CLI entry point."""
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--bpe", default=str(_ROOT / "configs/bpe_1b.py"), help="BPE config file")
  ap.add_argument("--hat", default=str(_ROOT / "configs/hat_1b.py"),
                  help="HAT config file: compared, and its encoder/decoder kept when matching")
  ap.add_argument("--bytes_per_word", type=float, default=5.97, help="corpus bytes per word")
  ap.add_argument("--bytes_per_token", type=float, default=4.12,
                  help="corpus bytes per BPE token")
  ap.add_argument("--vocab_size", type=int, default=0,
                  help="BPE vocabulary when the config takes it from the tokenizer")
  ap.add_argument("--aspect", type=float, default=128.0,
                  help="preferred backbone d_model / num_layers when matching")
  args = ap.parse_args(argv)

  bpe = from_config_dict(load_config_file(args.bpe))
  hat = from_config_dict(load_config_file(args.hat))
  vocab = args.vocab_size or None
  bpw, bpt = args.bytes_per_word, args.bytes_per_token
  print(f"corpus: {bpw} bytes/word, {bpt} bytes/token; FLOPs = training (3x forward), "
        f"real = perfectly packed {bpe.data.window_bytes}-byte windows\n")
  bpe_total = _describe(pathlib.Path(args.bpe).stem, bpe, vocab, bpw, bpt)
  hat_total = _describe(pathlib.Path(args.hat).stem, hat, None, bpw, bpt)
  print(f"\nHAT / BPE real FLOPs per byte: {hat_total / bpe_total:.4f}")

  m = flops.match_hat_to_bpe(bpe, bpw, bpt, hat, vocab_size=vocab, aspect=args.aspect)
  bb = m.backbone
  matched = dataclasses.replace(hat.model, backbone=bb)
  print(f"\nproposed HAT backbone for {pathlib.Path(args.bpe).stem}: num_layers={bb.num_layers} "
        f"d_model={bb.d_model} num_heads={bb.num_heads} mlp_dim={bb.mlp_dim} "
        f"({params.format_count(params.count_params(matched)['backbone'])} backbone params)")
  print(f"  {m.hat_flops_per_byte / 1e9:.4f} vs {m.bpe_flops_per_byte / 1e9:.4f} GFLOP/byte, "
        f"ratio {m.ratio:.4f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
