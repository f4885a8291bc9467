"""The `visroute` command: one module per subcommand in this package, each with `add_parser(subparsers)`
setting `func`. Subcommand modules import their heavy dependencies inside `run`. The command line builds only the
parser of the subcommand it names (the others are listed by their one-line help), so `visroute --help` imports
neither torch nor transformers, and an import error inside one subcommand surfaces as itself."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> one-line help (the one home of these lines: the subcommand modules use them too)
COMMANDS = {
    "generate": "answer a question about an image with a routed model",
    "scorers": "list the registered scorers and their options",
    "bench": "latency / memory / FLOPs / K/V benchmark on a real-shaped random-weight model",
    "demo": "compare pruning, rerouting and scorers on the shipped testbed model, offline",
    "testbed": "synthetic grounded-VQA scenes, the small testbed model, its evaluation",
    "study": "sweep routing configs over benchmark tasks; list and report the results",
    "methods": "list the named methods (NAME@TIER for --method) and their schedules",
    "lmms": "lmms-eval helpers: the testbed as a local task, inline model_args",
    "paper-table": "the Reroute paper's table through lmms-eval (resumable; --dry-run lists it)",
}


def build_parser(only: str | None = None, lazy: bool = False) -> argparse.ArgumentParser:
    """The full parser; with `lazy`, only subcommand `only` is built in full (None: none), the others are
    listed by name and help."""
    parser = argparse.ArgumentParser(
        prog="visroute",
        description="Prune or reroute the visual tokens of a vision-language model, and measure the cost.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        if lazy and name != only:
            sub.add_parser(name, help=help_text, add_help=False)
        else:
            importlib.import_module(f"visroute.cli.{name.replace('-', '_')}").add_parser(sub)
    return parser


def _command(argv: list[str]) -> str | None:
    """The subcommand `argv` names (its first word that is not an option)."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in COMMANDS else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command(argv), lazy=True)
    args = parser.parse_args(argv)
    from visroute.families import UnsupportedModelError

    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, UnsupportedModelError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"visroute {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
