"""One command for an accelerator: attention equivalence, training speed, generation speed.

    python tools/accelerator_check.py                 # one H100/H200: about 6 minutes
    python tools/accelerator_check.py --cpu-smoke     # scaled down (the default on CPU)

Writes `<out>/<device>.json` and `<out>/<device>.md` (default out: docs/accelerator/):

1. devices and versions (jax, jaxlib, flax, CUDA/cuDNN where present);
2. cuDNN against XLA attention: loss and gradients of the same HAT batch (byte rows and
   backbone) and BPE batch, bf16, within bf16 tolerance (on CPU: "auto" against "xla");
3. training step time, bytes/s, MFU and HFU of HAT and BPE at the 1B widths with
   `--layers` backbone layers, both fed the identical bytes per batch, and the HAT/BPE
   step-time ratio next to the analytic FLOP ratio;
4. generation bytes/s at batch 1, 32 and 256 with the cached samplers.

Every section records its own error instead of stopping the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import re
import sys
import tempfile
import time
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from hat import flops  # noqa: E402
from hat.config import resolve  # noqa: E402
from hat.data import pipeline  # noqa: E402
from hat.family import family_of  # noqa: E402
from hat.models import loss_and_metrics, model_vocab_size  # noqa: E402
from hat.train.bench import ROOT, bpe_tokenizer, time_config  # noqa: E402

BF16_LOSS_RTOL = 2e-2  # bf16 has an 8-bit mantissa: ~0.4% per rounding, summed over layers
BF16_GRAD_RTOL = 5e-2  # relative L2 error of the whole gradient


@dataclasses.dataclass(frozen=True)
class Plan:
  """How big each section runs: the accelerator plan, or the CPU smoke plan."""

  window_bytes: int
  batch: int
  layers: int
  steps: int
  gen_batches: tuple[int, ...]
  gen_bytes: int
  equiv_batch: int
  bpe_vocab: int  # trained tokenizer; at 1B widths the model's head keeps 65,536
  widths: str = "1b"  # "1b": configs/{hat,bpe}_1b.py; "tiny": configs/tiny_{hat,bpe}.py


GPU_PLAN = Plan(window_bytes=16384, batch=8, layers=2, steps=10, gen_batches=(1, 32, 256),
                gen_bytes=64, equiv_batch=2, bpe_vocab=4096)
CPU_PLAN = Plan(window_bytes=512, batch=2, layers=2, steps=2, gen_batches=(1, 4),
                gen_bytes=8, equiv_batch=1, bpe_vocab=512, widths="tiny")


def _guard(fn, *args, **kwargs) -> dict:
  """Runs one section; an exception becomes {"error": ...} in the report."""
  t0 = time.perf_counter()
  try:
    out = fn(*args, **kwargs)
  except Exception as err:  # pylint: disable=broad-except
    out = {"error": f"{type(err).__name__}: {err}"[:2000],
           "traceback": traceback.format_exc()[-3000:]}
  out["section_s"] = time.perf_counter() - t0
  return out


def versions() -> dict:
  """Devices and library versions."""
  import flax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top

  dev = jax.devices()[0]
  out = {"backend": jax.default_backend(), "device_kind": dev.device_kind,
         "device_count": jax.device_count(), "jax": jax.__version__,
         "jaxlib": jaxlib.__version__, "flax": flax.__version__,
         "python": platform.python_version(), "peak_bf16_flops": flops.peak_flops(dev.device_kind)}
  try:
    from jax._src.lib import cuda_versions  # pylint: disable=g-import-not-at-top

    if cuda_versions is not None:
      out["cudnn"] = cuda_versions.cudnn_get_version()
      out["cuda_runtime"] = cuda_versions.cuda_runtime_get_version()
  except Exception:  # pylint: disable=broad-except
    pass
  return out


# ------------------------------------------------------------------ configs


def bytes_per_token(tokenizer, data: str, docs: int = 200) -> float:
  """Mean UTF-8 bytes per BPE token on the first documents of the source."""
  from hat.data.sources import open_from_config, parse_mixture  # pylint: disable=g-import-not-at-top

  cfg = resolve(str(ROOT / "configs/tiny_hat.py"), [f"data.train={data}"])
  source = open_from_config(cfg.data, parse_mixture(data)[0], "train")
  texts = [source[i] for i in range(min(len(source), docs))]
  return sum(map(len, texts)) / max(1, sum(len(tokenizer.encode(t)) for t in texts))


def _layout(window_bytes: int, row_len: int, bpt: float) -> list[str]:
  """The paper layout scaled to a window: units, rows and tokens, each with headroom.

  No window may carry over into a second sequence, or the two models would not see
  the same bytes per batch: a small trained vocabulary has fewer bytes per token than
  the paper's 4.12, hence tokens sized from the measured `bpt`.
  """
  scale = window_bytes / 16384
  units = max(16, int(2944 * scale * 1.15 + 15) // 8 * 8)
  rows = max(3, int(np.ceil(164 * scale * 128 / row_len * 1.1)) + 1)
  tokens = max(64, int(window_bytes / bpt * 1.15 + 32 + 63) // 64 * 64)
  return [f"data.window_bytes={window_bytes}", f"data.max_units={units}",
          f"data.num_rows={rows}", f"data.max_tokens={tokens}"]


def configs(plan: Plan, data: str, tokenizer: str, bpt: float, impl: str = "auto") -> dict:
  """HAT and BPE at the plan's widths with `plan.layers` backbone layers, one device."""
  paper = plan.widths == "1b"
  files = ("hat_1b", "bpe_1b") if paper else ("tiny_hat", "tiny_bpe")
  common = [f"data.train={data}", f"data.batch_size={plan.batch}",
            f"model.backbone.num_layers={plan.layers}", "mesh=data=-1,fsdp=1,tensor=1",
            f"model.attention_impl={impl}", "data.overflow=carry",
            *_layout(plan.window_bytes, 128 if paper else 64, bpt)]
  vocab = 65536 if paper else 0  # tiny: the tokenizer's own size
  return {"hat": resolve(str(ROOT / f"configs/{files[0]}.py"), common),
          "bpe": resolve(str(ROOT / f"configs/{files[1]}.py"),
                         common + [f"data.tokenizer={tokenizer}", f"model.vocab_size={vocab}"])}


