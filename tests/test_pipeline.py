"""The grain training and evaluation pipelines."""

import collections

import numpy as np
import pytest

from hat import config
from hat.data import pipeline
from hat.text import codec

NUM_DOCS = 60


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """One word per document ("w0007 "), so decoded units identify documents."""
  root = tmp_path_factory.mktemp("corpus")
  (root / "a.txt").write_text("\n".join(f"a{i:04d}" for i in range(NUM_DOCS)) + "\n")
  (root / "b.txt").write_text("\n".join(f"b{i:04d}" for i in range(NUM_DOCS)) + "\n")
  (root / "prose.txt").write_text(
      "\n\n".join(" ".join(f"word{j}{'!' * (j % 4)}" for j in range(i % 40 + 1))
                  for i in range(80)))
  return root, tmp_path_factory.mktemp("cache")


def _cfg(corpus, train, **data):
  root, cache = corpus
  overrides = {"train": train.format(root=root), "cache_dir": str(cache), "doc_mode": "line",
               "validation_fraction": 0.1, "window_bytes": 24, "max_units": 8,
               "num_rows": 2, "row_len": 32, "max_word_bytes": 8, "batch_size": 4}
  overrides.update(data)
  cd = config.default_config_dict()
  for k, v in overrides.items():
    cd.data[k] = v
  return config.from_config_dict(cd)


def _words(batch):
  """Texts of the word units of a HAT batch, in order."""
  out = []
  for ids, pos, unit in zip(batch["slot_ids_BxS"], batch["slot_pos_BxS"],
                            batch["slot_unit_BxS"]):
    units = collections.defaultdict(bytearray)
    is_word = set(unit[(pos == 0) & (ids == codec.W_ID)].tolist())
    for i, p, u in zip(ids.tolist(), pos.tolist(), unit.tolist()):
      if u in is_word and p > 0:
        units[u].append(i)
    out += [bytes(units[u]).decode() for u in sorted(units)]
  return out


def _same(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_state_restore_yields_exactly_the_next_batch(corpus):
  cfg = _cfg(corpus, "text:{root}/prose.txt", doc_mode="blank_line", window_bytes=60,
             max_units=12, num_rows=3)
  it = pipeline.make_train_iterator(cfg, process_index=0, process_count=1)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  fresh = pipeline.make_train_iterator(cfg, process_index=0, process_count=1)
  fresh.set_state(state)
  assert all(_same(e, next(fresh)) for e in expected)
  assert sum(pipeline.batch_stats(e)["overflow"] for e in expected) > 0  # carry covered


def test_shards_are_disjoint_and_cover_the_training_split(corpus):
  cfg = _cfg(corpus, "text:{root}/a.txt")
  seen = []
  for pi in range(2):
    it = pipeline.make_train_iterator(cfg, process_index=pi, process_count=2)
    words = []
    while len(words) < NUM_DOCS:
      words += _words(next(it))
    n_train = len(set(words))  # the shard's first epoch, then it repeats
    assert len(words[:n_train]) == len(set(words[:n_train]))
    seen.append(set(words[:n_train]))
  val = pipeline.validation_documents(cfg, "valid")
  val_words = {val[i].decode() for i in range(len(val))}
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] | val_words == {f"a{i:04d}" for i in range(NUM_DOCS)}
  assert not (seen[0] | seen[1]) & val_words


def test_mixture_weights_are_respected(corpus):
  cfg = _cfg(corpus, "text:{root}/a.txt=3,text:{root}/b.txt=1")
  it = pipeline.make_train_iterator(cfg, process_index=0, process_count=1)
  words = []
  for _ in range(25):
    words += _words(next(it))
  share = sum(w.startswith("a") for w in words) / len(words)
  assert 0.68 < share < 0.82, share


def test_eval_is_finite_and_covers_validation_once(corpus):
  cfg = _cfg(corpus, "text:{root}/a.txt", batch_size=4)
  val = pipeline.validation_documents(cfg, "valid")
  expected = sorted(val[i].decode() for i in range(len(val)))
  per_process = []
  for pi in range(2):
    batches = list(pipeline.make_eval_iterator(cfg, "valid", process_index=pi,
                                               process_count=2))
    assert all(b["slot_ids_BxS"].shape[0] == 2 for b in batches)
    per_process.append(batches)
  assert len(per_process[0]) == len(per_process[1])  # processes stay in lockstep
  words = [w for batches in per_process for b in batches for w in _words(b)]
  assert sorted(words) == expected
  last = per_process[1][-1]
  empty = last["num_units_B"] == 0
  assert (last["target_mask_BxS"][empty] == 0).all()


def test_token_layout_pipeline(corpus):
  cfg = _cfg(corpus, "text:{root}/prose.txt", doc_mode="blank_line", max_tokens=32)
  cfg = config.from_config_dict({**config.to_dict(cfg), "model": {
      **config.to_dict(cfg)["model"], "kind": "byte"}})
  it = pipeline.make_train_iterator(cfg, process_index=0, process_count=1)
  batch = next(it)
  assert batch["tokens_BxT"].shape == (4, 32)
  stats = pipeline.batch_stats(batch)
  assert stats["bytes"] > 0 and 0 < stats["token_util"] <= 1
  state = it.get_state()
  nxt = next(it)
  it.set_state(state)
  assert _same(nxt, next(it))
  evals = list(pipeline.make_eval_iterator(cfg, "valid", process_index=0, process_count=1))
  assert evals and evals[-1]["tokens_BxT"].shape == (4, 32)


def test_global_batch_and_stats(corpus):
  import jax  # pylint: disable=g-import-not-at-top

  from hat.sharding import make_mesh  # pylint: disable=g-import-not-at-top

  cfg = _cfg(corpus, "text:{root}/prose.txt", doc_mode="blank_line")
  local = next(pipeline.make_train_iterator(cfg))
  batch = pipeline.global_batch(local, make_mesh("data=-1", jax.devices()[:1]))
  assert batch["slot_ids_BxS"].shape == local["slot_ids_BxS"].shape
  np.testing.assert_array_equal(np.asarray(batch["targets_BxS"]), local["targets_BxS"])
  stats = pipeline.batch_stats(local)
  assert stats["words"] > 0 and 0 < stats["byte_slot_util"] < stats["slot_util"] <= 1
  assert stats["bytes"] == int(local["num_bytes_B"].sum())
