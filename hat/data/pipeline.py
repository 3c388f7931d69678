"""The training and evaluation input pipelines (grain), and batch statistics.

Training, per process:

  source documents --shard(process)--> seed.shuffle.repeat --mix(weights)-->
  to_iter_dataset --windows(window_bytes)--> layout (1 or 2 sequences per window)
  --batch(batch_size / process_count)--> [mp_prefetch(num_workers)]

Everything is deterministic given `data.seed`, and the iterator's `get_state()` /
`set_state()` restore it to yield exactly the next batch (grain's orbax handlers
`grain.checkpoint.CheckpointSave/Restore` store that state with the model).

Evaluation is a finite, unshuffled pass over a validation split. Every process walks the
same global sequence stream and keeps its own slice of each global batch, so all
processes run the same number of eval steps; the last batch is padded with empty
sequences (zero target mask).
"""

from __future__ import annotations

import bisect
from typing import Any, Callable, Iterator, Sequence

import grain
import numpy as np

from hat.data import layout as layout_lib
from hat.data import sources as sources_lib
from hat.family import family_of
from hat.data.windows import FlatMapIterDataset, WindowIterDataset
from hat.text import codec
from hat.text.splitter import Splitter

Batch = dict[str, np.ndarray]
# Reading a document is cheap next to splitting and layout; grain's default 500-element
# read-ahead costs more in bookkeeping per element than it saves.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=16)


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  return process_index, process_count


def _local_batch_size(cfg, process_count: int) -> int:
  if cfg.data.batch_size % process_count:
    raise ValueError(f"data.batch_size={cfg.data.batch_size} is not divisible by the "
                     f"{process_count} processes")
  return cfg.data.batch_size // process_count


def default_tokenizer(cfg):
  """The tokenizer the run's family needs (None for word-level HAT)."""
  return family_of(cfg).load_tokenizer(cfg)


def make_layout(cfg, tokenizer=None) -> Callable[[Sequence[layout_lib.Segment]], list[Batch]]:
  """The window -> sequences function of the run's family."""
  return family_of(cfg).layout_fn(cfg, tokenizer)


def _splitter(cfg) -> Splitter:
  return Splitter(cfg.data.splitter, cfg.data.max_word_bytes)


def _absl_flags_parsed() -> None:
  # Grain's worker processes read absl flags, which are unparsed outside absl.app.
  from absl import flags  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_train_dataset(cfg, tokenizer=None, *, process_index: int | None = None,
                       process_count: int | None = None, layout=None) -> grain.IterDataset:
  """The infinite training IterDataset of this process (batches of local size)."""
  pi, pc = _processes(process_index, process_count)
  local_bs = _local_batch_size(cfg, pc)
  specs = sources_lib.parse_mixture(cfg.data.train)
  parts = []
  for i, spec in enumerate(specs):
    src = sources_lib.open_from_config(cfg.data, spec, "train")
    ds = grain.MapDataset.source(src)[pi::pc]  # each process reads a disjoint shard
    if len(ds) == 0:
      raise sources_lib.SourceError(f"{spec}: {len(src)} training documents cannot feed "
                                    f"shard {pi} of {pc} processes")
    # Distinct seeds: equally long sources would otherwise be shuffled alike.
    parts.append(ds.seed(cfg.data.seed + 7919 * i).shuffle().repeat())
  if len(parts) == 1:
    docs = parts[0]
  else:
    docs = grain.MapDataset.mix(parts, [s.weight for s in specs])
  ds = WindowIterDataset(docs.to_iter_dataset(_READ_OPTIONS), _splitter(cfg).split,
                         cfg.data.window_bytes)
  ds = FlatMapIterDataset(ds, layout or make_layout(cfg, tokenizer))
  ds = ds.batch(local_bs, drop_remainder=True)
  if cfg.data.num_workers > 0:
    _absl_flags_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.data.num_workers))
  return ds


def make_train_iterator(cfg, tokenizer=None, *, process_index: int | None = None,
                        process_count: int | None = None, layout=None):
  """Infinite iterator of local batches; supports get_state()/set_state()."""
  return iter(make_train_dataset(cfg, tokenizer, process_index=process_index,
                                 process_count=process_count, layout=layout))


class _Concat:
  """Random-access concatenation of document sources (an eval mixture)."""

  def __init__(self, parts: Sequence[Any]):
    self._parts = list(parts)
    self._ends = np.cumsum([len(p) for p in self._parts]).tolist()

  def __len__(self) -> int:
    return self._ends[-1] if self._ends else 0

  def __getitem__(self, index: int) -> bytes:
    k = bisect.bisect_right(self._ends, index)
    return self._parts[k][index - (self._ends[k - 1] if k else 0)]


def eval_spec(cfg, name_or_spec: str) -> str:
  """Resolves an eval set name from `data.eval` (or returns a spec unchanged)."""
  sets = sources_lib.parse_eval_sets(cfg.data.eval, cfg.data.train)
  if name_or_spec not in sets and ":" not in name_or_spec and name_or_spec != "builtin":
    raise sources_lib.SourceError(f"eval set {name_or_spec!r}: not a set of this run "
                                  f"({', '.join(sorted(sets))}) nor a source spec")
  return sets.get(name_or_spec, name_or_spec)


