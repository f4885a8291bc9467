"""`visroute scorers`: the registered scorers, their options (type, default, help) and what they need."""

from __future__ import annotations

from visroute.cli import COMMANDS
from visroute.cli.common import add_debug


def add_parser(sub) -> None:
    p = sub.add_parser("scorers", help=COMMANDS["scorers"])
    add_debug(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from visroute.scoring import available_scorers

    for name, cls in available_scorers().items():
        print(f"{name:24s} {cls.description}")
        needs = []
        if cls.before_decoder:
            needs.append("can drop tokens before the decoder (stage at layer 0)")
        if cls.call_inputs:
            needs.append(f"per-call inputs: {', '.join(cls.call_inputs)}")
        if needs:
            print(f"{'':24s}   ({'; '.join(needs)})")
        for spec in cls.option_specs():
            choices = f", one of {list(spec.choices)}" if spec.choices else ""
            print(f"{'':24s}   {spec.name}={spec.default!r} ({spec.type}{choices}): {spec.help}")
    return 0
