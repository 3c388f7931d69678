"""Perturbations: seeded, rate-controlled, valid text, and doing what their name says."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hat.eval.perturb import PERTURBATIONS, perturb

TEXT = "The quick brown fox jumps over the lazy dog, and Zoë naïvely writes 日本語 too. " * 4


@pytest.mark.parametrize("kind", sorted(PERTURBATIONS))
def test_seeded_and_rate_zero_is_identity(kind):
  assert perturb(TEXT, kind, 0.0) == TEXT
  a, b = perturb(TEXT, kind, 0.2, seed=3), perturb(TEXT, kind, 0.2, seed=3)
  assert a == b and a != TEXT
  assert perturb(TEXT, kind, 0.2, seed=4) != a or kind == "all_caps"


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=200), st.sampled_from(sorted(PERTURBATIONS)),
       st.floats(0.0, 1.0), st.integers(0, 5))
def test_output_is_valid_text(text, kind, rate, seed):
  out = perturb(text, kind, rate, seed)
  out.encode("utf-8", "surrogatepass")  # never raises for str built from str
  assert isinstance(out, str)


def _letters(s):
  return sum(c.isalpha() for c in s)


def test_rates_count_characters():
  n = _letters(TEXT)
  out = perturb(TEXT, "delete", 0.1)
  assert _letters(TEXT) - _letters(out) == round(0.1 * n)
  out = perturb(TEXT, "insert", 0.2)
  assert len(out) - len(TEXT) == round(0.2 * n)
  out = perturb(TEXT, "replace", 0.1)
  assert len(out) == len(TEXT)
  assert sum(a != b for a, b in zip(out, TEXT)) == round(0.1 * n)


def test_permute_keeps_the_multiset_of_each_word():
  out = perturb(TEXT, "permute", 0.2)
  assert out != TEXT
  for a, b in zip(TEXT.split(" "), out.split(" ")):
    assert sorted(a) == sorted(b)


def test_all_caps_and_whitespace():
  assert perturb("ab cd", "all_caps", 1.0) == "AB CD"
  assert perturb("a b c d", "whitespace_drop", 1.0) == "abcd"
  assert perturb("a b", "whitespace_double", 1.0) == "a  b"
  assert perturb("abc", "case_flip", 1.0) == "ABC"


def test_keyboard_uses_neighbours():
  out = perturb("sssss", "keyboard", 1.0, seed=1)
  assert all(c in "qweadzxc" for c in out)


def test_bad_arguments_name_the_problem():
  with pytest.raises(ValueError, match="unknown perturbation"):
    perturb("x", "nope", 0.1)
  with pytest.raises(ValueError, match="rate"):
    perturb("x", "delete", 1.5)
