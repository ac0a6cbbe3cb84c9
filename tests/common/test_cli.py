import sys

import pytest

from common.cli import run_cli


@pytest.fixture
def fake_commands(tmp_path, monkeypatch):
    pkg = tmp_path / "fakecli"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "good.py").write_text(
        'HELP = "does a good thing"\n'
        "def add_arguments(p):\n    p.add_argument('--n', type=int, default=1)\n"
        "def run(args):\n    return args.n\n"
    )
    (pkg / "bad.py").write_text(
        'HELP = "fails on input"\nimport sys\nsys.modules["fakecli"].imported_bad = True\n'
        "from common.errors import DataError\n"
        "def add_arguments(p):\n    pass\n"
        "def run(args):\n    raise DataError('rows.jsonl: row 3: field caption is empty')\n"
    )
    (pkg / "path.py").write_text(
        'HELP = "opens a directory"\n'
        "def add_arguments(p):\n    p.add_argument('--file')\n"
        "def run(args):\n    open(args.file).read()\n"
    )
    (pkg / "bug.py").write_text(
        'HELP = "has a bug"\n'
        "def add_arguments(p):\n    pass\n"
        "def run(args):\n    return {}['missing']\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield {"good": "fakecli.good", "bad": "fakecli.bad", "later": "fakecli.not_written_yet",
           "path": "fakecli.path", "bug": "fakecli.bug"}
    for name in [m for m in sys.modules if m.startswith("fakecli")]:
        del sys.modules[name]


def test_help_lists_existing_commands_without_importing_them(fake_commands, capsys):
    assert run_cli("prog", fake_commands, []) == 0
    out = capsys.readouterr().out
    assert "does a good thing" in out and "fails on input" in out and "later" not in out
    assert not getattr(sys.modules["fakecli"], "imported_bad", False)


def test_runs_the_chosen_command(fake_commands):
    assert run_cli("prog", fake_commands, ["good", "--n", "7"]) == 7


def test_user_error_is_one_line_and_exit_1(fake_commands, capsys):
    assert run_cli("prog", fake_commands, ["bad"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["prog bad: error: rows.jsonl: row 3: field caption is empty"]


def test_a_path_error_is_one_line_but_a_bug_keeps_its_traceback(fake_commands, tmp_path, capsys):
    assert run_cli("prog", fake_commands, ["path", "--file", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("prog path: error: ") and str(tmp_path) in err and err.count("\n") == 1
    with pytest.raises(KeyError):
        run_cli("prog", fake_commands, ["bug"])
