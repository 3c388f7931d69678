"""`python -m hat.generate`: see `hat.generate.cli`."""

import sys

from hat.generate.cli import main

if __name__ == "__main__":
  sys.exit(main())
