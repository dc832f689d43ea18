"""``python -m recursivemas.serve [flags]``: the same as ``recursivemas serve [flags]``."""

from __future__ import annotations

import argparse
import sys

from recursivemas.errors import RecursiveMASError
from recursivemas.serve import add_serve_parser, serve_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recursivemas.serve")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = vars(parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)]))
    args.pop("command")
    try:
        return serve_command(**args)
    except RecursiveMASError as err:
        print(f"recursivemas: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
