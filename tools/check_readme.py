"""Checks the figures the README quotes against what the code computes now.

    python tools/check_readme.py          # every figure; the demo run takes ~5 min on 2 CPUs
    python tools/check_readme.py --fast   # only the figures that need no training

Each claim pairs a pattern that finds a figure in README.md with the computation that
produces it: the demo's parameter count and step count come from `configs/tiny_hat.py`,
its `final eval/valid/bpb` from running the demo's training command (as
`tools/bootstrap.py demo` does, on the CPU, in a temporary workdir). A figure is in step
when the code's value, rounded to the README's decimals, equals it. Prints one line per
claim; exit status 1 if any is stale or missing, 0 otherwise. Run it before a release
or after a change that moves the numbers; tests/test_readme.py runs the fast claims.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import re
import subprocess
import sys
import tempfile
from typing import Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hat.cli import entry_point  # noqa: E402

DEMO_CONFIG = ROOT / "configs" / "tiny_hat.py"
_FINAL_BPB = re.compile(r"final eval/valid/bpb = ([0-9.]+)")


@dataclasses.dataclass(frozen=True)
class Claim:
  """A figure in the README: where it is, and how the code computes it now."""

  name: str
  pattern: str  # regex on README.md (whitespace may span lines); group 1 is the figure
  compute: Callable[[], str]  # the code's value, formatted like the README's
  slow: bool = False


def _demo_params() -> str:
  from hat.config import load_config_file, from_config_dict  # pylint: disable=g-import-not-at-top
  from hat.params import count_params  # pylint: disable=g-import-not-at-top

  total = count_params(from_config_dict(load_config_file(DEMO_CONFIG)).model)["total"]
  return f"{total / 1e6:.2f}M"


def _demo_steps() -> str:
  from hat.config import load_config_file, from_config_dict  # pylint: disable=g-import-not-at-top

  return f"{from_config_dict(load_config_file(DEMO_CONFIG)).steps:,}"


def _demo_bpb() -> str:
  """Runs the demo's training command on the CPU and reads its final bpb line."""
  with tempfile.TemporaryDirectory() as workdir:
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "hat.train", "--config", str(DEMO_CONFIG),
                           "--workdir", workdir, "--no-progress"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
  found = _FINAL_BPB.findall(proc.stdout + proc.stderr)
  if proc.returncode != 0 or not found:
    raise RuntimeError(f"the demo run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return found[-1]


CLAIMS = (
    Claim("demo parameters", r"`configs/tiny_hat\.py` \(([0-9.]+M) parameters", _demo_params),
    Claim("demo steps", r"`configs/tiny_hat\.py` \([0-9.]+M parameters, ([0-9,]+) steps\)",
          _demo_steps),
    Claim("demo final bpb", r"final\s+eval/valid/bpb\s+=\s+([0-9.]+)", _demo_bpb, slow=True),
)


def quoted(claim: Claim, readme: str) -> str | None:
  """The figure the README quotes for `claim`, or None when the pattern finds none."""
  m = re.search(claim.pattern.replace(" ", r"\s+"), readme)
  return m.group(1) if m else None


def in_step(quoted_value: str, computed: str) -> bool:
  """Equal after rounding the computed number to the quoted one's decimals."""
  (q, q_unit), (c, c_unit) = (re.fullmatch(r"([0-9.]+)(\D*)", s.replace(",", "")).groups()
                              for s in (quoted_value, computed))
  decimals = len(q.split(".")[1]) if "." in q else 0
  return q_unit == c_unit and f"{float(c):.{decimals}f}" == q


@entry_point
def main(argv: list[str]) -> int:
  """Checks each claim; one line per claim; 1 if any is stale."""
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--fast", action="store_true", help="skip claims that need a training run")
  ap.add_argument("--readme", default=str(ROOT / "README.md"))
  args = ap.parse_args(argv)
  readme = pathlib.Path(args.readme).read_text(encoding="utf-8")
  stale = 0
  for claim in CLAIMS:
    value = quoted(claim, readme)
    if value is None:
      print(f"MISSING  {claim.name}: no match for {claim.pattern!r} in {args.readme}")
      stale += 1
      continue
    if claim.slow and args.fast:
      print(f"skipped  {claim.name}: README says {value} (needs a training run)")
      continue
    computed = claim.compute()
    ok = in_step(value, computed)
    stale += not ok
    print(f"{'ok' if ok else 'STALE':<8} {claim.name}: README says {value}, the code gives "
          f"{computed}")
  return 1 if stale else 0


if __name__ == "__main__":
  sys.exit(main())
