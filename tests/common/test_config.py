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
