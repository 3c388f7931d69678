"""Compiles the full training step for a TPU topology ahead of time, on a CPU machine.

  python tools/aot_compile.py --config configs/hat_1b.py --topology v5p-64 \
      --per_chip_batch 2 [--num_slices 2] [--mesh fsdp=-1] [--config.model.remat=full]

Needs the libtpu that matches jax (`pip install "jax[tpu]==<jax version>"`; see
docs/scale.md): `jax.experimental.topologies` then describes
the target pod's devices without the hardware, and XLA's TPU compiler runs the whole
train step (forward, backward, optimizer update) for the sharded shapes. Prints per-chip
memory (arguments, outputs, temporaries) against the chip's HBM with a FITS / DOES NOT
FIT verdict (naming the largest buffers when it does not fit), compiled vs analytic
FLOPs, and the mesh and shardings used. `--json` writes the same figures to a file.
"""

from __future__ import annotations

import os

# libtpu takes a machine-wide lockfile meant for real chips; a compile-only process
# shares nothing with other processes, and the host's own devices are plain CPU.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

import argparse  # noqa: E402
import collections  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, Mesh  # noqa: E402

from hat import flops, params  # noqa: E402
from hat.cli import entry_point, user_input  # noqa: E402
from hat.config import TrainConfig, resolve  # noqa: E402
from hat.family import family_of  # noqa: E402
from hat.models import model_vocab_size  # noqa: E402
from hat.sharding import MESH_AXES, parse_mesh_spec  # noqa: E402
from hat.train.state import state_spec  # noqa: E402
from hat.train.step import make_train_step  # noqa: E402

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class TpuGen:
  """One TPU generation: how its slices are named and what one chip holds."""

  topo_prefix: str  # as libtpu spells it in topology names
  chip_config: str  # 'megacore': one JAX device per chip (two fused TensorCores)
  dims: int  # 3D torus (v4, v5p) or 2D mesh (v5e, v6e)
  name_counts_cores: bool  # "v5p-64" counts TensorCores (32 chips); "v5e-64" counts chips
  hbm_bytes: int
  device_kind: str  # key into hat.flops.PEAK_FLOPS


TPU_GENS = {
    "v4": TpuGen("v4", "megacore", 3, True, 32 * GiB, "TPU v4"),
    "v5p": TpuGen("v5", "megacore", 3, True, 95 * GiB, "TPU v5p"),
    "v5e": TpuGen("v5e", "default", 2, False, 16 * GiB, "TPU v5e"),
    "v6e": TpuGen("v6e", "default", 2, False, 32 * GiB, "TPU v6e"),
}
# Standard slice shapes by chip count (Cloud TPU's published topologies).
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
              128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
              2048: (8, 16, 16), 4096: (16, 16, 16)}
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
              128: (8, 16), 256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice as libtpu's topology description wants it."""

  gen: str
  shape: tuple[int, ...]
  num_slices: int = 1

  @property
  def spec(self) -> TpuGen:
    """The generation's constants."""
    return TPU_GENS[self.gen]

  @property
  def chips_per_slice(self) -> int:
    """Chips (= JAX devices) in one slice."""
    return math.prod(self.shape)

  @property
  def name(self) -> str:
    """libtpu topology name, e.g. 'v5:4x4x8'."""
    return f"{self.spec.topo_prefix}:{'x'.join(map(str, self.shape))}"

  @property
  def wrap(self) -> tuple[bool, bool, bool]:
    """Torus wrap-around links: full v4/v5p cubes (every dim >= 4) are tori."""
    if self.spec.dims == 3 and min(self.shape) >= 4:
      return (True, True, True)
    return (False, False, False)

  @property
  def host_bounds(self) -> tuple[int, int, int]:
    """Chips per host: 2x2x1 on every generation here (v5e/v6e 8-chip hosts hold 2x4)."""
    if self.spec.dims == 2 and self.chips_per_slice == 8:
      return (2, 4, 1)
    if self.chips_per_slice < 4:
      return (*self.shape, 1) if len(self.shape) == 2 else self.shape
    return (2, 2, 1)


