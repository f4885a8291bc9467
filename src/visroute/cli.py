"""The `visroute` command. Each subcommand lives with the code it runs; this module only wires them up."""

from __future__ import annotations

import argparse
import sys


def _add_generate(sub) -> None:
    from visroute import generate_cli

    generate_cli.register(sub)


def _add_scorers(sub) -> None:
    p = sub.add_parser("scorers", help="list the registered scorers and their options")
    p.set_defaults(func=_run_scorers)


def _run_scorers(args) -> int:
    from visroute.scoring import available_scorers

    for name, cls in available_scorers().items():
        print(f"{name:24s} {cls.description}")
        for opt, (default, doc) in cls.options.items():
            print(f"{'':24s}   {opt}={default!r}: {doc}")
    return 0


def _add_optional(sub, module: str) -> None:
    """Subcommands whose modules may not be present in every build (they register themselves)."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("visroute"):
            return
        raise
    mod.register(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visroute",
        description="Prune or reroute the visual tokens of a vision-language model, and measure the cost.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_scorers(sub)
    for module in ("visroute.demo", "visroute.bench", "visroute.testbed.cli"):
        _add_optional(sub, module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"visroute {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