# ------------------------------------------------------------------ attention equivalence


def _loss_and_grads(cfg, impl: str, batch: dict, tokenizer):
  """Loss and gradient of one batch with the same parameters, attention `impl`."""
  fam = family_of(cfg)
  vocab = model_vocab_size(cfg, tokenizer)
  cfg_impl = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention_impl=impl))
  model = fam.build_model(cfg_impl, vocab, nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)

  @jax.jit
  def fn(params, batch):
    return jax.value_and_grad(
        lambda p: loss_and_metrics(nnx.merge(graphdef, p), batch)[0])(params)

  loss, grads = fn(params, batch)
  return float(loss), [np.asarray(g, np.float32) for g in jax.tree.leaves(grads)]


def attention_equivalence(cfgs: dict, plan: Plan, tokenizer) -> dict:
  """cuDNN (or "auto" where there is no GPU) against XLA: loss and gradients, per family."""
  other = "cudnn" if jax.default_backend() == "gpu" else "auto"
  out = {"compared": f"{other} vs xla", "loss_rtol": BF16_LOSS_RTOL,
         "grad_rtol": BF16_GRAD_RTOL}
  for name, cfg in cfgs.items():
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=plan.equiv_batch))
    tok = tokenizer if name == "bpe" else None
    batch = jax.tree.map(jnp.asarray, next(pipeline.make_train_iterator(cfg, tok)))
    ref_loss, ref_g = _loss_and_grads(cfg, "xla", batch, tok)
    loss, g = _loss_and_grads(cfg, other, batch, tok)
    num = np.sqrt(sum(float(np.sum((a - b) ** 2)) for a, b in zip(g, ref_g)))
    den = np.sqrt(sum(float(np.sum(b**2)) for b in ref_g))
    loss_err, grad_err = abs(loss - ref_loss) / abs(ref_loss), num / max(den, 1e-30)
    out[name] = {"loss_xla": ref_loss, f"loss_{other}": loss, "loss_rel_err": loss_err,
                 "grad_rel_l2_err": grad_err,
                 "ok": bool(loss_err <= BF16_LOSS_RTOL and grad_err <= BF16_GRAD_RTOL)}
  return out


# ------------------------------------------------------------------ training speed


