"""`videodpo` command line: synthetic demo, data checks, GT-Pair building, training."""

from __future__ import annotations

import sys

from common.cli import run_cli

COMMANDS: dict[str, str] = {
    "demo": "videodpo.demo",
    "check-data": "videodpo.data.check",
    "build-pairs": "videodpo.build_pairs",
    "precompute": "videodpo.precompute",
    "train": "videodpo.trainer",
    "sample": "videodpo.sample",
}


def main(argv: list[str] | None = None) -> int:
    return run_cli("videodpo", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