def validation_documents(cfg, name_or_spec: str) -> _Concat:
  """All validation documents of an eval set, in their stored order."""
  specs = sources_lib.parse_mixture(eval_spec(cfg, name_or_spec))
  return _Concat([sources_lib.open_from_config(cfg.data, s, "validation") for s in specs])


def empty_sequence(template: Batch, tokenizer=None) -> Batch:
  """A sequence that contributes nothing: no units/tokens, zero target mask."""
  pad_token = getattr(tokenizer, "pad_id", 0)
  fill = {"slot_ids_BxS": codec.PAD_ID, "targets_BxS": codec.PAD_ID, "slot_unit_BxS": -1,
          "tokens_BxT": pad_token, "targets_BxT": pad_token}
  return {k: np.full_like(v, fill.get(k, 0)) for k, v in template.items()}


def make_eval_iterator(cfg, name_or_spec: str = "valid", tokenizer=None, *,
                       process_index: int | None = None, process_count: int | None = None,
                       max_batches: int | None = None, layout=None) -> Iterator[Batch]:
  """Finite deterministic pass over a validation split, as local batches."""
  pi, pc = _processes(process_index, process_count)
  local_bs = _local_batch_size(cfg, pc)
  global_bs = cfg.data.batch_size
  if tokenizer is None:
    tokenizer = default_tokenizer(cfg)
  layout = layout or make_layout(cfg, tokenizer)
  docs = validation_documents(cfg, name_or_spec)
  windows = WindowIterDataset(grain.MapDataset.source(docs).to_iter_dataset(_READ_OPTIONS),
                              _splitter(cfg).split, cfg.data.window_bytes)
  seqs = FlatMapIterDataset(windows, layout)

  def generate():
    pending: list[Batch] = []
    emitted = 0
    for seq in seqs:
      pending.append(seq)
      if len(pending) == global_bs:
        yield layout_lib.stack(pending[pi * local_bs:(pi + 1) * local_bs])
        pending, emitted = [], emitted + 1
        if max_batches is not None and emitted >= max_batches:
          return
    if pending:
      pending += [empty_sequence(pending[0], tokenizer)] * (global_bs - len(pending))
      yield layout_lib.stack(pending[pi * local_bs:(pi + 1) * local_bs])

  return generate()


def global_batch(local_batch: Batch, mesh) -> dict[str, Any]:
  """Assembles global jax arrays from every process's local batch (leading axis B)."""
  import jax  # pylint: disable=g-import-not-at-top

  from hat.sharding import batch_sharding  # pylint: disable=g-import-not-at-top

  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

  return {k: one(v) for k, v in local_batch.items()}


def batch_stats(batch: Batch) -> dict[str, float]:
  """Real bytes, words/tokens, slot/unit/token utilisation and overflow of a batch."""
  b = {k: np.asarray(v) for k, v in batch.items()}
  out: dict[str, float] = {"sequences": int(b["num_bytes_B"].shape[0]),
                           "bytes": int(b["num_bytes_B"].sum())}
  if "slot_ids_BxS" in b:
    used = b["slot_unit_BxS"] >= 0
    out["words"] = int(((b["slot_pos_BxS"] == 0) & (b["slot_ids_BxS"] == codec.W_ID)
                        & used).sum())
    out["units"] = int(b["num_units_B"].sum())
    out["slot_util"] = float(used.mean())
    out["byte_slot_util"] = float((used & (b["slot_ids_BxS"] < 256)).mean())
    out["unit_util"] = float(b["num_units_B"].mean() / b["unit_segment_BxW"].shape[-1])
    out["bytes_per_word"] = out["bytes"] / max(out["words"], 1)
  if "tokens_BxT" in b:
    real = b["segment_BxT"] > 0
    out["tokens"] = int(real.sum())
    out["token_util"] = float(real.mean())
    out["text_tokens"] = int(real.sum() - (real & (b["pos_BxT"] == 0)).sum())  # no BOS
    out["bytes_per_token"] = out["bytes"] / max(out["text_tokens"], 1)
  if "overflow_B" in b:
    out["overflow"] = int(b["overflow_B"].sum())
  return out


def summarize_stats(stats: list[dict]) -> dict[str, float]:
  """Totals and means over a list of `batch_stats` dicts."""

  def total(k):
    return sum(s.get(k, 0) for s in stats)

  seqs = total("sequences")
  out = {"batches": len(stats), "sequences": seqs, "bytes": total("bytes"),
         "overflow_sequences": total("overflow")}
  if "words" in stats[0]:
    out.update(bytes_per_word=total("bytes") / max(total("words"), 1),
               words_per_sequence=total("words") / seqs,
               slot_util=float(np.mean([s["slot_util"] for s in stats])),
               byte_slot_util=float(np.mean([s["byte_slot_util"] for s in stats])),
               unit_util=float(np.mean([s["unit_util"] for s in stats])))
  if "tokens" in stats[0]:
    out.update(bytes_per_token=total("bytes") / max(total("text_tokens"), 1),
               token_util=float(np.mean([s["token_util"] for s in stats])))
  return out
