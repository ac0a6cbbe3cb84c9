"""Run untrusted Python (a policy's answer to a code task) inside a bubblewrap sandbox.

Each run gets new PID, network, IPC, UTS and user namespaces (`bwrap`), dies with its
parent, sees a read-only `/usr` and the interpreter, an empty private `/tmp` (its only
writable place, size-capped) and nothing else: no `/etc`, no home, no run directory, no
other process. The environment is cleared (only PATH and HOME=/tmp are set). Inside, before the code runs, rlimits cap CPU
time, address space, processes, file size and open files; as root the run also drops to
an unprivileged uid of its own (root ignores the process limit). Stdout and stderr are
read as they come, up to `max_output_bytes` each: past that the run is killed and its
output cut. The program is PID 1 of its namespace (`--as-pid-1`): when it exits, or is
killed on timeout, the kernel kills every process it left behind, detached or not; then
the process group goes too.

`CodeSandbox.run_many` spreads runs over a small thread pool (one uid per slot), so one
slow program does not stall a rollout. Where `bwrap` is missing or cannot create
namespaces, `CodeSandbox.check()` raises `SandboxUnavailable` saying how to install it;
only `allow_unsandboxed=True` runs code without isolation (rlimits and timeouts only).
Memory is capped per process: a run can hold at most `max_processes * memory_mb`.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from common.errors import UserError

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap), "
    "or set rewards.allow_unsandboxed_code: true to run policy code without isolation"
)
SANDBOX_DIR = "/sandbox"
# First uid of the pool's slots when running as root (slot i runs as uid_base + i).
DEFAULT_UID_BASE = 61000

# Runs inside the sandbox before the user's code: limits it cannot raise again.
_LAUNCHER = """\
import resource, runpy, sys
for name, value in {limits!r}:
    resource.setrlimit(getattr(resource, name), (value, value))
sys.argv = ["main.py"]
runpy.run_path({main!r}, run_name="__main__")
"""


class SandboxUnavailable(UserError):
    """bwrap is missing or cannot isolate here, and unsandboxed code was not allowed."""


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 5.0  # wall clock; CPU time is capped at ceil(timeout_s) + 1
    memory_mb: int = 512  # address space per process
    max_processes: int = 16  # processes and threads of the run's uid (fork bombs stop here)
    max_file_mb: int = 16  # largest file it may write
    max_open_files: int = 64
    max_output_bytes: int = 1 << 20  # per stream; past it the run is killed and output cut
    tmp_mb: int = 64  # size of the private /tmp


@dataclass
class SandboxResult:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    truncated: bool = False  # output passed the cap and was cut
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.truncated


def _rlimits(limits: SandboxLimits) -> list[tuple[str, int]]:
    cpu = int(limits.timeout_s) + 2
    return [
        ("RLIMIT_CPU", cpu),
        ("RLIMIT_AS", limits.memory_mb << 20),
        ("RLIMIT_NPROC", limits.max_processes),
        ("RLIMIT_FSIZE", limits.max_file_mb << 20),
        ("RLIMIT_NOFILE", limits.max_open_files),
        ("RLIMIT_CORE", 0),
    ]


def _system_binds() -> list[str]:
    """Read-only `/usr`, and `/bin`, `/lib`, ... as the host has them (links or folders)."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64"):
        host = Path("/") / name
        if host.is_symlink():
            args += ["--symlink", os.readlink(host), str(host)]
        elif host.is_dir():
            args += ["--ro-bind", str(host), str(host)]
    return args


def _default_python() -> tuple[str, list[str]]:
    """The interpreter for sandboxed code and the extra read-only binds it needs."""
    system = Path("/usr/bin/python3")
    if system.exists():
        return str(system), []
    exe = str(Path(sys.executable).resolve())
    prefix = str(Path(sys.base_prefix).resolve())
    binds = [] if prefix.startswith("/usr/") or prefix == "/usr" else ["--ro-bind", prefix, prefix]
    return exe, binds


