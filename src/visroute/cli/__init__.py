"""The `visroute` command: one module per subcommand in this package, each with `add_parser(subparsers)`
setting `func`. Subcommand modules import their heavy dependencies inside `run`, so building the parser is
cheap, and an import error inside one surfaces as itself."""

from __future__ import annotations

import argparse
import importlib
import sys

from visroute.families import UnsupportedModelError

COMMANDS = ("generate", "scorers", "bench", "demo", "testbed", "study", "methods", "lmms", "paper-table")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visroute",
        description="Prune or reroute the visual tokens of a vision-language model, and measure the cost.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"visroute.cli.{name.replace('-', '_')}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, UnsupportedModelError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"visroute {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