def training_speed(cfgs: dict, plan: Plan, tokenizer) -> dict:
  """Step time, bytes/s, MFU, HFU of HAT and BPE on identical bytes; the HAT/BPE ratios."""
  out = {}
  for name, cfg in cfgs.items():
    r = time_config(cfg, plan.steps, tokenizer=tokenizer if name == "bpe" else None,
                    settle=1 if plan.steps < 5 else 2)
    stats = pipeline.summarize_stats([pipeline.batch_stats(jax.device_get(b))
                                      for b in r["_batches"]])
    out[name] = {k: v for k, v in r.items() if not k.startswith("_")}
    out[name].update(overflow_sequences=stats.get("overflow_sequences"),
                     attention=flops.executed_attention_impl(cfg),
                     backbone_layers=cfg.model.backbone.num_layers,
                     window_bytes=cfg.data.window_bytes, batch=cfg.data.batch_size)
  h, b = out["hat"], out["bpe"]
  out["same_bytes_per_batch"] = bool(h["bytes_per_batch"] == b["bytes_per_batch"])
  out["step_time_ratio_hat_over_bpe"] = h["step_ms"] / b["step_ms"]
  out["model_flop_ratio_hat_over_bpe"] = h["train_flops_per_step"] / b["train_flops_per_step"]
  out["hardware_flop_ratio_hat_over_bpe"] = (h["hardware_flops_per_step"]
                                             / b["hardware_flops_per_step"])
  return out


# ------------------------------------------------------------------ generation speed


def generation_speed(cfgs: dict, plan: Plan, tokenizer) -> dict:
  """Bytes/s of the cached samplers (random weights) at each batch size."""
  from hat.generate import SampleOptions, make_sampler  # pylint: disable=g-import-not-at-top

  out = {}
  prompt = b"The history of the city begins with a small settlement on the river, where"
  for name, cfg in cfgs.items():
    tok = tokenizer if name == "bpe" else None
    model = family_of(cfg).build_model(cfg, model_vocab_size(cfg, tok), nnx.Rngs(0))
    sampler = make_sampler(model, cfg, tok)
    rows = {}
    for batch in plan.gen_batches:
      opts = SampleOptions(temperature=0.8, max_new_bytes=plan.gen_bytes, seed=0)
      try:
        sampler.generate_batch([prompt] * batch, opts)  # compile
        t0 = time.perf_counter()
        texts = sampler.generate_batch([prompt] * batch, opts)
        dt = time.perf_counter() - t0
        n = sum(len(t) for t in texts)
        rows[str(batch)] = {"new_bytes": n, "seconds": dt, "bytes_per_s": n / dt}
      except Exception as err:  # pylint: disable=broad-except
        rows[str(batch)] = {"error": f"{type(err).__name__}: {err}"[:500]}
    out[name] = rows
  return out


# ------------------------------------------------------------------ report


def _slug(kind: str) -> str:
  return re.sub(r"[^A-Za-z0-9]+", "_", kind).strip("_").lower() or "device"


def _fmt(v, spec=".4g"):
  return "-" if v is None else format(v, spec)


def markdown(rep: dict) -> str:
  """The report as markdown."""
  v = rep["versions"]
  lines = [f"# Accelerator check: {v.get('device_kind')} x{v.get('device_count')}", "",
           f"backend {v.get('backend')}, jax {v.get('jax')}, jaxlib {v.get('jaxlib')}, "
           f"flax {v.get('flax')}, cuDNN {v.get('cudnn', '-')}; plan {rep['plan']}; "
           f"total {rep['total_s']:.0f} s", ""]
  eq = rep["attention"]
  lines += ["## Attention: " + eq.get("compared", ""), ""]
  if "hat" not in eq and "bpe" not in eq:
    lines += [f"error: {eq.get('error', 'skipped')}", ""]
  else:
    lines += ["| model | loss (xla) | loss rel err | grad rel L2 err | within bf16 tol |",
              "|---|---:|---:|---:|---|"]
    for k in ("hat", "bpe"):
      if k in eq:
        r = eq[k]
        lines.append(f"| {k.upper()} | {r['loss_xla']:.5f} | {r['loss_rel_err']:.2e} | "
                     f"{r['grad_rel_l2_err']:.2e} | {r['ok']} |")
    lines.append("")
  tr = rep["training"]
  lines += [f"## Training step ({rep['plan_detail']['widths']} widths, reduced backbone "
            "depth, identical bytes)", ""]
  if "step_time_ratio_hat_over_bpe" not in tr:
    lines += [f"error: {tr.get('error', 'skipped')}", ""]
  else:
    lines += ["| model | layers | attention | batch x bytes | step ms | bytes/s | MFU | HFU | "
              "model TFLOP/step | hardware TFLOP/step |", "|---|---:|---|---|---:|---:|---:|---:|"
              "---:|---:|"]
    for k in ("hat", "bpe"):
      r = tr[k]
      lines.append(f"| {k.upper()} | {r['backbone_layers']} | {r['attention']} | "
                   f"{r['batch']} x {r['window_bytes']} | {r['step_ms']:.1f} | "
                   f"{r['bytes_per_s']:.4g} | {_fmt(r['mfu'], '.3f')} | {_fmt(r['hfu'], '.3f')} | "
                   f"{r['train_flops_per_step'] / 1e12:.3f} | "
                   f"{r['hardware_flops_per_step'] / 1e12:.3f} |")
    lines += ["", f"HAT/BPE step time {tr['step_time_ratio_hat_over_bpe']:.3f}; model FLOPs "
              f"{tr['model_flop_ratio_hat_over_bpe']:.3f}; hardware FLOPs "
              f"{tr['hardware_flop_ratio_hat_over_bpe']:.3f}; same bytes per batch: "
              f"{tr['same_bytes_per_batch']}", ""]
  gen = rep["generation"]
  lines += ["## Generation (cached samplers, random weights), bytes/s", ""]
  if "hat" not in gen and "bpe" not in gen:
    lines += [f"error: {gen.get('error', 'skipped')}", ""]
  else:
    sizes = sorted({int(b) for k, rows in gen.items() if k in ("hat", "bpe")
                    for b in rows})
    lines += ["| model | " + " | ".join(f"batch {b}" for b in sizes) + " |",
              "|---|" + "---:|" * len(sizes)]
    for k in ("hat", "bpe"):
      rows = gen.get(k, {})
      cells = [(f"{rows[str(b)]['bytes_per_s']:.4g}" if "bytes_per_s" in rows.get(str(b), {})
                else rows.get(str(b), {}).get("error", "-")[:60]) for b in sizes]
      lines.append(f"| {k.upper()} | " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)


