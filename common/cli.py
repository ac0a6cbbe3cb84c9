"""Shared driver for the console scripts: one sub-command per module.

A sub-command module defines `HELP` (one line, a string literal), `add_arguments(parser)`
and `run(args) -> int`. Only the module of the command being run is imported (the
others' `HELP` is read from their source), so `--help` is instant and one command's
heavy imports never slow another. A module that does not exist yet is left out, so the
help lists only what is there. Bad input (`UserError`, or a path that is missing, a
directory, a file where a directory belongs, or not readable) ends in one line on
stderr and exit code 1; anything else keeps its traceback, since it is a bug.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import logging
import sys
from pathlib import Path

from common.errors import UserError

# Errors that mean the user's input is wrong, printed as one line.
BAD_INPUT = (UserError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
             FileExistsError, PermissionError)


def _module_help(origin: str) -> str:
    """The module's `HELP = "..."` literal, read without importing it."""
    tree = ast.parse(Path(origin).read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "HELP" for t in node.targets):
            if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                return node.value.value
    return ""


def _available(commands: dict[str, str]) -> dict[str, tuple[str, str]]:
    found = {}
    for name, module_name in commands.items():
        try:
            spec = importlib.util.find_spec(module_name)
        except ModuleNotFoundError:
            spec = None
        if spec is not None and spec.origin:
            found[name] = (module_name, _module_help(spec.origin))
    return found


def run_cli(prog: str, commands: dict[str, str], argv: list[str] | None = None) -> int:
    """Parse `argv`, import and run the chosen sub-command; return its exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    available = _available(commands)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = argparse.ArgumentParser(prog=prog)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    module = None
    for name, (module_name, help_text) in available.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    try:
        return int(module.run(args) or 0)
    except BAD_INPUT as err:
        # Bad input (config, manifest, paths) ends in one line, not a traceback.
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{prog} {args.command}: error: {message}", file=sys.stderr)
        return 1
