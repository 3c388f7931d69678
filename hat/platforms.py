"""Keep jax from probing for a TPU on machines that have none.

With libtpu installed (the `aot` extra, for `tools/aot_compile.py`), jax tries to start
the TPU runtime on every machine; without a chip, libtpu prints `Failed to find host
bounds...`, `unexpected worker hostname` and a "Source Location Trace" before jax falls
back to the CPU. `skip_absent_tpu()` (run by `import hat`, before any backend starts)
sets `JAX_PLATFORMS` to the platforms that are there when it is unset, libtpu is
installed and no TPU is attached. It never overrides a `JAX_PLATFORMS` the user set, and
compiling for a TPU topology (`jax.experimental.topologies`) loads libtpu on its own, so
ahead-of-time compilation on a CPU machine keeps working.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pathlib
import sys
from typing import MutableMapping

_GOOGLE_PCI_VENDOR = "0x1ae0"  # what jax looks for (jax._src.hardware_utils)
_NVIDIA_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")
# Env set by TPU launchers and by users who configure libtpu by hand (jax itself sets
# TPU_LIBRARY_PATH and TPU_SKIP_MDS_QUERY on import, so those say nothing).
_TPU_ENV = ("JAX_FORCE_TPU_INIT", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES")


def _installed(*modules: str) -> bool:
  for name in modules:
    try:
      if importlib.util.find_spec(name) is not None:
        return True
    except (ImportError, ValueError):
      continue
  return False


def tpu_attached() -> bool:
  """A Google PCI device or a TPU device node: a TPU may be there, let jax look."""
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      if pathlib.Path(vendor).read_text().strip() == _GOOGLE_PCI_VENDOR:
        return True
    except OSError:
      continue
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def platforms_without_tpu() -> str | None:
  """The JAX_PLATFORMS value for this machine's non-TPU devices; None: leave jax to look."""
  if any(os.path.exists(d) for d in _NVIDIA_DEVICES):
    # Without the CUDA plugin, jax's own warning ("a GPU may be present...") is useful.
    return "cuda,cpu" if _installed("jax_cuda12_plugin", "jax_cuda13_plugin") else None
  if os.path.exists("/dev/kfd"):
    return "rocm,cpu" if _installed("jax_rocm7_plugin", "jax_rocm60_plugin") else None
  return "cpu"


def skip_absent_tpu(environ: MutableMapping[str, str] = os.environ) -> str | None:
  """Sets JAX_PLATFORMS when libtpu is installed but no TPU is attached; returns the value."""
  if "JAX_PLATFORMS" in environ or any(k in environ for k in _TPU_ENV):
    return None
  if not _installed("libtpu") or tpu_attached():
    return None
  platforms = platforms_without_tpu()
  if platforms is None:
    return None
  environ["JAX_PLATFORMS"] = platforms  # child processes (launch/local.py, tests) too
  if "jax" in sys.modules and environ is os.environ:
    sys.modules["jax"].config.update("jax_platforms", platforms)  # imported before hat
  return platforms