def main(argv=None) -> int:
  """CLI entry point."""
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--cpu-smoke", action="store_true",
                 help="scaled-down run (the default when the backend is CPU)")
  p.add_argument("--data", default="builtin", help="training source for every section")
  p.add_argument("--tokenizer", default="", help="BPE model (default: train one on --data)")
  p.add_argument("--layers", type=int, default=None, help="backbone layers (HAT and BPE)")
  p.add_argument("--window", type=int, default=None, help="bytes per sequence")
  p.add_argument("--batch", type=int, default=None, help="sequences per training step")
  p.add_argument("--steps", type=int, default=None, help="timed training steps")
  p.add_argument("--bpe-vocab", type=int, default=None, help="trained tokenizer's size")
  p.add_argument("--gen-batches", default=None, help="generation batch sizes, e.g. 1,32,256")
  p.add_argument("--widths", choices=("1b", "tiny"), default=None,
                 help="model widths (default: 1b on an accelerator, tiny in the smoke run)")
  p.add_argument("--out", default=str(ROOT / "docs/accelerator"))
  p.add_argument("--skip", default="", help="comma-separated sections to skip: "
                 "attention,training,generation")
  args = p.parse_args(argv)
  smoke = args.cpu_smoke or jax.default_backend() == "cpu"
  plan = CPU_PLAN if smoke else GPU_PLAN
  plan = dataclasses.replace(plan, **{k: v for k, v in (
      ("layers", args.layers), ("window_bytes", args.window), ("batch", args.batch),
      ("steps", args.steps), ("widths", args.widths), ("bpe_vocab", args.bpe_vocab),
      ("gen_batches", args.gen_batches and tuple(int(x) for x in args.gen_batches.split(","))))
      if v is not None})
  skip = set(filter(None, args.skip.split(",")))
  t0 = time.perf_counter()
  rep = {"plan": "cpu" if smoke else "accelerator", "plan_detail": dataclasses.asdict(plan),
         "versions": _guard(versions)}
  with tempfile.TemporaryDirectory() as tmp:
    tok_path = args.tokenizer or bpe_tokenizer(args.data, pathlib.Path(tmp), [],
                                               plan.bpe_vocab)
    from hat.text.bpe import BPETokenizer  # pylint: disable=g-import-not-at-top

    bpt = bytes_per_token(BPETokenizer.load(tok_path), args.data)
    cfgs = configs(plan, args.data, tok_path, bpt)
    tokenizer = pipeline.default_tokenizer(cfgs["bpe"])
    rep["bpe_bytes_per_token"] = bpt
    for name, fn in (("attention", attention_equivalence), ("training", training_speed),
                     ("generation", generation_speed)):
      rep[name] = {"skipped": True} if name in skip else _guard(fn, cfgs, plan, tokenizer)
      print(f"{name}: {json.dumps(rep[name], default=str)[:600]}", flush=True)
  rep["total_s"] = time.perf_counter() - t0
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  stem = _slug(rep["versions"].get("device_kind", "device")) + ("_smoke" if smoke else "")
  (out / f"{stem}.json").write_text(json.dumps(rep, indent=2, default=str) + "\n")
  (out / f"{stem}.md").write_text(markdown(rep))
  print(markdown(rep))
  print(f"wrote {out / stem}.json and .md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
