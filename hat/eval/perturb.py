"""Seeded input perturbations for robustness evaluation.

They work on characters (code points), never bytes, so the output is valid UTF-8 whenever
the input is. `rate` is the fraction of eligible characters touched (for `all_caps` and
`case_flip` the fraction of words / letters). The paper's set is `permute`, `replace`,
`delete` and `all_caps`; the others are common typo and formatting noise.

    perturb("The quick brown fox", "permute", rate=0.1, seed=0)
"""

from __future__ import annotations

import random
import re
from typing import Callable

_ROWS = ("`1234567890-=", "qwertyuiop[]\\", "asdfghjkl;'", "zxcvbnm,./")
_WORD_RE = re.compile(r"\S+")


def _keyboard_neighbours() -> dict[str, str]:
  """QWERTY neighbours (same row and the rows above/below, same or adjacent column)."""
  pos = {c: (r, i) for r, row in enumerate(_ROWS) for i, c in enumerate(row)}
  out: dict[str, str] = {}
  for c, (r, i) in pos.items():
    near = [d for d, (r2, i2) in pos.items()
            if d != c and abs(r2 - r) <= 1 and abs(i2 - i) <= 1]
    out[c] = "".join(near)
  return out


_NEIGHBOURS = _keyboard_neighbours()


def _letters(text: str) -> list[int]:
  return [i for i, c in enumerate(text) if c.isalpha()]


def _pick(idx: list[int], rate: float, rng: random.Random) -> list[int]:
  """A seeded sample of round(rate * len(idx)) positions, sorted."""
  k = min(len(idx), int(round(rate * len(idx))))
  return sorted(rng.sample(idx, k)) if k else []


def _alphabet(text: str) -> str:
  """Replacement characters drawn from the text's own letters keep the script realistic."""
  letters = sorted({c for c in text if c.isalpha()})
  return "".join(letters) or "abcdefghijklmnopqrstuvwxyz"


def permute(text: str, rate: float, rng: random.Random) -> str:
  """Swaps a letter with the next character of the same word (a transposition)."""
  chars = list(text)
  cand = [i for i in _letters(text) if i + 1 < len(chars) and not chars[i + 1].isspace()]
  last = -2
  for i in _pick(cand, rate, rng):
    if i <= last + 1:  # don't undo or chain swaps
      continue
    chars[i], chars[i + 1] = chars[i + 1], chars[i]
    last = i
  return "".join(chars)


def replace(text: str, rate: float, rng: random.Random) -> str:
  """Replaces letters with a different random letter of the text's alphabet."""
  chars, alpha = list(text), _alphabet(text)
  for i in _pick(_letters(text), rate, rng):
    options = [c for c in alpha if c != chars[i]] or [chars[i]]
    chars[i] = rng.choice(options)
  return "".join(chars)


def delete(text: str, rate: float, rng: random.Random) -> str:
  """Deletes letters."""
  drop = set(_pick(_letters(text), rate, rng))
  return "".join(c for i, c in enumerate(text) if i not in drop)


def insert(text: str, rate: float, rng: random.Random) -> str:
  """Inserts a random letter of the text's alphabet after letters."""
  alpha, at = _alphabet(text), set(_pick(_letters(text), rate, rng))
  return "".join(c + (rng.choice(alpha) if i in at else "") for i, c in enumerate(text))


def keyboard(text: str, rate: float, rng: random.Random) -> str:
  """Replaces ASCII letters/digits with a QWERTY neighbour, keeping case."""
  chars = list(text)
  cand = [i for i, c in enumerate(chars) if c.lower() in _NEIGHBOURS]
  for i in _pick(cand, rate, rng):
    c = chars[i]
    n = rng.choice(_NEIGHBOURS[c.lower()])
    chars[i] = n.upper() if c.isupper() else n
  return "".join(chars)


def case_flip(text: str, rate: float, rng: random.Random) -> str:
  """Flips the case of letters."""
  chars = list(text)
  for i in _pick(_letters(text), rate, rng):
    chars[i] = chars[i].swapcase()
  return "".join(chars)


def all_caps(text: str, rate: float, rng: random.Random) -> str:
  """Upper-cases whole words (rate = fraction of words; 1.0 = the paper's ALL CAPS)."""
  spans = [m.span() for m in _WORD_RE.finditer(text)]
  chosen = set(_pick(list(range(len(spans))), rate, rng))
  out, prev = [], 0
  for j, (a, b) in enumerate(spans):
    out.append(text[prev:a])
    out.append(text[a:b].upper() if j in chosen else text[a:b])
    prev = b
  out.append(text[prev:])
  return "".join(out)


def whitespace_drop(text: str, rate: float, rng: random.Random) -> str:
  """Removes whitespace characters, gluing words together."""
  drop = set(_pick([i for i, c in enumerate(text) if c.isspace()], rate, rng))
  return "".join(c for i, c in enumerate(text) if i not in drop)


def whitespace_double(text: str, rate: float, rng: random.Random) -> str:
  """Doubles whitespace characters."""
  at = set(_pick([i for i, c in enumerate(text) if c.isspace()], rate, rng))
  return "".join(c * 2 if i in at else c for i, c in enumerate(text))


PERTURBATIONS: dict[str, Callable[[str, float, random.Random], str]] = {
    "permute": permute,
    "replace": replace,
    "delete": delete,
    "all_caps": all_caps,
    "insert": insert,
    "keyboard": keyboard,
    "case_flip": case_flip,
    "whitespace_drop": whitespace_drop,
    "whitespace_double": whitespace_double,
}
PAPER_PERTURBATIONS = ("permute", "replace", "delete", "all_caps")


def perturb(text: str, kind: str, rate: float, seed: int = 0) -> str:
  """Applies perturbation `kind` at `rate` with a seeded RNG; rate 0 returns `text`."""
  if kind not in PERTURBATIONS:
    raise ValueError(f"unknown perturbation {kind!r}; choose from {sorted(PERTURBATIONS)}")
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"perturbation rate must be in [0, 1], got {rate}")
  if rate == 0.0:
    return text
  return PERTURBATIONS[kind](text, rate, random.Random(f"{kind}:{rate}:{seed}"))
