"""`visroute <command> --help` builds its parser without importing torch (nor transformers): every subcommand's
heavy imports wait for the command to run. Oracle: the modules a fresh interpreter holds (`sys.modules`) after
the command line printed the help."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from visroute.cli import COMMANDS

SRC = str(Path(__file__).resolve().parents[1] / "src")
# runs the command line as `python -m visroute` does, then lists the heavy modules loaded by then
PROBE = """
import sys
from visroute.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
print("exit:", code)
print("heavy:", " ".join(heavy))
"""


def run_probe(*argv: str) -> tuple[str, int, list[str]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    code = lines[-2].removeprefix("exit: ")
    return "\n".join(lines[:-2]), int(code) if code.isdigit() else -1, lines[-1].removeprefix("heavy:").split()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_subcommand_help_does_not_import_torch(command):
    text, code, heavy = run_probe(command, "--help")
    assert code == 0 and f"usage: visroute {command}" in text
    assert not heavy, f"`visroute {command} --help` imports {heavy[:5]}"


def test_the_probe_sees_torch_when_a_command_imports_it():
    """The check above can fail: a command that runs builds the scorers, which import torch."""
    text, code, heavy = run_probe("scorers")
    assert code == 0 and "last_token_attention" in text
    assert "torch" in heavy
