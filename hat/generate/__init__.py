"""Sampling text from a model of any family, with KV caches and decoding on the device.

    python -m hat.generate --workdir runs/demo --prompt "The quick bro" --max-new-bytes 200

- `sampling`: options, greedy / temperature / top-k / top-p, per-row keys, stop strings.
- `rules`: which symbols may be sampled when (written once for every sampler).
- `device`: the shared device loop (chunks of ticks in a `lax.while_loop`) and host driver.
- `hat_sampler` (plain and delete-gated HAT), `merge_sampler`, `token_sampler` (BPE, byte
  LM): one cached sampler per family behind one interface, `generate_batch(prompts, opts)`
  and `generate(prompt, opts)`.
- `reference`: uncached samplers (a full forward pass per symbol), the test oracle.

The family registry (`hat.family`) names each family's sampler; `make_sampler` asks it.
"""

from __future__ import annotations

from hat.family import family_of
from hat.generate.hat_sampler import HATSampler
from hat.generate.merge_sampler import MergeSampler
from hat.generate.reference import ReferenceHATSampler, ReferenceTokenSampler
from hat.generate.sampling import SampleOptions, pick, sample_on_device
from hat.generate.token_sampler import TokenSampler

__all__ = ["HATSampler", "MergeSampler", "ReferenceHATSampler", "ReferenceTokenSampler",
           "SampleOptions", "TokenSampler", "make_sampler", "pick", "sample_on_device"]


def make_sampler(model, cfg, tokenizer=None, *, cached: bool = True, **kwargs):
  """The family's cached sampler (or, with cached=False, its uncached reference)."""
  return family_of(cfg).make_sampler(model, cfg, tokenizer, cached=cached, **kwargs)
