"""Run many command lines of a console script in one fresh Python process.

Starting the CLI costs seconds (torch, transformers), so the bad-input tests run all
their cases through the script's real `main(argv)` in one subprocess and get each case's
exit code, stdout and stderr back. An exception that escapes `main` is printed with its
traceback and counts as exit 1, as it would in a process of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

_DRIVER = r"""
import contextlib, io, json, logging, sys, traceback
from importlib import import_module

spec = json.load(open(sys.argv[1]))
logging.basicConfig(level=logging.INFO, stream=sys.__stderr__)
main = import_module(spec["module"]).main
results = {}
for name, argv in spec["cases"].items():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
    results[name] = {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
print("RESULTS " + json.dumps(results))
"""


def run_cli_cases(module: str, cases: dict[str, list[str]], workdir: Path,
                  timeout_s: float = 300) -> dict[str, dict]:
    """`{name: argv}` through `module.main` in one subprocess; `{name: {code, stdout, stderr}}`."""
    spec = workdir / "cli_cases.json"
    spec.write_text(json.dumps({"module": module, "cases": cases}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _DRIVER, str(spec)], capture_output=True, text=True,
                          timeout=timeout_s, env=env, cwd=Path(__file__).parents[1])
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert line is not None, f"driver failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(line[len("RESULTS "):])


def run_cli_process(module: str, argv: list[str], timeout_s: float = 120) -> subprocess.CompletedProcess:
    """One command line as a process of its own: `python -m module ARGV`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True,
                          timeout=timeout_s, env=env, cwd=Path(__file__).parents[1])
