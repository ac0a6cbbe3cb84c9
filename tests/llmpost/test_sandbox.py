"""The code reward's bubblewrap sandbox, attacked by real programs through the registry.

Each hostile program would print the reference ("done") if its attack worked; in the
sandbox it is scored 0, the test process survives, no process of the run is left, and
the caller's memory stays within the output cap. Needs bwrap (CI installs it as root).
"""

import os
import random
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from llmpost.rewards import default_registry
from llmpost.sandbox import CodeSandbox, SandboxLimits, SandboxUnavailable

LIMITS = SandboxLimits(timeout_s=2.0, memory_mb=256, max_processes=12)
OUTPUT_CAP = LIMITS.max_output_bytes


def _bwrap_works() -> bool:
    return CodeSandbox(workers=1).unavailable_reason() is None


# CI sets REGPOST_REQUIRE_SANDBOX=1: there a sandbox that cannot start fails instead of skipping.
pytestmark = pytest.mark.skipif(
    not os.environ.get("REGPOST_REQUIRE_SANDBOX") and not _bwrap_works(),
    reason="bubblewrap cannot isolate here",
)


@pytest.fixture(scope="module")
def sandbox():
    # A uid range of its own, so the process checks below see only this test's runs.
    sb = CodeSandbox(LIMITS, workers=2, uid_base=random.randrange(200_000, 400_000, 16))
    yield sb
    sb.close()


def _sandbox_pids(sb: CodeSandbox) -> list[int]:
    """Live processes that belong to the sandbox's runs."""
    mine = os.readlink("/proc/self/ns/pid")
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
            uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))
            ns = os.readlink(f"/proc/{entry}/ns/pid")
        except (OSError, AttributeError):
            continue
        if (uid in sb.uids) if sb.uids else (uid == os.getuid() and ns != mine):
            found.append(int(entry))
    return found


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _peak_rss() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) * 1024


def _score(sb: CodeSandbox, code: str, reference: str = "done", **meta) -> float:
    registry = default_registry(code_sandbox=sb)
    return registry.score("code", "prompt", f"```python\n{code}\n```", reference, meta)


def _trainer_cwd_target() -> Path:
    return Path.cwd() / f"sandbox_escape_{os.getpid()}.txt"


HOSTILE = {
    "infinite_loop": "while True:\n    pass\nprint('done')",
    "sleep": "import time\ntime.sleep(60)\nprint('done')",
    "allocate_10GB": "x = bytearray(10 * 1024 ** 3)\nprint('done')",
    "stdout_flood_300MB": (
        "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(300):\n    sys.stdout.write(chunk)\n"
        "print('done')"
    ),
    "read_etc_shadow": "print(open('/etc/shadow').read() and 'done')",
    "read_trainer_environ": "print(open('/proc/{pid}/environ').read() and 'done')",
    "write_outside_tmp": (
        "for path in ['{target}', '/usr/escape.txt', '/root/escape.txt', '/escape.txt']:\n"
        "    open(path, 'w').write('x')\nprint('done')"
    ),
    "raw_socket_connect": (
        "import _socket\ns = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\n"
        "s.settimeout(1)\ns.connect(('127.0.0.1', {port}))\nprint('done')"
    ),
    "kill_parent_and_trainer": (
        "import os, time\nos.kill(os.getppid(), 9)\ntime.sleep(0.2)\nos.kill({pid}, 9)\nprint('done')"
    ),
    # The answer comes from a detached grandchild after the parent exits; a second one
    # closes its output and would run on for a minute.
    "detached_children": (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(0.5)\n"
        "        print('done', flush=True)\n"
        "        time.sleep(60)\n"
        "    os._exit(0)\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    os.close(1); os.close(2)\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "time.sleep(0.1)\n"
    ),
}


@pytest.mark.parametrize("attack", sorted(HOSTILE))
def test_hostile_program_scores_0_and_leaves_nothing(sandbox, attack):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.05)
    target = _trainer_cwd_target()
    code = HOSTILE[attack].format(pid=os.getpid(), port=listener.getsockname()[1], target=target)
    _reset_peak_rss()
    before = _peak_rss()
    start = time.monotonic()
    try:
        score = _score(sandbox, code)
        if attack == "detached_children":
            time.sleep(1.0)  # the grandchild would have printed by now, were it alive
        with pytest.raises(OSError):
            listener.accept()  # nothing reached the host's loopback
    finally:
        listener.close()
    assert score == 0.0
    assert time.monotonic() - start < LIMITS.timeout_s + 5
    assert not target.exists()
    assert _sandbox_pids(sandbox) == []
    assert _peak_rss() - before < 2 * OUTPUT_CAP + (8 << 20)


