"""`llmpost` command line: the RedOne 2.0 demo, pipeline stages and evaluation."""

from __future__ import annotations

import sys

from common.cli import run_cli

COMMANDS: dict[str, str] = {
    "demo": "llmpost.demo",
    "run": "llmpost.pipeline",
    "eval": "llmpost.evaluate_command",
}


def main(argv: list[str] | None = None) -> int:
    return run_cli("llmpost", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
