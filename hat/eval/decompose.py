"""Where a model loses bits: its NLL on a text attributed to whitespace words, bucketed.

Each run scores the same documents exactly as `hat.evaluate` does (the run's windows,
layout and batch size; one jit-compiled forward pass per fixed-size batch), and every
predicted symbol's NLL is attributed to a *whitespace word*: a run of non-whitespace bytes
plus the whitespace after it (HAT's `whitespace` splitter without a length cap; whitespace
at the very start of a document is a word of its own). The same words for every model:

- HAT: a byte's NLL belongs to the word holding the byte; a `[W]` to the word holding the
  last byte of the unit it ends (under the `unicode` splitter or a length cap a word may
  own several); `[S]` to the last word of its document.
- token models (BPE, byte LM): a token's NLL is split across the words whose bytes it
  spells, in proportion to the number of its bytes in each: `' the'` after `'cat'` gives
  1/4 of its NLL to `'cat '` (the space) and 3/4 to `'the '`. EOS belongs to the last word
  of its document (BOS is never a target).

So the word NLLs add up to the model's total NLL over the text, and their sum over the
text's bytes is the bpb `hat.evaluate` reports on the same text. Each word's NLL is kept
in four parts: `first` (HAT: the word's first byte; tokens: the share of the token that
spells the word's first byte), `later` (the rest of its bytes / tokens), `word_end`
(`[W]`; for tokens, zero-byte tokens other than EOS, normally none) and `doc_end` (`[S]`
or EOS).

Words are then bucketed (training-set frequency, length, case, digits, punctuation) and
each bucket's bpb, ratio and share of the gap between two runs reported
(`hat.eval.decompose_report` writes the files).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hat.cli import UserError
from hat.data import layout as layout_lib
from hat.data.windows import windows_of
from hat.family import family_of
from hat.text.codec import S_ID, W_ID
from hat.text.splitter import Splitter
from hat.eval.word_buckets import GROUPS, FrequencyRanks, bucket_indices

WORD_RULE = ("word: a run of non-whitespace bytes plus the whitespace after it; a token's "
             "NLL is split over the words whose bytes it spells, in proportion to its bytes "
             "in each; [W], [S] and EOS belong to the word they end")
PARTS = ("first", "later", "word_end", "doc_end")
PART_LABELS = {"bytes": {"first": "first byte", "later": "later bytes", "word_end": "[W]",
                         "doc_end": "[S]"},
               "tokens": {"first": "first token", "later": "later tokens",
                          "word_end": "other zero-byte tokens", "doc_end": "EOS"}}
_WORD_SPLITTER = Splitter("whitespace", 1 << 40)  # the analysis words: never cut


# ------------------------------------------------------------------------ the text


@dataclasses.dataclass(frozen=True)
class Words:
  """The whitespace words of the scored documents, as offsets into their concatenation."""

  data: bytes
  starts_W: np.ndarray
  lens_W: np.ndarray
  doc_W: np.ndarray

  def __len__(self) -> int:
    return len(self.lens_W)

  def word_of_byte(self) -> np.ndarray:
    """Index of the word holding each byte of `data` (int64, len(data))."""
    return np.repeat(np.arange(len(self.lens_W)), self.lens_W)

  def word(self, i: int) -> bytes:
    """Bytes of word `i`, trailing whitespace included."""
    s = int(self.starts_W[i])
    return self.data[s:s + int(self.lens_W[i])]

  def stripped(self) -> list[bytes]:
    """Every word without its whitespace."""
    return [self.word(i).strip() for i in range(len(self))]


def text_words(docs: Sequence[bytes]) -> Words:
  """The whitespace words of non-empty documents (scored in this order, concatenated)."""
  ends, doc_ids, base = [], [], 0
  for d, doc in enumerate(docs):
    e = _WORD_SPLITTER.split_with_offsets(doc)
    ends.append(e + base)
    doc_ids.append(np.full(len(e), d))
    base += len(doc)
  ends_W = np.concatenate(ends) if ends else np.zeros(0, np.int64)
  starts_W = np.concatenate([[0], ends_W[:-1]]).astype(np.int64)
  return Words(b"".join(docs), starts_W, (ends_W - starts_W).astype(np.int64),
               np.concatenate(doc_ids) if doc_ids else np.zeros(0, np.int64))


def select_documents(docs: Iterable[bytes], max_bytes: int | None = None) -> list[bytes]:
  """Non-empty documents in order, whole, while they fit in `max_bytes` (None: all).

  If not even the first fits, it is cut after its last whole word within the cap.
  """
  out, used = [], 0
  for doc in docs:
    doc = bytes(doc)
    if not doc:
      continue  # the eval pipeline drops empty documents too
    if max_bytes is not None and used + len(doc) > max_bytes:
      if not out:
        ends = _WORD_SPLITTER.split_with_offsets(doc)
        keep = ends[ends <= max_bytes]
        if not len(keep):
          raise UserError(f"--max-bytes={max_bytes} holds not even the first word of the text")
        out.append(doc[:int(keep[-1])])
      break
    out.append(doc)
    used += len(doc)
  if not out:
    raise UserError("the text to score is empty")
  return out


def eval_documents(cfg, name_or_spec: str, max_bytes: int | None = None) -> list[bytes]:
  """The validation documents of a run's eval set (what `hat.evaluate --eval` scores)."""
  from hat.data.pipeline import validation_documents  # pylint: disable=g-import-not-at-top

  docs = validation_documents(cfg, name_or_spec)
  return select_documents((docs[i] for i in range(len(docs))), max_bytes)


