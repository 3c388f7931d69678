"""The built-in default corpus: documentation text of the Python standard library.

It needs no network and no downloads: the docstrings of a fixed, sorted list of stdlib
modules (and of their public classes, functions and methods) are rendered to one text
file per module under the cache directory, keyed by the Python version, and then read
like any `text:` source. It is a few MB of English technical prose, enough to smoke-test
training end to end.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import os
import pathlib
import platform
import re
import shutil
import sys
import tempfile
import warnings

# Bump when the rendering changes, so stale caches are not reused.
_FORMAT_VERSION = 1

# Pure-library modules: importing them has no side effects (no GUI, no output, no
# network), and they exist on every CPython build.
MODULES = tuple(sorted((
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bdb", "binascii", "bisect",
    "bz2", "calendar", "cmath", "cmd", "code", "codecs", "codeop", "collections",
    "collections.abc", "colorsys", "concurrent.futures", "configparser", "contextlib",
    "contextvars", "copy", "copyreg", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "dis", "doctest", "email", "email.message", "email.parser", "email.utils",
    "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "gc",
    "getopt", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html",
    "html.parser", "http", "http.client", "http.cookies", "http.server", "imaplib",
    "importlib", "inspect", "io", "ipaddress", "itertools", "json", "keyword",
    "linecache", "locale", "logging", "logging.handlers", "lzma", "mailbox", "marshal",
    "math", "mimetypes", "numbers", "operator", "optparse", "os", "os.path", "pathlib",
    "pdb", "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib", "pprint",
    "profile", "pstats", "queue", "quopri", "random", "re", "reprlib", "sched", "secrets",
    "selectors", "shelve", "shlex", "shutil", "signal", "smtplib", "socket",
    "socketserver", "sqlite3", "statistics", "string", "stringprep", "struct",
    "subprocess", "symtable", "sys", "sysconfig", "tabnanny", "tarfile", "tempfile",
    "textwrap", "threading", "time", "timeit", "token", "tokenize", "trace", "traceback",
    "tracemalloc", "types", "typing", "unicodedata", "unittest", "unittest.mock",
    "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref",
    "webbrowser", "xml.dom", "xml.dom.minidom", "xml.etree.ElementTree", "xml.sax",
    "zipfile", "zipimport", "zlib", "zoneinfo",
    "asyncio.base_events", "asyncio.events", "asyncio.futures", "asyncio.locks",
    "asyncio.queues", "asyncio.streams", "asyncio.subprocess", "asyncio.tasks",
    "builtins", "compileall", "concurrent.futures.process", "concurrent.futures.thread",
    "ctypes", "email.charset", "email.contentmanager", "email.feedparser",
    "email.generator", "email.header", "email.headerregistry", "email.mime.text",
    "email.policy", "errno", "getpass", "importlib.abc", "importlib.machinery",
    "importlib.metadata", "importlib.resources", "importlib.util", "json.decoder",
    "json.encoder", "logging.config", "modulefinder", "multiprocessing",
    "multiprocessing.connection", "multiprocessing.managers", "multiprocessing.pool",
    "multiprocessing.process", "multiprocessing.queues", "multiprocessing.shared_memory",
    "multiprocessing.synchronize", "netrc", "ntpath", "posixpath", "py_compile", "pyclbr",
    "pydoc", "runpy", "select", "ssl", "stat", "tomllib", "unittest.case",
    "unittest.loader", "unittest.result", "unittest.runner", "unittest.suite",
    "urllib.error", "urllib.response", "urllib.robotparser", "wsgiref.handlers",
    "wsgiref.headers", "wsgiref.simple_server", "wsgiref.util", "wsgiref.validate",
    "xml.dom.pulldom", "xml.sax.handler", "xml.sax.saxutils", "xml.sax.xmlreader",
    "xmlrpc.client", "xmlrpc.server", "zipapp",
)))

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # reprs of default values carry addresses


def corpus_key() -> str:
  """Cache key: the text depends on the interpreter version and platform."""
  impl = platform.python_implementation().lower()
  ver = "".join(map(str, sys.version_info[:3]))
  return f"{impl}{ver}-{sys.platform}-v{_FORMAT_VERSION}"


def _own_doc(obj) -> str:
  # inspect.getdoc would inherit a base class's docstring and repeat it many times.
  doc = getattr(obj, "__doc__", None)
  return inspect.cleandoc(doc) if isinstance(doc, str) and doc.strip() else ""


def _signature(obj) -> str:
  try:
    return _ADDRESS.sub("", str(inspect.signature(obj)))
  except (TypeError, ValueError):
    return "(...)"


def _entry(title: str, doc: str) -> str:
  return f"{title}\n{doc}" if doc else ""


def _public(namespace: dict) -> list[str]:
  return sorted(n for n in namespace if not n.startswith("_"))


def render_module(name: str, module) -> str:
  """Documentation text of one module: its docstring, then its public members'."""
  parts = [f"Module {name}\n\n{_own_doc(module)}".rstrip()]
  for attr in _public(vars(module)):
    obj = vars(module)[attr]
    if getattr(obj, "__module__", None) != module.__name__:
      continue  # re-exported from elsewhere: documented where it is defined
    if inspect.isclass(obj):
      bases = ", ".join(b.__name__ for b in obj.__bases__ if b is not object)
      parts.append(_entry(f"class {attr}({bases})" if bases else f"class {attr}",
                          _own_doc(obj)))
      for meth in _public(vars(obj)):
        member = vars(obj)[meth]
        if isinstance(member, (staticmethod, classmethod)):
          member = member.__func__
        if callable(member) or isinstance(member, property):
          sig = "" if isinstance(member, property) else _signature(member)
          parts.append(_entry(f"{attr}.{meth}{sig}", _own_doc(member)))
    elif inspect.isroutine(obj):
      parts.append(_entry(f"{attr}{_signature(obj)}", _own_doc(obj)))
  return "\n\n".join(p for p in parts if p) + "\n"


def _write_corpus(out_dir: pathlib.Path) -> int:
  """Renders every importable module of MODULES into out_dir; returns files written."""
  written = 0
  for name in MODULES:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
      warnings.simplefilter("ignore")
      try:
        module = importlib.import_module(name)
      except ImportError:
        continue  # a stripped-down build may lack a C extension (e.g. sqlite3)
      text = render_module(name, module)
    (out_dir / f"{name}.txt").write_text(text, encoding="utf-8", errors="surrogateescape")
    written += 1
  try:
    from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
  except ImportError:
    topics = {}
  # The language reference sections that `help("topic")` shows: long-form prose.
  for topic in sorted(topics):
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", topic)
    (out_dir / f"topics.{safe}.txt").write_text(topics[topic].strip() + "\n",
                                                encoding="utf-8")
    written += 1
  return written


def builtin_corpus_dir(cache_dir: str | os.PathLike) -> pathlib.Path:
  """Directory of the built-in corpus text files, rendered once and then reused."""
  final = pathlib.Path(cache_dir) / "builtin" / corpus_key()
  if final.is_dir():
    return final
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
  try:
    if not _write_corpus(tmp):
      raise RuntimeError("builtin corpus: no standard library module could be imported")
    try:
      tmp.rename(final)  # atomic: a concurrent builder either wins or finds it done
    except OSError:
      if not final.is_dir():
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return final
