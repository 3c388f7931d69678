"""Same loss and gradients on one device and on a (data=2, fsdp=2, tensor=2) mesh of 8 CPUs.

Fake devices must be requested before jax starts, so the check runs in a subprocess
(this file run as a script); the rest of the suite keeps its single device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

MESH = "data=2,fsdp=2,tensor=2"


def _child() -> dict:
  """Runs in the subprocess: loss on one device vs on the 8-device mesh, per model kind."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from conftest import rngs, tiny_model_config
  from hat import sharding
  from hat.data.layout import hat_batch_from_texts, token_batch_from_texts
  from hat.models import build_model, loss_and_metrics, model_vocab_size
  from hat.text.tokenizers import ByteTokenizer

  assert len(jax.devices()) == 8
  docs = [b"the quick brown fox ", b"jumps over the lazy dog. ", b"hello world, hi there.",
          b"a b c d e f"]
  batches = {
      "hat": hat_batch_from_texts(docs, max_word_bytes=15, max_units=12, num_rows=4,
                                  row_len=16, overflow="error"),
      "byte": token_batch_from_texts(docs, ByteTokenizer(), max_tokens=32, overflow="error"),
  }
  mesh = sharding.make_mesh(MESH)
  out = {}
  for kind, batch in batches.items():
    cfg = tiny_model_config(kind, scan_layers=True)
    model = build_model(cfg, vocab_size=model_vocab_size(cfg), rngs=rngs(0), row_len=16)
    graphdef, state = nnx.split(model)

    def loss_fn(state, batch):
      return loss_and_metrics(nnx.merge(graphdef, state), batch)[0]

    # Gradients too for HAT (the interesting shardings); the token LM checks the loss only.
    if kind == "hat":
      value_and_grad = jax.jit(jax.value_and_grad(loss_fn))
    else:
      value_and_grad = jax.jit(lambda s, b: (loss_fn(s, b), {}))
    loss1, grads1 = value_and_grad(state, {k: jnp.asarray(v) for k, v in batch.items()})
    with jax.set_mesh(mesh):
      shardings = sharding.state_shardings(state, mesh)
      state_sh = jax.device_put(state, shardings)
      batch_sh = {k: jax.device_put(v, sharding.batch_sharding(mesh, np.ndim(v)))
                  for k, v in batch.items()}
      loss8, grads8 = value_and_grad(state_sh, batch_sh)
    specs = [s.spec for s in jax.tree.leaves(shardings)]
    grad_err = max([float(jnp.max(jnp.abs(a - np.asarray(b))))
                    for a, b in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads8))] or [0.0])
    out[kind] = {"loss1": float(loss1), "loss8": float(loss8), "grad_err": grad_err,
                 "sharded_params": sum(any(e is not None for e in s) for s in specs),
                 "num_params": len(specs)}
  return out


def test_same_loss_on_one_and_eight_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  here = os.path.dirname(os.path.abspath(__file__))
  env["PYTHONPATH"] = os.pathsep.join([here, os.path.dirname(here),
                                       env.get("PYTHONPATH", "")])
  proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  results = json.loads(proc.stdout.strip().splitlines()[-1])
  for kind, r in results.items():
    assert abs(r["loss1"] - r["loss8"]) < 1e-5, (kind, r)
    assert r["grad_err"] < 1e-5, (kind, r)
    assert r["sharded_params"] > r["num_params"] // 2, (kind, r)


if __name__ == "__main__":
  print(json.dumps(_child()))
