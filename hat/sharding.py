"""Logical axis names -> device mesh axes, in one place.

Parameters carry their logical axes as variable metadata
(`nnx.Param(value, logical_axes=("embed", "mlp"))`); large activations are annotated
with `constrain(x, ("batch", "length", "embed"))`. Rules map each logical name to mesh
axes (`data`, `fsdp`, `tensor`, and `replica` for data parallelism across slices).
Nothing here holds global state: rules are passed in, and `constrain` is a no-op when no
mesh is active, so models run unchanged on one device.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("replica", "data", "fsdp", "tensor")

# Logical name -> mesh axis (or tuple of axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("replica", "data", "fsdp")),
    ("length", None),
    ("units", None),
    ("slots", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
)


def parse_mesh_spec(spec: str, num_devices: int) -> dict[str, int]:
  """`"data=-1,fsdp=2,tensor=1"` -> sizes per MESH_AXES, -1 filling what is left."""
  sizes = {axis: 1 for axis in MESH_AXES}
  fill = None
  for part in filter(None, (p.strip() for p in spec.split(","))):
    if "=" not in part:
      raise ValueError(f"mesh: {part!r} is not axis=size (axes: {MESH_AXES})")
    name, value = part.split("=", 1)
    if name not in sizes:
      raise ValueError(f"mesh: unknown axis {name!r}; axes are {MESH_AXES}")
    size = int(value)
    if size == -1:
      if fill is not None:
        raise ValueError("mesh: only one axis may be -1")
      fill = name
    elif size < 1:
      raise ValueError(f"mesh: axis {name} has size {size}")
    else:
      sizes[name] = size
  fixed = math.prod(sizes[a] for a in MESH_AXES if a != fill)
  if fill is not None:
    if num_devices % fixed:
      raise ValueError(f"mesh: fixed axes multiply to {fixed}, which does not divide the "
                       f"{num_devices} devices")
    sizes[fill] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"mesh: {sizes} uses {math.prod(sizes.values())} devices, "
                     f"but {num_devices} are present")
  return sizes


def make_mesh(spec: str = "data=-1", devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds an Auto-typed mesh (GSPMD logical rules) over `devices` (default: all)."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = parse_mesh_spec(spec, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(names: Sequence[str | None] | None, rules=DEFAULT_RULES,
                    mesh: Mesh | None = None) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec; mesh axes of size 1 are dropped."""
  if names is None:
    return PartitionSpec()
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name in names:
    target = table.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    if mesh is not None:
      axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
    axes = tuple(a for a in axes if a not in used)  # a mesh axis shards one dim only
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*out)


def constrain(x: jax.Array, names: Sequence[str | None], rules=DEFAULT_RULES) -> jax.Array:
  """Sharding constraint from logical names; a no-op outside a mesh context."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, rules, mesh))


def _divisible(spec: PartitionSpec, shape, mesh: Mesh) -> PartitionSpec:
  """Drops sharding on dims the mesh axes do not divide (small vocab, odd widths)."""
  out = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
    size = math.prod(mesh.shape[a] for a in axes)
    out.append(entry if axes and dim % size == 0 else None)
  return PartitionSpec(*out)


def state_shardings(abstract_state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
  """NamedShardings for an (abstract) nnx.State from each variable's `logical_axes`."""

  def one(var):
    if not isinstance(var, nnx.Variable):
      return NamedSharding(mesh, PartitionSpec())
    names = var.get_metadata().get("logical_axes")
    shape = var.get_value().shape
    if names is None or len(names) != len(shape):
      # Stacked (scanned) layers prepend a 'layers' axis the names may not include.
      if names is not None and len(names) == len(shape) - 1:
        names = ("layers",) + tuple(names)
      else:
        return NamedSharding(mesh, PartitionSpec())
    spec = _divisible(logical_to_spec(names, rules, mesh), shape, mesh)
    return NamedSharding(mesh, spec)

  return jax.tree.map(one, abstract_state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
  """Sharding for a batch array: leading axis over the data-parallel axes."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh))
