"""``enclaves`` / ``python -m enclaves``: the line-mode client."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    sys.stderr.write("enclaves: the client is not built yet; see README.rst\n")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
