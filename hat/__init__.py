"""HAT: hierarchical autoregressive byte/word language models with BPE baselines."""

from hat import platforms as _platforms

__version__ = "0.1.0"

# Before any jax backend starts: no libtpu probing (and its errors) on TPU-less machines.
_platforms.skip_absent_tpu()