def parse_topology(text: str, num_slices: int = 1) -> Topology:
  """'v5p-64' (Cloud TPU accelerator type) or 'v5p:2x4x4' (chip grid) -> Topology."""
  m = re.fullmatch(r"(v4|v5p|v5e|v6e)([-:])([0-9x]+)", text.strip().lower())
  if not m:
    raise ValueError(f"topology {text!r}: expected e.g. v5p-64, v5e-16, v6e-256 or v5p:4x4x8 "
                     f"(generations: {sorted(TPU_GENS)})")
  gen, sep, rest = m.groups()
  spec = TPU_GENS[gen]
  if sep == ":":
    shape = tuple(int(x) for x in rest.split("x"))
    if len(shape) != spec.dims:
      raise ValueError(f"topology {text!r}: {gen} slices are {spec.dims}-D grids")
    return Topology(gen, shape, num_slices)
  n = int(rest)
  chips = n // 2 if spec.name_counts_cores else n
  table = _SHAPES_3D if spec.dims == 3 else _SHAPES_2D
  if chips not in table:
    raise ValueError(f"topology {text!r}: no standard {gen} slice of {chips} chips; "
                     f"give the grid instead, e.g. {gen}:" + "x".join(["4"] * spec.dims))
  return Topology(gen, table[chips], num_slices)


def topology_devices(topo: Topology) -> list:
  """The target's devices, described by libtpu on this (CPU) machine."""
  from jax.experimental import topologies

  try:
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topo.name, chip_config_name=topo.spec.chip_config,
        chips_per_host_bounds=topo.host_bounds, num_slices=topo.num_slices, wrap=topo.wrap)
  except Exception as err:  # missing libtpu shows up as many different errors
    raise RuntimeError(f"cannot describe TPU topology {topo.name} x{topo.num_slices}: {err}\n"
                       "AOT compilation needs the libtpu matching jax: "
                       f"pip install 'jax[tpu]=={jax.__version__}'") from err
  return list(desc.devices)


def build_mesh(devices: list, mesh_spec: str, num_slices: int) -> Mesh:
  """Physically laid-out mesh; across slices only the 'replica' axis (over DCN)."""
  from jax.experimental import mesh_utils

  sizes = parse_mesh_spec(mesh_spec, len(devices))
  if sizes["replica"] != num_slices:
    raise ValueError(f"mesh {mesh_spec!r}: replica={sizes['replica']} must equal "
                     f"--num_slices={num_slices} (data crosses slices on 'replica' only)")
  ici = [1] + [sizes[a] for a in MESH_AXES[1:]]
  if num_slices > 1:
    dcn = [num_slices] + [1] * (len(MESH_AXES) - 1)
    array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
  else:
    array = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
  return Mesh(np.asarray(array), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def abstract_batch(cfg: TrainConfig) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of one global batch, as the run's family lays it out (hat.data.batch)."""
  shapes = family_of(cfg).batch_shapes(cfg, cfg.data.batch_size)
  return {k: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)) for k, (shape, dtype) in shapes.items()}


_HLO_VALUE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = ((?:\w+\[[0-9,]*\][^ ]*)|\([^=]*?\)) "
                        r"([\w\-]+)\(")
