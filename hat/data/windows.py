"""Documents -> windows of at most `window_bytes` bytes, cut at word boundaries.

Documents (bytes) are taken in stream order, split into words, and packed greedily into
windows: a window may hold the tail of one document and the heads of the next ones, as
`Segment`s (`ends_doc` marks a document that ends inside the window). Every byte of
every document lands in exactly one window; only empty documents vanish.

Both steps are grain iterators whose state is the parent's state before the current
element plus a position inside it, so a restored iterator continues with exactly the
next output without storing any text in the checkpoint.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import grain

from hat.data.layout import Segment


def pack_words(words: Sequence[bytes], start: int, budget: int) -> int:
  """End index: words[start:end] is the longest run whose bytes fit in `budget`."""
  end, used = start, 0
  n = len(words)
  while end < n and used + len(words[end]) <= budget:
    used += len(words[end])
    end += 1
  return end


class WindowIterator(grain.DatasetIterator):
  """Iterator of windows (lists of `Segment`) over an iterator of documents."""

  def __init__(self, parent: grain.DatasetIterator, split: Callable[[bytes], list[bytes]],
               window_bytes: int):
    super().__init__(parent)
    self._split = split
    self._window_bytes = window_bytes
    self._doc_state = self._parent.get_state()  # parent state before the current doc
    self._words: list[bytes] = []  # words of the current document
    self._pos = 0  # index of its first word not yet emitted
    self._exhausted = False

  def _load_next_doc(self) -> bool:
    """Advances to the next non-empty document; False when the parent is done."""
    while True:
      state = self._parent.get_state()
      try:
        doc = next(self._parent)
      except StopIteration:
        self._exhausted = True
        return False
      if doc:
        self._doc_state, self._words, self._pos = state, self._split(doc), 0
        return True

  def __next__(self) -> list[Segment]:
    window: list[Segment] = []
    budget = self._window_bytes
    while budget > 0:
      if self._pos >= len(self._words):
        if self._exhausted or not self._load_next_doc():
          break
      end = pack_words(self._words, self._pos, budget)
      if end == self._pos:
        if not window:  # only a config error (word > window) could cause this
          raise ValueError(f"a word of {len(self._words[self._pos])} bytes does not fit "
                           f"window_bytes={self._window_bytes}")
        break  # the next word starts the next window
      chunk = self._words[self._pos:end]
      budget -= sum(map(len, chunk))
      self._pos = end
      window.append(Segment(tuple(chunk), ends_doc=end == len(self._words)))
    if not window:
      raise StopIteration
    return window

  def get_state(self) -> dict[str, Any]:
    return {"doc_state": self._doc_state, "pos": self._pos,
            "in_doc": bool(self._words), "exhausted": self._exhausted}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["doc_state"])
    self._doc_state, self._words, self._pos = state["doc_state"], [], 0
    self._exhausted = state["exhausted"]
    if state["in_doc"] and not self._exhausted:
      # Re-read and re-split the current document: splitting is deterministic.
      self._load_next_doc()
      self._pos = state["pos"]


class WindowIterDataset(grain.IterDataset):
  """Windows of at most `window_bytes` bytes over a dataset of documents."""

  def __init__(self, parent: grain.IterDataset, split: Callable[[bytes], list[bytes]],
               window_bytes: int):
    super().__init__(parent)
    self._split_fn = split
    self._window_bytes = window_bytes

  def __iter__(self) -> WindowIterator:
    return WindowIterator(self._parent.__iter__(), self._split_fn, self._window_bytes)

  def __str__(self) -> str:
    return f"WindowIterDataset(window_bytes={self._window_bytes})"


class FlatMapIterator(grain.DatasetIterator):
  """Emits every element of `fn(x)` for each parent element x, in order."""

  def __init__(self, parent: grain.DatasetIterator, fn: Callable[[Any], Sequence[Any]]):
    super().__init__(parent)
    self._fn = fn
    self._elem_state = self._parent.get_state()
    self._buffer: Sequence[Any] = ()
    self._index = 0

  def __next__(self):
    while self._index >= len(self._buffer):
      self._elem_state = self._parent.get_state()
      self._buffer, self._index = self._fn(next(self._parent)), 0
    self._index += 1
    return self._buffer[self._index - 1]

  def get_state(self) -> dict[str, Any]:
    return {"elem_state": self._elem_state, "index": self._index,
            "in_elem": bool(self._buffer)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["elem_state"])
    self._elem_state, self._buffer, self._index = state["elem_state"], (), 0
    if state["in_elem"]:
      self._buffer, self._index = self._fn(next(self._parent)), state["index"]


class FlatMapIterDataset(grain.IterDataset):
  """One-to-many map over an IterDataset (e.g. a window -> 1 or 2 sequences)."""

  def __init__(self, parent: grain.IterDataset, fn: Callable[[Any], Sequence[Any]]):
    super().__init__(parent)
    self._fn = fn

  def __iter__(self) -> FlatMapIterator:
    return FlatMapIterator(self._parent.__iter__(), self._fn)

  def __str__(self) -> str:
    return "FlatMapIterDataset"


def windows_of(docs: Iterable[bytes], split: Callable[[bytes], list[bytes]],
               window_bytes: int) -> list[list[Segment]]:
  """All windows of a finite list of documents (eager; for tools and tests)."""
  ds = WindowIterDataset(grain.MapDataset.source(list(docs)).to_iter_dataset(), split,
                         window_bytes)
  return list(ds)
