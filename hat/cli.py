"""Command-line front ends: a user's mistake in one line, an internal error with its traceback.

    from hat.cli import entry_point

    @entry_point
    def main(argv: list[str]) -> int: ...

A wrapped `main` prints `error: <what and where>` on stderr and returns `EXIT_USER_ERROR`
(2) for a `UserError` (config, source spec, corpus, checkpoint that does not fit, prompt,
eval set) and for a missing or unreadable path. Every other exception keeps its
traceback: it is a bug to report, not a typo to fix. `--debug` (stripped from argv) or
`HAT_DEBUG=1` shows the traceback of user errors too. Code that checks user input with
plain ValueErrors (a tool's flag parser) wraps the check in `with user_input(): ...`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import sys
from typing import Callable, Sequence

EXIT_USER_ERROR = 2
DEBUG_FLAG = "--debug"

# OSErrors that mean "that path is wrong", not "the program is wrong".
_PATH_ERRNOS = (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR)


class UserError(Exception):
  """Something the user gave is wrong; the message says what and where, in one line."""


@contextlib.contextmanager
def user_input(*kinds: type[BaseException]):
  """Inside the block, `kinds` (default ValueError) from checking user input become UserErrors."""
  try:
    yield
  except UserError:
    raise
  except (kinds or (ValueError,)) as e:
    raise UserError(str(e)) from e


def debug_enabled(argv: Sequence[str] = ()) -> bool:
  """True when `--debug` is in argv or HAT_DEBUG is set to a true value."""
  env = os.environ.get("HAT_DEBUG", "").strip().lower()
  return DEBUG_FLAG in argv or env not in ("", "0", "false", "no")


def user_message(exc: BaseException) -> str | None:
  """The one-line message of a user error, or None for an internal error."""
  if isinstance(exc, UserError):
    text = str(exc)
  elif isinstance(exc, OSError) and exc.errno in _PATH_ERRNOS and exc.filename:
    text = f"{exc.strerror}: {exc.filename}"
  else:
    return None
  # One line: later lines (a library's advice, a nested traceback) go.
  return " ".join(text.split("\n", 1)[0].split()) or type(exc).__name__


def report(exc: BaseException) -> int:
  """Prints a user error's line on stderr and returns its exit status."""
  print(f"error: {user_message(exc)}", file=sys.stderr, flush=True)
  return EXIT_USER_ERROR


def entry_point(main: Callable[[list[str]], int | None]) -> Callable[..., int]:
  """Wraps `main(argv)`: argv defaults to sys.argv[1:]; user errors become one line, exit 2."""

  @functools.wraps(main)
  def wrapped(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(argv)
    saved = os.environ.get("HAT_DEBUG")
    if DEBUG_FLAG in argv:
      os.environ["HAT_DEBUG"] = "1"  # for code that asks debug_enabled() during the call
      argv = [a for a in argv if a != DEBUG_FLAG]
    try:
      return int(main(argv) or 0)
    except Exception as e:  # pylint: disable=broad-except
      if debug or user_message(e) is None:
        raise
      return report(e)
    finally:
      if saved is None:
        os.environ.pop("HAT_DEBUG", None)
      else:
        os.environ["HAT_DEBUG"] = saved

  return wrapped