def file_documents(path, doc_mode: str = "blank_line", max_bytes: int | None = None
                   ) -> list[bytes]:
  """A text file (local or gs://) cut into documents as `text:` sources cut it."""
  from hat import storage  # pylint: disable=g-import-not-at-top
  from hat.data.tfds_text import split_documents  # pylint: disable=g-import-not-at-top

  return select_documents(split_documents(storage.path(path).read_bytes(), doc_mode),
                          max_bytes)


def training_documents(cfg, spec: str | None = None) -> Iterable[bytes]:
  """Documents of the train split of `spec` (a source spec or a plain path; default: the
  run's `data.train`), source after source, in stored order."""
  from hat.data import sources  # pylint: disable=g-import-not-at-top

  spec = spec or cfg.data.train
  if not spec.startswith(("text:", "tfds:", "builtin")):
    spec = f"text:{spec}"  # a plain file or folder, read as the trainer reads text:
  for s in sources.parse_mixture(spec):
    src = sources.open_from_config(cfg.data, s, "train")
    for i in range(len(src)):
      yield src[i]


# ------------------------------------------------------------------------- scoring


def _nll_function(model: nnx.Module, targets_key: str):
  graphdef, state = nnx.split(model)

  @jax.jit
  def nll(state, batch):
    # The evaluator's formula (hat.models.losses.metrics_from_logits), kept per position.
    logits_BxLxV = nnx.merge(graphdef, state)(batch)[0].astype(jnp.float32)
    lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    target_BxL = jnp.take_along_axis(logits_BxLxV, batch[targets_key][..., None], axis=-1)
    return lse_BxL - target_BxL[..., 0]

  return lambda batch: nll(state, {k: jnp.asarray(v) for k, v in batch.items()})


def symbol_stream(model: nnx.Module, cfg, tokenizer, docs: Sequence[bytes], *,
                  batch_size: int | None = None, progress: bool = True,
                  desc: str = "") -> tuple[np.ndarray, np.ndarray]:
  """(targets_N, nll_N): every counted target of the run on `docs` in text order, in nats."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  from hat.data.pipeline import empty_sequence  # pylint: disable=g-import-not-at-top

  family = family_of(cfg)
  key, mask_key = ("targets_BxS", "target_mask_BxS") if family.words else \
      ("targets_BxT", "target_mask_BxT")
  layout = family.layout_fn(cfg, tokenizer)
  split = Splitter(cfg.data.splitter, cfg.data.max_word_bytes).split
  nll_fn = _nll_function(model, key)
  bs = batch_size or cfg.data.batch_size
  out_t, out_n = [], []
  bar = tqdm(total=sum(map(len, docs)), unit="B", unit_scale=True, desc=desc or family.name,
             disable=not progress)
  lagged: list[tuple[Any, dict]] = []

  def fetch():
    # One batch in flight: the host lays out the next batch while this one runs.
    nll, batch = lagged.pop()
    mask = batch[mask_key].astype(bool)  # row-major: rows in order, slots in text order
    out_t.append(batch[key][mask])
    out_n.append(np.asarray(nll, np.float64)[mask])
    bar.update(int(batch["num_bytes_B"].sum()))

  def run(rows):
    rows = rows + [empty_sequence(rows[0], tokenizer)] * (bs - len(rows))
    batch = layout_lib.stack(rows)
    nll = nll_fn(batch)
    if lagged:
      fetch()
    lagged.append((nll, batch))

  pending = []
  for window in windows_of(docs, split, cfg.data.window_bytes):
    for seq in layout(window):
      pending.append(seq)
      if len(pending) == bs:
        run(pending)
        pending = []
  if pending:
    run(pending)
  if lagged:
    fetch()
  bar.close()
  return np.concatenate(out_t).astype(np.int64), np.concatenate(out_n)


# --------------------------------------------------------------------- attribution


@dataclasses.dataclass(frozen=True)
class Attribution:
  """One model's NLL (nats) per word, by where in the word it was paid (see PARTS)."""

  kind: str  # "bytes" (HAT) or "tokens"
  parts: dict[str, np.ndarray]  # PARTS -> float64 per word
  total_nll: float  # the sum over every counted target (the evaluator's nll_sum)
  num_targets: int

  @property
  def total_W(self) -> np.ndarray:
    """Each word's whole NLL."""
    return sum(self.parts[p] for p in PARTS)