_SHAPE = re.compile(r"(pred|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|u64|f64)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def largest_buffers(hlo_text: str, top: int = 8) -> list[tuple[int, str, str]]:
  """(bytes, shape, producer) of the largest per-chip values in the optimized HLO."""
  found: dict[str, tuple[int, str]] = {}
  for line in hlo_text.splitlines():
    m = _HLO_VALUE.match(line)
    if not m or m.group(3) in ("parameter", "get-tuple-element", "bitcast", "tuple"):
      continue
    for dtype, dims in _SHAPE.findall(m.group(2)):
      n = _BYTES[dtype] * math.prod(int(x) for x in dims.split(",") if x)
      shape = f"{dtype}[{dims}]"
      op = re.search(r'op_name="([^"]+)"', line)
      label = f"{m.group(3)} {op.group(1) if op else m.group(1)}"
      if n > found.get(shape, (0, ""))[0]:
        found[shape] = (n, label[:140])
  ranked = sorted(((n, shape, label) for shape, (n, label) in found.items()), reverse=True)
  return ranked[:top]


def largest_state(state_shapes, shardings, top: int = 5) -> list[tuple[int, str]]:
  """(per-chip bytes, path) of the largest parameter / optimizer-state shards."""
  leaves = jax.tree_util.tree_leaves_with_path(state_shapes)
  shard_leaves = jax.tree_util.tree_leaves(shardings)
  out = []
  for (path, leaf), sh in zip(leaves, shard_leaves):
    shard = sh.shard_shape(leaf.shape) if hasattr(sh, "shard_shape") else leaf.shape
    out.append((math.prod(shard) * leaf.dtype.itemsize, jax.tree_util.keystr(path)))
  return sorted(out, reverse=True)[:top]


def _cost_flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def lower_train_step(cfg: TrainConfig, mesh: Mesh):
  """(lowered train step, state spec): the trainer's own step on abstract inputs."""
  spec = state_spec(cfg, model_vocab_size(cfg), mesh)
  batch_shapes = abstract_batch(cfg)
  with jax.set_mesh(mesh):
    # The trainer's own jitted step: forward, backward, accumulation, AdamW update.
    step = make_train_step(cfg, spec, mesh, batch_shapes)
    lowered = step.lower(spec.abstract, batch_shapes, jax.ShapeDtypeStruct((), jnp.float32))
  return lowered, spec


def _compile(cfg: TrainConfig, mesh: Mesh):
  """(compiled train step, state spec, lower seconds, compile seconds)."""
  t0 = time.time()
  lowered, spec = lower_train_step(cfg, mesh)
  t1 = time.time()
  compiled = lowered.compile()
  return compiled, spec, t1 - t0, time.time() - t1


def unrolled_flops(cfg: TrainConfig, mesh: Mesh) -> float | None:
  """Compiled FLOPs per chip of a whole step, from a loop-free variant of the same step.

  XLA's cost analysis counts a while-loop body once, so the layer scan and the
  accumulation scan hide most of the work. The variant has unscanned layers and one
  sequence per chip (unrolled layers need more memory, and FLOPs are linear in the
  batch); its FLOPs times the sequences per chip per step are the step's.
  """
  chips = mesh.devices.size
  flat = dataclasses.replace(
      cfg, model=dataclasses.replace(cfg.model, scan_layers=False),
      data=dataclasses.replace(cfg.data, batch_size=chips),
      optim=dataclasses.replace(cfg.optim, grad_accum=1))
  try:
    f = _cost_flops(_compile(flat, mesh)[0])
  except jax.errors.JaxRuntimeError as err:
    print(f"flops check: the loop-free variant did not compile: {str(err)[:200]}")
    return None
  return None if f is None else f * cfg.data.batch_size / chips


def compile_for(cfg: TrainConfig, topo: Topology, *, flops_check: bool = False,
                verbose: bool = True) -> dict:
  """Lowers and compiles the train step for `topo`; returns the report as a dict."""
  devices = topology_devices(topo)
  mesh = build_mesh(devices, cfg.mesh, topo.num_slices)
  compiled, spec, lower_s, compile_s = _compile(cfg, mesh)
  mem = compiled.memory_analysis()
  hbm = topo.spec.hbm_bytes
  arg, out, tmp = mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.temp_size_in_bytes
  alias = getattr(mem, "alias_size_in_bytes", 0)
  code = getattr(mem, "generated_code_size_in_bytes", 0)
  # Donated state is aliased input->output: count it once.
  total = arg + out - alias + tmp + code
  chips = len(devices)
  per_chip_flops = _cost_flops(compiled)
  scope = "as compiled (loop bodies counted once)"
  if flops_check:
    checked = unrolled_flops(cfg, mesh)
    if checked is not None:
      per_chip_flops, scope = checked, "whole step (loop-free variant)"
  analytic = flops.train_flops_per_step(cfg)
  rep = {
      "config_kind": family_of(cfg).name,
      "topology": topo.name, "num_slices": topo.num_slices, "chips": chips,
      "device_kind": devices[0].device_kind,
      "mesh": dict(mesh.shape),
      "global_batch": cfg.data.batch_size,
      "grad_accum": cfg.optim.grad_accum,
      "per_chip_batch": cfg.data.batch_size / chips / cfg.optim.grad_accum,
      "remat": cfg.model.remat, "attention_impl": cfg.model.attention_impl,
      "params": params.count_params(cfg.model)["total"],
      "argument_gib": arg / GiB, "output_gib": out / GiB, "alias_gib": alias / GiB,
      "temp_gib": tmp / GiB, "code_gib": code / GiB, "total_gib": total / GiB,
      "hbm_gib": hbm / GiB, "fits": total <= hbm,
      "compiled_flops_per_chip": per_chip_flops,
      "analytic_flops_per_chip": analytic / chips,
      "compiled_flops_scope": scope,
      "lower_s": lower_s, "compile_s": compile_s,
  }
  if verbose:
    _print_report(rep, spec.abstract, spec.shardings, compiled)
  return rep


def _print_report(rep: dict, state_shapes, state_shardings, compiled) -> None:
  print(f"target     {rep['topology']} x {rep['num_slices']} slice(s) = {rep['chips']} chips "
        f"({rep['device_kind']}), HBM {rep['hbm_gib']:.0f} GiB per chip")
  print(f"mesh       {rep['mesh']}")
  print(f"model      {rep['config_kind']}, {params.format_count(rep['params'])} parameters, "
        f"remat={rep['remat']}, attention={rep['attention_impl']}")
  print(f"batch      {rep['global_batch']} sequences global = {rep['per_chip_batch']:g} per chip "
        f"x {rep['chips']} chips x {rep['grad_accum']} accumulation steps")
  print(f"compile    lower {rep['lower_s']:.1f} s, compile {rep['compile_s']:.1f} s")
  print("per-chip memory (GiB): arguments {argument_gib:.2f}, outputs {output_gib:.2f}, "
        "aliased {alias_gib:.2f}, temporaries {temp_gib:.2f}, code {code_gib:.3f}, "
        "total {total_gib:.2f} of {hbm_gib:.0f}".format(**rep))
  cf, af = rep["compiled_flops_per_chip"], rep["analytic_flops_per_chip"]
  if cf:
    print(f"FLOPs/chip compiled {cf:.4g} [{rep['compiled_flops_scope']}], analytic {af:.4g} "
          f"(ratio {cf / af:.2f}; remat recompute and masked full-square attention add to "
          "compiled; --flops_check counts every loop iteration)")
  else:
    print(f"FLOPs/chip analytic {af:.4g} (the compiler reported no cost analysis)")
  counts = collections.Counter(str(s.spec) for s in jax.tree_util.tree_leaves(state_shardings))
  print("state shardings: " + "; ".join(f"{k} x{v}" for k, v in counts.most_common(8)))
  verdict = "FITS" if rep["fits"] else "DOES NOT FIT"
  print(f"verdict    {verdict} ({rep['total_gib']:.2f} / {rep['hbm_gib']:.0f} GiB per chip)")
  if not rep["fits"]:
    print("largest state shards per chip:")
    for n, path in largest_state(state_shapes, state_shardings):
      print(f"  {n / GiB:8.3f} GiB  {path}")
    print("largest values in the compiled program (per chip):")
    for n, shape, label in largest_buffers(compiled.as_text()):
      print(f"  {n / GiB:8.3f} GiB  {shape}  {label}")


def configure(config: str | None, overrides: list[str], topo: Topology,
              per_chip_batch: float | None, mesh: str | None) -> TrainConfig:
  """Resolves the config with the batch and mesh set for the target topology.

  `per_chip_batch` is the micro-batch per chip; the global batch is that times the chips
  times `optim.grad_accum`.
  """
  chips = topo.chips_per_slice * topo.num_slices
  extra = list(overrides)
  if mesh is not None:
    extra.append(f"mesh={mesh}")
  elif topo.num_slices > 1:
    extra.append(f"mesh=replica={topo.num_slices},data=1,fsdp=-1,tensor=1")
  cfg = resolve(config, extra)
  if per_chip_batch is not None:
    global_batch = per_chip_batch * chips * cfg.optim.grad_accum
    if global_batch != int(global_batch) or global_batch < 1:
      raise ValueError(f"--per_chip_batch {per_chip_batch} x {chips} chips is not a whole batch")
    cfg = resolve(config, extra + [f"data.batch_size={int(global_batch)}"])
  return cfg


@entry_point
def main(argv: list[str] | None = None) -> int:
  """CLI entry point."""
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", required=True, help="config file, e.g. configs/hat_1b.py")
  ap.add_argument("--topology", required=True,
                  help="v4-N / v5p-N (N TensorCores), v5e-N / v6e-N (N chips), or v5p:4x4x8")
  ap.add_argument("--num_slices", type=int, default=1, help="slices joined over DCN")
  ap.add_argument("--per_chip_batch", type=float, default=None,
                  help="sequences per chip; default: the config's global batch")
  ap.add_argument("--mesh", default=None,
                  help="mesh spec, e.g. 'fsdp=-1' (default: the config's; multi-slice adds "
                       "replica=num_slices)")
  ap.add_argument("--flops_check", action="store_true",
                  help="also compile a loop-free variant to count the whole step's FLOPs")
  ap.add_argument("--json", default=None, help="also write the report here")
  args, overrides = ap.parse_known_args(argv)
  for item in overrides:
    if not item.startswith("--config."):
      ap.error(f"unrecognised argument {item!r} (overrides look like --config.key=value)")
  with user_input(ValueError):  # a topology, mesh or batch that does not exist
    topo = parse_topology(args.topology, args.num_slices)
    cfg = configure(args.config, overrides, topo, args.per_chip_batch, args.mesh)
  rep = compile_for(cfg, topo, flops_check=args.flops_check)
  rep["config"] = args.config
  rep["overrides"] = overrides
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(rep, indent=2))
  return 0 if rep["fits"] else 2


if __name__ == "__main__":
  sys.exit(main())
