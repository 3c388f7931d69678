"""Analytic vs compiled FLOPs, module by module, for every model family.

    python tools/flops_check.py                      # tiny configs and 1B widths
    python tools/flops_check.py --only tiny --json runs/flops_check.json --md runs/flops.md

Each module (byte encoder, W_E, backbone, W_D, byte decoder, head and loss, gate) is
compiled on its own, loop-free (`scan_layers=False`), forward and backward
(`jax.vjp` of its output with respect to every parameter and its float inputs), for one
sequence, and XLA's `cost_analysis()["flops"]` is set against `hat.flops`: the model
count (MFU's numerator) and the hardware count (masked attention squares and remat
recompute added; HFU's numerator). "whole" is the trainer's loss, forward and backward,
compiled in one piece; "glue" is whole minus the modules (gathers, masks, embeddings).
docs/scale.md explains every row that differs by more than 3%.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from hat import flops  # noqa: E402
from hat.config import TrainConfig, resolve  # noqa: E402
from hat.family import family_of  # noqa: E402
from hat.models import gates, loss_and_metrics  # noqa: E402
from hat.models.layers import embed_lookup  # noqa: E402
from hat.models.losses import metrics_from_logits  # noqa: E402
from hat.config import merge_capacity  # noqa: E402
from hat.models.merge_hat import chunk_boundaries  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_VOCAB = 4096  # tiny BPE: the vocabulary comes from a tokenizer; assume this size


# name -> (config file, overrides). "1b" rows: paper widths, 2 backbone layers, full
# byte stacks, one 16,384-byte window.
CASES = {
    "tiny_hat": ("tiny_hat", []),
    "tiny_hat_delete": ("tiny_hat_delete", []),
    "tiny_hat_merge": ("tiny_hat_merge", []),
    "tiny_bpe": ("tiny_bpe", [f"model.vocab_size={TINY_VOCAB}"]),
    "tiny_byte": ("tiny_byte", []),
    "1b_hat": ("hat_1b", ["model.backbone.num_layers=2"]),
    "1b_hat_delete": ("hat_1b", ["model.backbone.num_layers=2", "model.gate.kind=delete",
                                 "model.gate.delete.layer=1"]),
    "1b_hat_merge": ("hat_1b", ["model.backbone.num_layers=2", "model.gate.kind=merge",
                                "model.gate.controller=ratio", "data.max_tokens=16896",
                                "model.gate.merge.target_bytes_per_chunk=5.97"]),
    "1b_bpe": ("bpe_1b", ["model.backbone.num_layers=2"]),
    "1b_byte": ("bpe_1b", ["model.backbone.num_layers=2", "model.kind=byte",
                           "model.vocab_size=0", "data.max_tokens=16896"]),
}


def case_config(name: str, extra: list[str] = ()) -> TrainConfig:
  """The config of one case, loop-free, one sequence."""
  path, overrides = CASES[name]
  return resolve(str(ROOT / f"configs/{path}.py"),
                 [*overrides, *extra, "model.scan_layers=false", "data.batch_size=1"])


def _cost(fn: Callable, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) if cost else 0.0


def _train_cost(model, fn: Callable, xs: tuple, forward: bool = True) -> tuple[float, float]:
  """(forward, forward + backward) compiled FLOPs of fn(model, *xs); forward 0 if not asked."""
  graphdef, state = nnx.split(model)

  def fwd(state, xs):
    return fn(nnx.merge(graphdef, state), *xs)

  def train(state, xs, ct):
    out, vjp = jax.vjp(fwd, state, xs)
    return out, vjp(ct.astype(out.dtype))  # the output too: else its last op is dead code

  # A traced cotangent: with a constant one XLA folds weight-gradient dots into reductions.
  out = jax.eval_shape(fwd, state, xs)
  ct = jnp.zeros(out.shape, jnp.float32)
  return _cost(fwd, state, xs) if forward else 0.0, _cost(train, state, xs, ct)


def _batch(cfg: TrainConfig) -> dict:
  shapes = family_of(cfg).batch_shapes(cfg, cfg.data.batch_size)
  return {k: jnp.zeros(s, d) for k, (s, d) in shapes.items()}


def _loss(logits, batch):
  m = metrics_from_logits(logits, batch)
  return m["nll_sum"] / jnp.maximum(m["num_targets"], 1.0)


def hat_modules(cfg: TrainConfig, b: dict) -> dict[str, tuple[Callable, tuple]]:
  """{module: (fn(model, *xs), xs)} of a word-level HAT (plain or delete-gated)."""
  m = cfg.model
  cd = jnp.dtype(m.compute_dtype)
  bsz, w, s = b["unit_pos_BxW"].shape + b["slot_ids_BxS"].shape[1:]
  enc_d, bb_d, dec_d = m.encoder.d_model, m.backbone.d_model, m.decoder.d_model
  seg, pos = b["unit_segment_BxW"], b["unit_pos_BxW"]

  def enc(model):
    x = embed_lookup(model.enc_embed[...], b["slot_ids_BxS"], cd)
    return model._run_rows(model.encoder, x, b["slot_unit_BxS"], b["slot_pos_BxS"])

  def w_e(model, h):
    e = jnp.take_along_axis(h, b["unit_slot_BxW"][:, :, None], axis=1)
    return jnp.einsum("bwd,de->bwe", e.astype(cd), model.w_enc[...].astype(cd))

  def w_d(model, h):
    return jnp.einsum("bwe,ed->bwd", h.astype(cd), model.w_dec[...].astype(cd))

  def dec(model, p):
    return model._run_rows(model.decoder, model.decoder_inputs(p, b, None),
                           b["slot_unit_BxS"], b["slot_pos_BxS"])

  def head(model, h):
    logits = jnp.einsum("bsd,dv->bsv", h.astype(cd), model.head[...].astype(cd),
                        preferred_element_type=jnp.float32)
    return _loss(logits, b)

  words = jnp.zeros((bsz, w, bb_d), cd)
  out = {"encoder": (enc, ()), "w_e": (w_e, (jnp.zeros((bsz, s, enc_d), cd),))}
  if family_of(cfg).gate == "delete":
    out["backbone_lower"] = (lambda model, x: model.backbone_lower(
        x, segment_BxL=seg, pos_BxL=pos), (words,))
    out["gate"] = (lambda model, h: jnp.where(seg > 0, model.gate(h), 0.0), (words,))
    out["backbone_upper"] = (lambda model, x, g: model.backbone_upper(
        x, segment_BxL=seg, pos_BxL=pos, key_bias_BxL=g),
        (words, jnp.zeros((bsz, w), jnp.float32)))
  else:
    out["backbone"] = (lambda model, x: model.backbone(x, segment_BxL=seg, pos_BxL=pos),
                       (words,))
  out["w_d"] = (w_d, (words,))
  out["decoder"] = (dec, (jnp.zeros((bsz, w, dec_d), cd),))
  out["head"] = (head, (jnp.zeros((bsz, s, dec_d), cd),))
  return out


def merge_modules(cfg: TrainConfig, b: dict) -> dict[str, tuple[Callable, tuple]]:
  """{module: (fn(model, *xs), xs)} of the merge-gated HAT (byte stream, learned chunks)."""
  m = cfg.model
  cd = jnp.dtype(m.compute_dtype)
  ids, seg, pos = b["tokens_BxT"], b["segment_BxT"], b["pos_BxT"]
  bsz, t = ids.shape
  cap = merge_capacity(m.gate.merge, t)
  index = jnp.zeros((bsz, cap), jnp.int32)
  enc_d, bb_d, dec_d = m.encoder.d_model, m.backbone.d_model, m.decoder.d_model

  def enc(model):
    x = embed_lookup(model.enc_embed[...], ids, cd)
    return model.encoder(x, segment_BxL=seg, pos_BxL=pos)

  def gate(model, h):
    p = model.gate(h)
    end = chunk_boundaries(p, seg, pos, model.max_chunk)
    idx, _, _ = gates.compact_indices(end, cap)
    return gates.straight_through(jnp.take_along_axis(p, idx, axis=1))

  def w_e(model, h, conf):
    h_end = jnp.take_along_axis(h, index[:, :, None], axis=1)
    return model._chunk_in(h_end, conf)

  def dec(model, guide):
    g = jnp.take_along_axis(guide, jnp.zeros((bsz, t, 1), jnp.int32), axis=1)
    y = embed_lookup(model._dec_table(), ids, cd) + g.astype(cd)
    return model.decoder(y, segment_BxL=seg, pos_BxL=pos)

  def head(model, h):
    return _loss(model._head(h), b)

  hs = jnp.zeros((bsz, t, enc_d), cd)
  return {"encoder": (enc, ()), "gate": (gate, (hs,)),
          "w_e": (w_e, (hs, jnp.ones((bsz, cap), jnp.float32))),
          "backbone": (lambda model, x: model.backbone(x, segment_BxL=index + 1,
                                                       pos_BxL=index),
                       (jnp.zeros((bsz, cap, bb_d), cd),)),
          "w_d": (lambda model, h: model._chunk_out(h), (jnp.zeros((bsz, cap, bb_d), cd),)),
          "decoder": (dec, (jnp.zeros((bsz, cap, dec_d), cd),)),
          "head": (head, (jnp.zeros((bsz, t, dec_d), cd),))}


def token_modules(cfg: TrainConfig, b: dict) -> dict[str, tuple[Callable, tuple]]:
  """{module: (fn(model, *xs), xs)} of a token LM (BPE or bytes)."""
  d = cfg.model.backbone.d_model
  cd = jnp.dtype(cfg.model.compute_dtype)
  bsz, t = b["tokens_BxT"].shape
  return {"backbone": (lambda model: model.hidden(b["tokens_BxT"], b["segment_BxT"],
                                                  b["pos_BxT"]), ()),
          "head": (lambda model, h: _loss(model.logits(h), b),
                   (jnp.zeros((bsz, t, d), cd),))}


def check(cfg: TrainConfig, vocab: int | None = None, *, forward: bool = True,
          modules: tuple[str, ...] | None = None) -> list[dict]:
  """Per-module rows {module, analytic model/hardware train FLOPs, XLA fwd/train FLOPs}.

  `forward=False` skips the forward-only compiles; `modules` limits the modules compiled
  (then "glue" is not computed).
  """
  fam = family_of(cfg)
  v = vocab or fam.vocab_size(cfg)
  model = fam.build_model(cfg, v, nnx.Rngs(0))
  b = _batch(cfg)
  mods = (merge_modules if fam.gate == "merge" else
          hat_modules if fam.words else token_modules)(cfg, b)
  model_f = flops.train_flops_per_sequence(cfg, v)
  hw_f = flops.hardware_train_flops_per_sequence(cfg, v)
  rows, xla_sum = [], 0.0
  for name, (fn, xs) in mods.items():
    if modules is not None and name not in modules:
      continue
    fwd, train = _train_cost(model, fn, xs, forward)
    xla_sum += train
    key = "backbone" if name.startswith("backbone_") else name
    share = 1.0
    if name.startswith("backbone_"):  # delete gate: layers below / above the gate
      lower = cfg.model.gate.delete.layer / cfg.model.backbone.num_layers
      share = lower if name == "backbone_lower" else 1.0 - lower
    rows.append({"module": name, "model": model_f.get(key, 0.0) * share,
                 "hardware": hw_f.get(key, 0.0) * share, "xla_fwd": fwd, "xla": train})

  def whole(model):
    return loss_and_metrics(model, b)[0]

  _, train = _train_cost(model, whole, (), forward=False)
  if modules is None:
    rows.append({"module": "glue", "model": 0.0, "hardware": 0.0, "xla_fwd": 0.0,
                 "xla": train - xla_sum})
  rows.append({"module": "whole", "model": model_f["total"], "hardware": hw_f["total"],
               "xla_fwd": 0.0, "xla": train})
  return rows


def masked_share(cfg: TrainConfig, batches: list[dict]) -> dict[str, float]:
  """Share of byte-stack attention FLOPs spent on masked query-key pairs, from real batches.

  Every packed row computes its whole C x C square (XLA's dense attention, and cuDNN /
  splash too: a row of C <= 128 is one tile); a same-word mask keeps sum(n_u^2) of those
  pairs in the bidirectional encoder and sum(n_u (n_u + 1) / 2) in the causal decoder,
  n_u the slots of unit u. Also the masked pairs' share of the step's hardware FLOPs.
  """
  c = cfg.data.row_len
  rows = enc_seen = dec_seen = 0.0
  for b in batches:
    unit_RxC = np.asarray(b["slot_unit_BxS"]).reshape(-1, c)
    for r in unit_RxC:
      _, n_u = np.unique(r[r >= 0], return_counts=True)
      enc_seen += float(np.sum(n_u.astype(np.float64) ** 2))
      dec_seen += float(np.sum(n_u * (n_u + 1) / 2.0))
    rows += unit_RxC.shape[0]
  square = rows * c * c
  hw = flops.hardware_train_flops_per_sequence(cfg)
  seqs = sum(np.asarray(b["slot_unit_BxS"]).shape[0] for b in batches)
  m = cfg.model
  # Each executed pair costs 4·heads·head_dim per layer and pass; x3 for training, plus
  # one more forward for remat (dots or full) recomputing the attention.
  per_pair = lambda t: 4.0 * t.num_heads * t.head_dim * t.num_layers * (
      3 + (m.remat != "none"))
  masked = (square - enc_seen) * per_pair(m.encoder) + (square - dec_seen) * per_pair(m.decoder)
  return {"encoder_masked_share": 1 - enc_seen / square,
          "decoder_masked_share": 1 - dec_seen / square,
          "decoder_masked_share_of_causal_half": 1 - dec_seen / (square / 2 + rows * c / 2),
          "masked_share_of_step_hardware_flops": masked / (hw["total"] * seqs),
          "rows": rows, "sequences": seqs}


def _ratio(a: float, b: float) -> str:
  return f"{a / b:.3f}" if b else "-"


def markdown(results: dict[str, list[dict]]) -> str:
  """The per-module table: analytic (model, hardware) vs XLA, forward + backward."""
  lines = ["| case | module | analytic model | analytic hardware | XLA | XLA / hardware | "
           "XLA / model | XLA bwd / fwd |", "|---|---|---:|---:|---:|---:|---:|---:|"]
  for case, rows in results.items():
    for r in rows:
      bwd = _ratio(r["xla"] - r["xla_fwd"], r["xla_fwd"]) if r["xla_fwd"] else "-"
      lines.append(f"| {case} | {r['module']} | {r['model']:.4g} | {r['hardware']:.4g} | "
                   f"{r['xla']:.4g} | {_ratio(r['xla'], r['hardware'])} | "
                   f"{_ratio(r['xla'], r['model'])} | {bwd} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  """CLI entry point."""
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--only", default="", help="comma-separated case names or prefixes "
                 f"(tiny, 1b); cases: {', '.join(CASES)}")
  p.add_argument("--remat", default=None, help="override model.remat for every case")
  p.add_argument("--masked-share", default="", metavar="DATA",
                 help="only measure the masked byte-attention share of configs/hat_1b.py's "
                      "layout on this training source (e.g. text:../shared/data/corpus/en)")
  p.add_argument("--batches", type=int, default=4, help="batches for --masked-share")
  p.add_argument("--json", default=None)
  p.add_argument("--md", default=None)
  args = p.parse_args(argv)
  if args.masked_share:
    from hat.data import pipeline  # pylint: disable=g-import-not-at-top

    out = {}
    for layers in (18, 2):  # the paper model, and the reduced depth timed on CPU
      cfg = resolve(str(ROOT / "configs/hat_1b.py"), [
          f"data.train={args.masked_share}", "data.batch_size=8",
          f"model.backbone.num_layers={layers}"])
      it = pipeline.make_train_iterator(cfg)
      out[f"{layers}_layers"] = masked_share(cfg, [next(it) for _ in range(args.batches)])
    print(json.dumps(out, indent=2))
    if args.json:
      pathlib.Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0
  wanted = [w for w in args.only.split(",") if w]
  extra = [f"model.remat={args.remat}"] if args.remat else []
  results = {}
  for name in CASES:
    if wanted and not any(name == w or name.startswith(w) for w in wanted):
      continue
    cfg = case_config(name, extra)
    vocab = TINY_VOCAB if name == "tiny_bpe" else None
    results[name] = check(cfg, vocab)
    whole = results[name][-1]
    print(f"{name}: XLA/hardware {whole['xla'] / whole['hardware']:.3f}, "
          f"XLA/model {whole['xla'] / whole['model']:.3f}", flush=True)
  md = markdown(results)
  print(md)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
  if args.md:
    pathlib.Path(args.md).write_text(md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