class _CappedReader:
    """Reads a child's stdout and stderr as they come, each up to `cap` bytes."""

    def __init__(self, proc: subprocess.Popen, cap: int) -> None:
        self.cap = cap
        self.chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        self.sizes = {"stdout": 0, "stderr": 0}
        self.selector = selectors.DefaultSelector()
        for name in ("stdout", "stderr"):
            stream = getattr(proc, name)
            os.set_blocking(stream.fileno(), False)
            self.selector.register(stream, selectors.EVENT_READ, name)

    def pump(self, timeout: float) -> bool:
        """Read what is there; False once a stream passed the cap."""
        for key, _ in self.selector.select(timeout):
            name = key.data
            try:
                data = os.read(key.fileobj.fileno(), 65536)
            except BlockingIOError:
                continue
            if not data:
                self.selector.unregister(key.fileobj)
                continue
            room = self.cap - self.sizes[name]
            if room > 0:
                self.chunks[name].append(data[:room])
            self.sizes[name] += len(data)
            if self.sizes[name] > self.cap:
                return False
        return True

    @property
    def open(self) -> bool:
        return bool(self.selector.get_map())

    def text(self, name: str) -> str:
        return b"".join(self.chunks[name]).decode("utf-8", errors="replace")

    def close(self) -> None:
        self.selector.close()


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_namespace_init(proc: subprocess.Popen, init_pid: int | None) -> None:
    """SIGKILL bwrap's init inside the sandbox (the kernel then kills every process of the
    PID namespace), so the outer bwrap reaps it and no zombie is left to the host's init."""
    if init_pid is None:
        return
    try:
        status = Path(f"/proc/{init_pid}/status").read_text()
    except OSError:
        return
    if f"\nPPid:\t{proc.pid}\n" in status:  # still bwrap's child, not a reused pid
        try:
            os.kill(init_pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _read_init_pid(fd: int) -> int | None:
    """The sandbox's init pid from bwrap's `--info-fd` JSON (None if bwrap failed early)."""
    with os.fdopen(fd, "rb") as f:
        data = f.read()
    try:
        return int(json.loads(data)["child-pid"])
    except (ValueError, KeyError, TypeError):
        return None


def _run_capped(cmd: list[str], stdin: str, limits: SandboxLimits, cwd: str | None,
                env: dict[str, str], pass_fds: Sequence[int], user: int | None,
                info_pipe: tuple[int, int] | None = None) -> SandboxResult:
    """Start `cmd` in a session of its own, feed `stdin`, read capped output; on timeout or
    overflow kill the sandbox's init (`info_pipe`: bwrap's --info-fd) and the group."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as stdin_file:
        stdin_file.write(stdin.encode())
        stdin_file.seek(0)
        ids = {"user": user, "group": user, "extra_groups": []} if user is not None else {}
        try:
            proc = subprocess.Popen(
                cmd, stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd,
                env=env, pass_fds=tuple(pass_fds), start_new_session=True, close_fds=True, **ids,
            )
        finally:
            if info_pipe is not None:
                os.close(info_pipe[1])
    init_pid = _read_init_pid(info_pipe[0]) if info_pipe is not None else None
    reader = _CappedReader(proc, limits.max_output_bytes)
    deadline = start + limits.timeout_s
    timed_out = truncated = False
    try:
        while reader.open:
            left = deadline - time.perf_counter()
            if left <= 0:
                timed_out = True
                break
            if not reader.pump(min(left, 0.5)):
                truncated = True
                break
        if not timed_out and not truncated:
            try:
                proc.wait(max(0.0, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        # Always: a child that closed its output and went on must not outlive the call.
        if info_pipe is not None:  # bwrap: its init first, so bwrap itself reaps it
            _kill_namespace_init(proc, init_pid)
            try:
                proc.wait(5.0)
            except subprocess.TimeoutExpired:
                pass
        _kill_group(proc)
        proc.wait()
        reader.close()
        proc.stdout.close()
        proc.stderr.close()
    return SandboxResult(
        None if (timed_out or truncated) else proc.returncode, reader.text("stdout"),
        "timed out" if timed_out else reader.text("stderr"), timed_out, truncated,
        time.perf_counter() - start,
    )


_PROBED: dict[tuple[str, bool], tuple[str | None, float]] = {}  # (bwrap, root) -> (reason, seconds)
_PROBE_LOCK = threading.Lock()
# Hardening that older bwrap releases lack (0.8.0 added --disable-userns): used where known.
OPTIONAL_FLAGS = ("--disable-userns",)
_SUPPORTED: dict[str, tuple[str, ...]] = {}


def _supported_flags(bwrap: str) -> tuple[str, ...]:
    if bwrap not in _SUPPORTED:
        try:
            text = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            text = ""
        _SUPPORTED[bwrap] = tuple(f for f in OPTIONAL_FLAGS if f in text)
    return _SUPPORTED[bwrap]


class CodeSandbox:
    """Runs Python source under bubblewrap; see the module docstring.

    `bwrap`: the binary's name or path (looked up on PATH). `workers`: size of the pool
    `run_many` uses. `uid_base`: first uid of the pool's slots when running as root.
    """

    def __init__(self, limits: SandboxLimits | None = None, bwrap: str = "bwrap",
                 allow_unsandboxed: bool = False, workers: int = 4,
                 uid_base: int = DEFAULT_UID_BASE, python: str | None = None) -> None:
        self.limits = limits or SandboxLimits()
        self.bwrap_name = bwrap
        self.allow_unsandboxed = allow_unsandboxed
        self.workers = max(1, workers)
        self.as_root = os.geteuid() == 0
        self.uids = [uid_base + i for i in range(self.workers)] if self.as_root else []
        self._slots: queue.Queue[int] = queue.Queue()
        for slot in range(self.workers):
            self._slots.put(slot)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        if python is not None:
            self.python, self._python_binds = python, []
        else:
            self.python, self._python_binds = _default_python()

    # ---- availability -------------------------------------------------------------------
    def bwrap_path(self) -> str | None:
        return shutil.which(self.bwrap_name)

    def unavailable_reason(self) -> str | None:
        """Why bwrap cannot isolate here (None when it can); probed once per binary."""
        path = self.bwrap_path()
        if path is None:
            return f"bubblewrap not found ({self.bwrap_name!r} is not on PATH)"
        key = (path, self.as_root)
        with _PROBE_LOCK:
            if key not in _PROBED:
                result = self._run_sandboxed(path, "pass", "", replace(self.limits, timeout_s=10.0),
                                             slot=0)
                reason = None if result.ok else (
                    f"{path} cannot create the sandbox's namespaces: "
                    f"{(result.stderr.strip().splitlines() or ['no message'])[-1]}"
                )
                _PROBED[key] = (reason, result.seconds)
            return _PROBED[key][0]

    @property
    def sandboxed(self) -> bool:
        return self.unavailable_reason() is None

    def check(self) -> bool:
        """True when runs are isolated; False (with a warning) when unsandboxed runs were
        allowed; raises SandboxUnavailable otherwise."""
        reason = self.unavailable_reason()
        if reason is None:
            seconds = _PROBED[(self.bwrap_path(), self.as_root)][1]
            logger.info("code reward: programs run in a bwrap sandbox (%s; %.0f ms to start one)",
                        self.bwrap_path(), 1000 * seconds)
            return True
        if not self.allow_unsandboxed:
            raise SandboxUnavailable(f"code reward: {reason}; {INSTALL_HINT}")
        logger.warning("code reward runs policy code WITHOUT a sandbox (%s; "
                       "rewards.allow_unsandboxed_code is true)", reason)
        return False

    # ---- running ------------------------------------------------------------------------
    def run(self, code: str, stdin: str = "", limits: SandboxLimits | None = None) -> SandboxResult:
        """Run `code` once; blocks for at most `limits.timeout_s` plus the start-up."""
        limits = limits or self.limits
        slot = self._slots.get()
        try:
            reason = self.unavailable_reason()
            if reason is None:
                return self._run_sandboxed(self.bwrap_path(), code, stdin, limits, slot)
            if not self.allow_unsandboxed:
                raise SandboxUnavailable(f"code reward: {reason}; {INSTALL_HINT}")
            return self._run_unsandboxed(code, stdin, limits)  # check() warned once per stage
        finally:
            self._slots.put(slot)

    def run_many(self, jobs: Sequence[tuple[str, str, SandboxLimits | None]]) -> list[SandboxResult]:
        """`(code, stdin, limits)` jobs run `workers` at a time; results in job order."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="sandbox")
        return list(self._pool.map(lambda job: self.run(*job), jobs))

    def _run_sandboxed(self, bwrap: str, code: str, stdin: str, limits: SandboxLimits,
                       slot: int) -> SandboxResult:
        main = f"{SANDBOX_DIR}/main.py"
        launcher = _LAUNCHER.format(limits=_rlimits(limits), main=main)
        with tempfile.TemporaryFile() as code_file, tempfile.TemporaryFile() as launch_file:
            code_file.write(code.encode())
            launch_file.write(launcher.encode())
            for f in (code_file, launch_file):
                f.flush()
                f.seek(0)
            cmd = [
                bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc",
                "--unshare-uts", "--unshare-cgroup-try", "--hostname", "sandbox",
                "--die-with-parent", "--as-pid-1", "--new-session", *_supported_flags(bwrap), "--clearenv",
                "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
                *_system_binds(), *self._python_binds,
                "--proc", "/proc", "--dev", "/dev",
                "--size", str(limits.tmp_mb << 20), "--tmpfs", "/tmp",
                "--perms", "0444", "--ro-bind-data", str(code_file.fileno()), main,
                "--perms", "0444", "--ro-bind-data", str(launch_file.fileno()),
                f"{SANDBOX_DIR}/launch.py",
                "--remount-ro", "/", "--chdir", "/tmp",
                self.python, "-I", "-S", f"{SANDBOX_DIR}/launch.py",
            ]
            info = os.pipe()
            cmd[1:1] = ["--info-fd", str(info[1])]
            user = self.uids[slot] if self.as_root else None
            return _run_capped(cmd, stdin, limits, None, {},
                               (code_file.fileno(), launch_file.fileno(), info[1]), user, info)

    def _run_unsandboxed(self, code: str, stdin: str, limits: SandboxLimits) -> SandboxResult:
        with tempfile.TemporaryDirectory(prefix="llmpost-code-") as work:
            main = os.path.join(work, "main.py")
            Path(main).write_text(code)
            launch = os.path.join(work, "launch.py")
            Path(launch).write_text(_LAUNCHER.format(limits=_rlimits(limits), main=main))
            return _run_capped([self.python, "-I", "-S", launch], stdin, limits, work,
                               {"PATH": "/usr/bin:/bin", "HOME": work}, (), None)

    def startup_seconds(self, runs: int = 5) -> float:
        """Mean wall time of a run of `pass`: the sandbox's cost per call."""
        self.run("pass")
        start = time.perf_counter()
        for _ in range(runs):
            self.run("pass")
        return (time.perf_counter() - start) / runs

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def run_python(code: str, stdin: str = "", timeout_s: float = 5.0, memory_mb: int = 512,
               sandbox: CodeSandbox | None = None) -> SandboxResult:
    """Run `code` once in `sandbox` (default: a bwrap sandbox with default limits)."""
    sandbox = sandbox or CodeSandbox(workers=1)
    limits = replace(sandbox.limits, timeout_s=timeout_s, memory_mb=memory_mb)
    return sandbox.run(code, stdin, limits)