def test_fork_bomb_is_capped_by_the_process_limit(sandbox):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    seen, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            seen[0] = max(seen[0], len(_sandbox_pids(sandbox)))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        score = _score(sandbox, bomb)
    finally:
        stop.set()
        watcher.join()
    assert score == 0.0
    assert 2 < seen[0] <= LIMITS.max_processes + 1  # bwrap's outer process is not counted
    assert _sandbox_pids(sandbox) == []
    assert os.getloadavg() is not None  # the machine still answers


def test_correct_programs_still_score_1(sandbox):
    assert _score(sandbox, "print(sum(range(10)))", reference="45") == 1.0
    good = "def add(a, b):\n    return a + b"
    assert _score(sandbox, good, reference="", tests="assert add(2, 3) == 5") == 1.0
    assert _score(sandbox, good.replace("+", "-"), reference="", tests="assert add(2, 3) == 5") == 0.0
    io = "import sys\nprint(int(sys.stdin.read()) * 2)"
    assert _score(sandbox, io, reference="14", stdin="7") == 1.0
    assert _score(sandbox, "open('/tmp/a', 'w').write('ok')\nprint(open('/tmp/a').read())",
                  reference="ok") == 1.0


def _concurrent_runs(sb: CodeSandbox) -> int:
    """How many sandboxed runs are alive now: each run's program is PID 1 of a namespace of
    its own (bwrap's outer process stays in ours and is not counted)."""
    ours, namespaces = os.readlink("/proc/self/ns/pid"), set()
    for pid in _sandbox_pids(sb):
        try:
            namespaces.add(os.readlink(f"/proc/{pid}/ns/pid"))
        except OSError:
            continue
    return len(namespaces - {ours})


def test_pool_runs_slow_programs_side_by_side(sandbox):
    """Seen from the host, not timed: while two 2-second programs run, a watcher finds two
    sandboxed runs alive at once."""
    registry = default_registry(code_sandbox=sandbox)
    slow = "```python\nimport time\ntime.sleep(2)\nprint('done')\n```"
    items = [("code", "p", slow, "done", {"timeout_s": 6}), ("code", "p", "print('done')", "done", {}),
             ("exact_match", "p", "a", "a", None)]
    most, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            most[0] = max(most[0], _concurrent_runs(sandbox))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        scores = registry.score_many(items + [items[0]])
    finally:
        stop.set()
        watcher.join()
    assert scores == [1.0, 1.0, 1.0, 1.0]
    assert most[0] >= 2  # one after the other, the watcher would never see more than one


def test_startup_cost_per_call_is_small(sandbox):
    """A sandboxed run of `pass` against a bare `python -I -S -c pass`, measured in the same
    run: 31-48 ms against 7-9 ms (3.7-6.3x) on the 2-core CPU, idle or with three busy
    loops beside it. The bound catches a per-call cost that grows (a copy, an import)."""
    sandboxed = sandbox.startup_seconds(runs=5)
    start = time.perf_counter()
    for _ in range(5):
        subprocess.run([sandbox.python, "-I", "-S", "-c", "pass"], check=True)
    bare = (time.perf_counter() - start) / 5
    assert sandboxed < 15 * bare, (sandboxed, bare)


def test_refuses_without_bwrap_and_runs_unsandboxed_only_when_allowed(caplog):
    quick = SandboxLimits(timeout_s=1.0, memory_mb=256)
    hidden = CodeSandbox(LIMITS, bwrap="/nonexistent/bwrap", workers=1)
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        default_registry(code_sandbox=hidden).score("code", "p", "print('done')", "done")
    allowed = CodeSandbox(quick, bwrap="/nonexistent/bwrap", allow_unsandboxed=True, workers=1)
    with caplog.at_level("WARNING"):
        assert allowed.check() is False
    assert "WITHOUT a sandbox" in caplog.text
    assert _score(allowed, "print('done')") == 1.0
    assert _score(allowed, "while True:\n    pass") == 0.0


def test_refusal_names_the_fix_when_bwrap_is_not_on_path(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SandboxUnavailable, match="bubblewrap not found.*install"):
        CodeSandbox(LIMITS, workers=1).check()


def test_record_check_refuses_code_rows_without_bwrap_and_warns_each_stage_when_allowed(caplog):
    from llmpost.data import TaskRecord

    rows = [TaskRecord("c1", "code", "sns", "42", "code", prompt="print 42", source="t.jsonl:1")]
    hidden = CodeSandbox(LIMITS, bwrap="/nonexistent/bwrap", workers=1)
    with pytest.raises(SandboxUnavailable, match="install bubblewrap"):
        default_registry(code_sandbox=hidden).check_records(rows)
    default_registry(code_sandbox=hidden).check_records([])  # no code rows: nothing to refuse
    allowed = CodeSandbox(LIMITS, bwrap="/nonexistent/bwrap", allow_unsandboxed=True, workers=1)
    registry = default_registry(code_sandbox=allowed)
    with caplog.at_level("WARNING"):
        registry.check_records(rows)  # stage 1
        registry.check_records(rows)  # stage 3
    assert caplog.text.count("WITHOUT a sandbox") == 2