def _owner_before(words: Words, bytes_before: np.ndarray) -> np.ndarray:
  """The word holding the byte just before each zero-byte symbol (the word it ends)."""
  return words.word_of_byte()[np.maximum(bytes_before - 1, 0)]


def attribute_hat(words: Words, targets_N: np.ndarray, nll_N: np.ndarray) -> Attribution:
  """HAT targets (bytes, [W], [S] in text order) -> per-word NLL parts."""
  is_byte = targets_N < 256
  if targets_N[is_byte].astype(np.uint8).tobytes() != words.data:
    raise ValueError("the HAT byte targets do not spell the scored text")
  byte_nll = nll_N[is_byte]
  first = np.zeros(len(words.data), bool)
  first[words.starts_W] = True
  parts = {p: np.zeros(len(words)) for p in PARTS}
  if len(words):
    parts["first"] = byte_nll[words.starts_W].copy()
    parts["later"] = np.add.reduceat(np.where(first, 0.0, byte_nll), words.starts_W)
  marks = ~is_byte
  owner = _owner_before(words, np.cumsum(is_byte)[marks])
  kinds = targets_N[marks]
  if not np.isin(kinds, (W_ID, S_ID)).all():
    raise ValueError(f"unexpected HAT target ids {sorted(set(kinds.tolist()) - {W_ID, S_ID})}")
  np.add.at(parts["word_end"], owner[kinds == W_ID], nll_N[marks][kinds == W_ID])
  np.add.at(parts["doc_end"], owner[kinds == S_ID], nll_N[marks][kinds == S_ID])
  return Attribution("bytes", parts, float(nll_N.sum()), len(nll_N))


def token_byte_lengths(tokenizer, vocab_size: int) -> np.ndarray:
  """Bytes each token id spells (0 for BOS/EOS/PAD and other specials)."""
  return np.asarray([len(tokenizer.decode([i])) for i in range(vocab_size)], np.int64)


