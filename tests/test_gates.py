"""Delete gate: soft == hard when saturated, compaction/overflow, causality, controller.

Cached generation with the gate (compacted KV): tests/test_generate_families.py.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import rngs, tiny_model_config
from test_train import ROOT
from hat.config import ConfigError, DeleteGateConfig, GateConfig, MergeGateConfig, from_config_dict
from hat.data.layout import hat_batch_from_texts
from hat.models import build_model, gates

DOCS = [b"the quick brown fox jumps over the lazy dog. ", b"hello world, hi there you."]


def _batch(docs=DOCS):
  b = hat_batch_from_texts(docs, max_word_bytes=15, max_units=16, num_rows=6, row_len=16,
                           overflow="error")
  return {k: jnp.asarray(v) for k, v in b.items()}


def _model(layer=1, seed=0, **gate):
  cfg = tiny_model_config(gate=GateConfig(kind="delete",
                                          delete=DeleteGateConfig(layer=layer, **gate)))
  return build_model(cfg, vocab_size=259, rngs=rngs(seed), row_len=16)


@jax.jit
def _both(state, graphdef, batch):
  m = nnx.merge(graphdef, state)
  return m(batch), m(batch, hard=True)


def _saturate(model):
  """Gate weights so large that G is 0 or k at every word (about half each)."""
  model.gate.w[...] = model.gate.w[...] * 1e4
  model.gate.b[...] = jnp.zeros(())


def test_compact_indices_order_capacity_and_overflow():
  select = jnp.array([[0, 1, 1, 0, 1, 1], [1, 0, 0, 0, 0, 0]], bool)
  index, valid, overflow = gates.compact_indices(select, 3)
  np.testing.assert_array_equal(index, [[1, 2, 4], [0, 0, 0]])
  np.testing.assert_array_equal(valid, [[1, 1, 1], [1, 0, 0]])
  np.testing.assert_array_equal(overflow, [1, 0])
  np.testing.assert_array_equal(gates.slot_of(select)[0], [-1, 0, 1, 1, 2, 3])


def test_soft_and_hard_deletion_agree_when_gates_saturate():
  model = _model(seed=3)  # a seed whose saturated gate deletes some words and keeps others
  _saturate(model)
  batch = _batch()
  graphdef, state = nnx.split(model)
  (soft, aux), (hard, aux_h) = _both(state, graphdef, batch)
  g = np.asarray(model.gate_scores(model.encode(batch, {}).x_BxWxD, batch["unit_segment_BxW"],
                                   batch["unit_pos_BxW"])[1])
  real = np.asarray(batch["unit_segment_BxW"]) > 0
  assert np.all((np.abs(g) < 1e-6) | (np.abs(g - model.gate.k) < 1e-6))
  frac = float(aux["gate_deleted"] / aux["gate_units"])
  assert 0.2 < frac < 0.8 and float(aux["gate_units"]) == real.sum()
  mask = np.asarray(batch["target_mask_BxS"]) > 0
  diff = np.abs(np.asarray(soft) - np.asarray(hard))[mask]
  assert diff.max() < 1e-5, diff.max()
  assert float(aux_h["kv_overflow"]) == 0.0


def test_hard_deletion_overflow_is_counted():
  model = _model(capacity=2)
  model.gate.b[...] = jnp.full((), 50.0)  # nothing deleted: every word wants a K/V entry
  _, aux = model(_batch(), hard=True)
  real = np.asarray(_batch()["unit_segment_BxW"]) > 0
  assert float(aux["kv_overflow"]) == real.sum() - 2 * real.shape[0]


@pytest.mark.parametrize("hard", [False, True])
def test_gates_are_causal_over_words(hard):
  model = _model(seed=2)
  base = _batch(DOCS[:1])
  other = _batch([b"the quick brown fox jumps over the lazy cat. "])  # same layout
  graphdef, state = nnx.split(model)
  outs = [_both(state, graphdef, b)[int(hard)][0] for b in (base, other)]
  unit = np.asarray(base["slot_unit_BxS"][0])
  changed = int(np.nonzero(np.asarray(base["slot_ids_BxS"] != other["slot_ids_BxS"])[0])[0][0])
  earlier = (unit >= 0) & (np.arange(len(unit)) < changed)  # slots before the changed byte
  a, b = np.asarray(outs[0][0]), np.asarray(outs[1][0])
  np.testing.assert_allclose(a[earlier], b[earlier], atol=1e-6)
  assert not np.allclose(a[unit == unit[changed] + 1], b[unit == unit[changed] + 1])


def test_pi_controller_update_rule_and_state():
  c = gates.PIController(target=0.5, kp=0.5, ki=1e-5)
  assert c.update(0.2) == pytest.approx(0.1 * 0.5 * 0.3 + 1e-5 * 0.3)
  c.update(0.9)
  assert c.alpha == 0.0  # MrT5's floor: alpha is clipped at 0
  d = gates.PIController(target=0.5)
  d.load_state_dict(c.state_dict())
  assert d.state_dict() == c.state_dict()
  two = gates.PIController(target=0.5, kp=0.5, ki=1e-5, floor=None)
  two.update(0.2)
  assert two.update(0.9) < 0  # two-sided: over-deletion makes the regulariser keep words


def test_delete_gate_controller_is_two_sided_unless_configured():
  assert gates.delete_controller(GateConfig(kind="delete")).floor is None
  one_sided = GateConfig(kind="delete", delete=DeleteGateConfig(two_sided=False))
  assert gates.delete_controller(one_sided).floor == 0.0
  assert gates.merge_controller(GateConfig(kind="merge", merge=MergeGateConfig())).floor == 0.0


def test_gate_sgd_moves_gate_params_by_lr_times_gradient_and_others_by_adamw():
  from hat.config import resolve
  from hat.train.optim import gate_sgd_lr, is_gate_param, make_optimizer

  cfg = resolve(None, ["model.gate.kind=delete", "model.gate.delete.sgd_lr=0.64",
                       "model.backbone.d_model=64", "optim.warmup_steps=0", "optim.lr=0.1"])
  lr = gate_sgd_lr(cfg)
  assert lr == pytest.approx(0.01)
  params = {"gate": {"w": jnp.ones(3), "b": jnp.ones(())}, "head": jnp.ones(3)}
  grads = {"gate": {"w": jnp.array([1.0, -2.0, 4.0]), "b": jnp.array(0.5)},
           "head": jnp.array([1e-3, -5.0, 0.0])}
  tx = make_optimizer(cfg)
  updates, _ = tx.update(grads, tx.init(params), params)
  # The gate: plain SGD (a step proportional to the gradient, no decay).
  np.testing.assert_allclose(updates["gate"]["w"], -lr * np.array([1.0, -2.0, 4.0]), rtol=1e-6)
  np.testing.assert_allclose(updates["gate"]["b"], -lr * 0.5, rtol=1e-6)
  # Everything else: AdamW, whose first step is lr·(sign(g) + wd·p) whatever g's size.
  np.testing.assert_allclose(updates["head"][:2], [-0.1 * (1 + 0.1), -0.1 * (-1 + 0.1)],
                             rtol=1e-3)
  assert not is_gate_param(("backbone_lower", "gate"))
  assert gate_sgd_lr(resolve(None, ["model.gate.kind=delete", "model.gate.delete.sgd_lr=0"])) == 0.0
  assert gate_sgd_lr(resolve(None, [])) == 0.0  # no gate


def test_detached_gate_input_keeps_the_regulariser_out_of_the_lower_layers():
  batch = _batch()

  def lower_grad_norm(detach):
    model = _model(detach_input=detach)
    graphdef, state = nnx.split(model)

    def gate_loss(state):
      return nnx.merge(graphdef, state)(batch)[1]["gate_loss"]

    grads = jax.grad(gate_loss)(state)
    lower = sum(float(jnp.sum(jnp.abs(x))) for x in jax.tree.leaves(grads["backbone_lower"]))
    gate = sum(float(jnp.sum(jnp.abs(x))) for x in jax.tree.leaves(grads["gate"]))
    return lower, gate

  lower, gate = lower_grad_norm(True)
  assert lower == 0.0 and gate > 0
  lower, gate = lower_grad_norm(False)
  assert lower > 0 and gate > 0


def test_gate_config_is_validated():
  with pytest.raises(ConfigError, match="model.gate.delete.layer"):
    from_config_dict({"model": {"gate": {"kind": "delete", "delete": {"layer": 2}}}})
  with pytest.raises(ConfigError, match="model.gate.kind"):
    from_config_dict({"model": {"gate": {"kind": "drop"}}})


def test_controller_brings_the_deletion_ratio_to_target_in_real_training(tmp_path):
  """400 real training steps on the built-in corpus with the default gate recipe.

  The per-step ratio oscillates around delta, by how much depends on the initialisation
  (over the last 100 steps at this config: 0.37-0.65 for seed 1, 0.08-0.78 for seed 2,
  0.006-0.94 with a standard deviation of 0.24 for seed 0). The test holds the mean over the last 100 steps within ±0.02 of
  delta, and checks that the ratio neither stays at 0 nor collapses to 1 (what a clamped
  controller with AdamW-trained gate parameters does: every word deleted within ~20
  steps, when every step of the tail sits at 1): fewer than a quarter of those steps lie
  below 0.1 or above 0.9 (10 of 100 do at seed 0).
  """
  import json

  from test_train import TINY_OVERRIDES
  from hat.config import resolve
  from hat.train.loop import train

  over = [*TINY_OVERRIDES, "data.train=builtin", "model.backbone.num_layers=2",
          "model.gate.kind=delete", "model.gate.delete.layer=1",
          "model.gate.delete.target_ratio=0.5", "ckpt_every=0", "mesh=data=1", "steps=400", "optim.warmup_steps=20"]
  train(resolve(str(ROOT / "configs" / "tiny_hat.py"), over), tmp_path / "run",
        progress=False)
  recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  ratios = np.array([r["train/gate_ratio"] for r in recs if "train/gate_ratio" in r])
  assert len(ratios) == 400
  tail = ratios[-100:]
  assert abs(tail.mean() - 0.5) <= 0.02, tail.mean()
  extreme = np.mean((tail < 0.1) | (tail > 0.9))
  assert extreme < 0.25, (extreme, tail.min(), tail.max())


def test_gate_and_controller_state_survive_checkpoint_and_resume(tmp_path):
  import json

  import orbax.checkpoint as ocp

  from test_train import TINY_OVERRIDES, write_corpus
  from hat.config import resolve
  from hat.train import checkpoint as ckpt_lib
  from hat.train.loop import train

  corpus = write_corpus(tmp_path / "corpus.txt")
  over = [*TINY_OVERRIDES, f"data.train=text:{corpus}", "model.backbone.num_layers=2",
          "model.gate.kind=delete", "model.gate.delete.layer=1",
          "model.gate.delete.target_ratio=0.9",
          "ckpt_every=2", "mesh=data=1", "global_data_stream=false", "model.scan_layers=false"]
  workdir = tmp_path / "run"
  train(resolve(str(ROOT / "configs" / "tiny_hat.py"), [*over, "steps=4"]), workdir,
        progress=False)
  saved = ckpt_lib.read_run(workdir / "checkpoints" / "4")["gate_controller"]
  assert saved["alpha"] > 0 and saved["p"] > 0
  params = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "4" / "model")
  assert float(params["gate"]["b"]) != 1.0  # the gate bias trained away from its init
  train(resolve(str(ROOT / "configs" / "tiny_hat.py"), [*over, "steps=5"]), workdir,
        progress=False)
  recs = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  alpha_5 = [r["train/gate_alpha"] for r in recs if r.get("step") == 5 and
             "train/gate_alpha" in r]
  assert alpha_5 == [pytest.approx(saved["alpha"], rel=1e-6)]  # step 5 used the restored alpha
  assert "train/gate_ratio" in recs[-2] or any("train/gate_ratio" in r for r in recs)
