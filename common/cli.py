"""Shared driver for the console scripts: one sub-command per module.

A sub-command module defines `HELP` (one line), `add_arguments(parser)` and
`run(args) -> int`. Modules are imported only when their command is listed, and a
module that does not exist yet is left out, so `--help` shows only what is there.
Bad input (`UserError`, a missing file) ends in one line and exit code 1.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

from common.errors import UserError


def run_cli(prog: str, commands: dict[str, str], argv: list[str] | None = None) -> int:
    """Shared driver for the console scripts: lists only the commands that exist."""
    parser = argparse.ArgumentParser(prog=prog)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, module_name in commands.items():
        try:
            if importlib.util.find_spec(module_name) is None:
                continue
        except ModuleNotFoundError:
            continue
        module = importlib.import_module(module_name)
        if not hasattr(module, "run"):
            continue
        modules[name] = module
        p = sub.add_parser(name, help=getattr(module, "HELP", ""), description=getattr(module, "HELP", ""))
        module.add_arguments(p)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    try:
        return int(modules[args.command].run(args) or 0)
    except (UserError, FileNotFoundError) as err:
        # Bad input (config, manifest, paths) ends in one line, not a traceback.
        print(f"{prog} {args.command}: error: {err}", file=sys.stderr)
        return 1