def split_token_nll(lens_N: np.ndarray, nll_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(nll per byte, token index per byte): each token's NLL spread evenly over its bytes.

  Summing the per-byte NLL over a word's bytes is the proportional rule: a token gives
  each word the fraction of its NLL that its bytes in that word are of all its bytes.
  """
  has = lens_N > 0
  per_byte = np.repeat(nll_N[has] / lens_N[has], lens_N[has])
  return per_byte, np.repeat(np.flatnonzero(has), lens_N[has])


def attribute_tokens(words: Words, targets_N: np.ndarray, nll_N: np.ndarray, tokenizer,
                     lens_V: np.ndarray) -> Attribution:
  """Token targets (text order, EOS at document ends) -> per-word NLL parts."""
  if tokenizer.decode(targets_N.tolist()) != words.data:
    raise ValueError("the token targets do not spell the scored text")
  lens_N = lens_V[targets_N]
  per_byte, tok_of_byte = split_token_nll(lens_N, nll_N)
  word_of_byte = words.word_of_byte()
  # The token that spells a word's first byte; its share in the word is the "first" part.
  first = tok_of_byte == tok_of_byte[words.starts_W][word_of_byte]
  parts = {p: np.zeros(len(words)) for p in PARTS}
  if len(words):
    parts["first"] = np.add.reduceat(np.where(first, per_byte, 0.0), words.starts_W)
    parts["later"] = np.add.reduceat(np.where(first, 0.0, per_byte), words.starts_W)
  zero = lens_N == 0
  owner = _owner_before(words, np.cumsum(lens_N)[zero])
  eos = targets_N[zero] == tokenizer.eos_id
  np.add.at(parts["doc_end"], owner[eos], nll_N[zero][eos])
  np.add.at(parts["word_end"], owner[~eos], nll_N[zero][~eos])
  return Attribution("tokens", parts, float(nll_N.sum()), len(nll_N))


def attribute_run(model: nnx.Module, cfg, tokenizer, docs: Sequence[bytes], words: Words, *,
                  batch_size: int | None = None, progress: bool = True,
                  desc: str = "") -> Attribution:
  """Scores `docs` with one run and attributes its NLL to `words` (= text_words(docs))."""
  targets, nll = symbol_stream(model, cfg, tokenizer, docs, batch_size=batch_size,
                               progress=progress, desc=desc)
  family = family_of(cfg)
  if family.words:
    return attribute_hat(words, targets, nll)
  lens_V = token_byte_lengths(tokenizer, family.vocab_size(cfg, tokenizer))
  return attribute_tokens(words, targets, nll, tokenizer, lens_V)


# -------------------------------------------------------------------------- tables


def _bits(nats) -> float:
  return float(nats) / math.log(2.0)


def bucket_rows(names: Sequence[str], index_W: np.ndarray, bytes_W: np.ndarray,
                nll_W: dict[str, np.ndarray],
                parts_W: dict[str, dict[str, np.ndarray]] | None = None) -> list[dict]:
  """Per bucket: words, bytes, bits and bpb per run, ratio and gap share (run 0 - run 1),
  and with `parts_W` ({run: {part: nll per word}}) each run's bits per part of a word."""
  a, b = list(nll_W)
  total_bytes = float(bytes_W.sum())
  gap = _bits(nll_W[a].sum() - nll_W[b].sum())
  rows = []
  for k, name in enumerate(names):
    sel = index_W == k
    nbytes = int(bytes_W[sel].sum())
    bits = {r: _bits(v[sel].sum()) for r, v in nll_W.items()}
    bpb = {r: (x / nbytes if nbytes else None) for r, x in bits.items()}
    rows.append({
        "bucket": name, "words": int(sel.sum()), "bytes": nbytes,
        "byte_share": nbytes / total_bytes if total_bytes else 0.0,
        "bits": bits, "bpb": bpb,
        "ratio": bpb[a] / bpb[b] if nbytes and bpb[b] else None,
        "gap_bits": bits[a] - bits[b],
        "gap_share": (bits[a] - bits[b]) / gap if gap else None,
    })
    if parts_W:
      rows[-1]["part_bits"] = {r: {p: _bits(v[sel].sum()) for p, v in ps.items()}
                               for r, ps in parts_W.items()}
  return rows


def part_shares(att: Attribution) -> dict[str, Any]:
  """Bits and share of a model's NLL in each part of a word (shares sum to 1)."""
  bits = {p: _bits(att.parts[p].sum()) for p in PARTS}
  total = sum(bits.values())
  return {"kind": att.kind, "labels": PART_LABELS[att.kind], "bits": bits,
          "shares": {p: (v / total if total else 0.0) for p, v in bits.items()}}


def top_gap_words(stripped: Sequence[bytes], nll_W: dict[str, np.ndarray], k: int = 20
                  ) -> list[dict]:
  """The `k` word types (stripped) whose occurrences add most to the gap, run 0 - run 1."""
  a, b = list(nll_W)
  ids: dict[bytes, int] = {}
  inverse = np.asarray([ids.setdefault(w, len(ids)) for w in stripped], np.int64)
  types = list(ids)
  gap_T = np.bincount(inverse, nll_W[a] - nll_W[b], minlength=len(types))
  count_T = np.bincount(inverse, minlength=len(types))
  out = []
  for t in np.argsort(-gap_T, kind="stable")[:k]:
    sel = inverse == t
    out.append({"word": types[t].decode("utf-8", errors="replace"),
                "count": int(count_T[t]), "gap_bits": _bits(gap_T[t]),
                "bits": {r: _bits(v[sel].sum()) for r, v in nll_W.items()}})
  return out


def decompose(atts: dict[str, Attribution], words: Words, ranks: FrequencyRanks) -> dict:
  """The decomposition of two runs' NLL on the same words (machine-readable dict)."""
  if len(atts) != 2:
    raise ValueError(f"decompose compares exactly two runs, got {len(atts)}")
  nll_W = {r: att.total_W for r, att in atts.items()}
  bytes_W = words.lens_W
  stripped = words.stripped()
  index = bucket_indices(stripped, ranks)
  nbytes = len(words.data)
  totals = {r: {"nll_nats": att.total_nll, "bits": _bits(att.total_nll),
                "bpb": _bits(att.total_nll) / nbytes, "targets": att.num_targets,
                "word_bits": _bits(nll_W[r].sum())} for r, att in atts.items()}
  a, b = list(atts)
  return {
      "runs": [a, b],
      "bytes": nbytes, "words": len(words), "documents": int(words.doc_W.max()) + 1,
      "totals": totals,
      "gap_bits": totals[a]["bits"] - totals[b]["bits"],
      "groups": {g: bucket_rows(names, index[g], bytes_W, nll_W,
                                {r: att.parts for r, att in atts.items()})
                 for g, names in GROUPS.items()},
      "parts": {r: part_shares(att) for r, att in atts.items()},
      "top_gap_words": top_gap_words(stripped, nll_W),
  }
