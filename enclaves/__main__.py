"""``enclaves`` / ``python -m enclaves``: the line-mode client (docs/client.rst)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    from enclaves.client.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
