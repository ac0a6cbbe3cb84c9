"""Run untrusted Python in a subprocess: time and memory limits, a temp working dir, no
network. Used by the `code` reward.

The child gets an empty environment, isolated mode (`-I`), CPU-time and address-space
rlimits, and a fresh network namespace when the kernel allows it (root or user
namespaces); otherwise sockets are disabled inside the child before the code runs.
This keeps honest mistakes and runaway loops contained; it is not a security boundary
against a determined attacker.
"""

from __future__ import annotations

import ctypes
import os
import resource
import subprocess
import sys
import tempfile
from dataclasses import dataclass

CLONE_NEWNET = 0x40000000

# Runs in the child before the user's code: any socket use raises.
_NO_NETWORK_PRELUDE = """
import socket as _s
def _blocked(*a, **k):
    raise OSError("network access is disabled in the sandbox")
_s.socket = _blocked
_s.create_connection = _blocked
_s.getaddrinfo = _blocked
del _s, _blocked
"""


@dataclass
class SandboxResult:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def _limit_child(timeout_s: float, memory_mb: int) -> None:
    cpu = max(1, int(timeout_s) + 1)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    mem = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024 * 1024, 16 * 1024 * 1024))
    os.setsid()
    try:  # a private network namespace has no interfaces but loopback (down)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.unshare(CLONE_NEWNET)
    except OSError:
        pass


def run_python(
    code: str, stdin: str = "", timeout_s: float = 5.0, memory_mb: int = 512
) -> SandboxResult:
    """Run `code` with `python -I` in a temp dir; kill it after `timeout_s` seconds."""
    with tempfile.TemporaryDirectory(prefix="llmpost-sandbox-") as work:
        path = os.path.join(work, "main.py")
        with open(path, "w") as f:
            f.write(_NO_NETWORK_PRELUDE + "\n" + code)
        try:
            proc = subprocess.run(
                [sys.executable, "-I", path],
                input=stdin,
                capture_output=True,
                text=True,
                cwd=work,
                env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0"},
                timeout=timeout_s,
                preexec_fn=lambda: _limit_child(timeout_s, memory_mb),
            )
        except subprocess.TimeoutExpired as err:
            out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
            return SandboxResult(None, out, "timed out", True)
        return SandboxResult(proc.returncode, proc.stdout, proc.stderr, False)
