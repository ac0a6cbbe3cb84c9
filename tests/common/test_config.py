import re
from dataclasses import dataclass, field
from typing import Literal

import pytest

from common.config import load_config, save_config
from common.errors import ConfigError


@dataclass
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "constant"] = "cosine"


@dataclass
class Run:
    name: str = "run"
    steps: int = 10
    resume: bool = False
    out: str | None = None
    optim: Optim = field(default_factory=Optim)
    tags: list[str] = field(default_factory=list)


def write(tmp_path, text):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_load_nested_with_overrides(tmp_path):
    p = write(tmp_path, "steps: 5\noptim:\n  lr: 1e-3\n  betas: [0.8, 0.9]\ntags: [a]\n")
    cfg = load_config(Run, p, ["optim.schedule=constant", "name=x", "out=null"])
    assert cfg.steps == 5 and cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.optim.schedule == "constant" and cfg.name == "x" and cfg.out is None
    assert cfg.tags == ["a"]


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "optim:\n  lrr: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(Run, p)
    msg = str(err.value)
    assert "optim.lrr" in msg and str(p) in msg and "lr" in msg


def test_unknown_override_names_the_override(tmp_path):
    with pytest.raises(ConfigError, match=r"--set optim.lrr=1.*optim.lrr"):
        load_config(Run, None, ["optim.lrr=1"])


def test_wrong_type_names_key_file_and_expected_type(tmp_path):
    p = write(tmp_path, "steps: ten\n")
    with pytest.raises(ConfigError) as err:
        load_config(Run, p)
    msg = str(err.value)
    assert "'steps'" in msg and str(p) in msg and "int" in msg and "ten" in msg
    with pytest.raises(ConfigError, match="expects one of"):
        load_config(Run, None, ["optim.schedule=linear"])
    with pytest.raises(ConfigError, match="bool"):
        load_config(Run, None, ["resume=3"])


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found: /no/such.yaml"):
        load_config(Run, "/no/such.yaml")


def test_save_round_trip(tmp_path):
    cfg = load_config(Run, None, ["optim.lr=0.5", "tags=[x, y]"])
    path = save_config(cfg, tmp_path / "run")
    assert path.name == "config.yaml"
    assert load_config(Run, path) == cfg


@dataclass
class Limited:
    LIMITS = {"lr": ">0", "fraction": "[0,1]", "every": ">=1", "ratio": "(0,1)"}
    lr: float = 1e-3
    fraction: float = 0.5
    every: int = 10
    ratio: float | None = None


@dataclass
class LimitedRun:
    train: Limited = field(default_factory=Limited)


@pytest.mark.parametrize("override, message", [
    ("train.lr=-1e-4", r"key 'train.lr' expects a value > 0, got -0.0001"),
    ("train.lr=0", r"key 'train.lr' expects a value > 0"),
    ("train.fraction=1.5", r"key 'train.fraction' expects a value in \[0,1\], got 1.5"),
    ("train.every=0", r"key 'train.every' expects a value >= 1, got 0"),
    ("train.ratio=1", r"key 'train.ratio' expects a value in \(0,1\)"),
])
def test_limits_are_checked_on_load_and_name_the_key(override, message):
    with pytest.raises(ConfigError, match=rf"--set {re.escape(override)}: {message}"):
        load_config(LimitedRun, None, [override])


def test_limits_accept_their_bounds_and_none(tmp_path):
    cfg = load_config(LimitedRun, write(tmp_path, "train:\n  fraction: 1\n  every: 1\n  ratio: null\n"))
    assert cfg.train.fraction == 1.0 and cfg.train.every == 1 and cfg.train.ratio is None
    with pytest.raises(ConfigError, match=rf"{re.escape(str(tmp_path))}.*'train.fraction'.*-0.1"):
        load_config(LimitedRun, write(tmp_path, "train:\n  fraction: -0.1\n"))


def test_non_utf8_yaml_is_one_line_naming_the_file(tmp_path):
    p = tmp_path / "cfg.yaml"
    p.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(p))}: not UTF-8 text"):
        load_config(Run, p)
    p.write_text("steps: [1,\n")
    with pytest.raises(ConfigError) as err:
        load_config(Run, p)
    assert "not valid YAML" in str(err.value) and "\n" not in str(err.value)


def test_unknown_section_added_by_set_is_blamed_on_set(tmp_path):
    p = write(tmp_path, "steps: 3\n")
    with pytest.raises(ConfigError, match=r"^--set stage9.lr=1: unknown key 'stage9'"):
        load_config(Run, p, ["stage9.lr=1"])


def test_resume_mismatch_lists_the_changed_keys_only(tmp_path):
    from common.config import check_resume_config, resume_mismatch

    saved = save_config(load_config(Run, None, ["optim.lr=0.5"]), tmp_path)
    before = saved.read_bytes()
    now = load_config(Run, None, ["optim.lr=0.1", "steps=20", "name=other"])
    diff = resume_mismatch(now, saved, ["optim", "steps"])
    assert diff == ["optim.lr: 0.5 -> 0.1", "steps: 10 -> 20"]  # name is not compared
    with pytest.raises(ConfigError, match=r"optim.lr: 0.5 -> 0.1; steps: 10 -> 20.*--resume-force"):
        check_resume_config(now, tmp_path, ["optim", "steps"], force=False)
    check_resume_config(now, tmp_path, ["optim", "steps"], force=True)  # logged, not raised
    assert saved.read_bytes() == before
    assert resume_mismatch(now, tmp_path / "missing.yaml", ["optim"]) == []


def test_run_dir_that_is_a_file_is_refused(tmp_path):
    from common.config import check_run_dir

    f = tmp_path / "out"
    f.write_text("x")
    with pytest.raises(ConfigError, match=r"out_dir: .*out is a file, expected a directory"):
        check_run_dir(Run(), f, "out_dir")
    with pytest.raises(ConfigError, match="is a file"):
        save_config(Run(), f)


def test_resume_mismatch_skips_keys_a_saved_config_does_not_have(tmp_path):
    from common.config import resume_mismatch

    saved = write(tmp_path, "optim:\n  lr: 0.5\n")  # written before `steps` existed
    now = load_config(Run, None, ["optim.lr=0.5", "steps=20"])
    assert resume_mismatch(now, saved, ["optim", "steps"]) == []
