"""Dataclass configs from YAML, with dotted command-line overrides.

A config is a tree of dataclasses. `load_config(Cls, "run.yaml", ["train.lr=1e-5"])`
reads the file, applies each override (its value parsed as YAML), and builds `Cls`,
checking every key and type on the way: an unknown key, a wrong type or a missing
file is a `ConfigError` that names the key, where it came from and what was expected.
A config dataclass may declare value ranges in a plain class attribute,
`LIMITS = {"lr": ">0", "fraction": "[0,1]", "log_every": ">=1"}`, checked on load the
same way. `save_config` writes the resolved config into a run directory, so a run can be
repeated from its own folder; `resume_mismatch` compares it with a checkpoint's copy.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from common.errors import ConfigError
from common.io import write_text_atomic

T = TypeVar("T")
CONFIG_FILENAME = "config.yaml"


def add_config_args(parser: argparse.ArgumentParser, required: bool = True,
                    example: str | None = None) -> None:
    """`--config FILE` and repeatable `--set KEY=VALUE` (dotted keys, YAML values);
    `example` is a real `KEY=VALUE` of the command's config, shown in the help."""
    parser.add_argument("--config", required=required, help="YAML config file")
    shown = f", e.g. --set {example}" if example else ""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override one config key (dotted key, YAML value){shown}; repeatable",
    )


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    return load_config(cls, getattr(args, "config", None), getattr(args, "overrides", []))


def load_config(cls: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """Build dataclass `cls` from a YAML file (or defaults when `path` is None) and overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
        except yaml.YAMLError as err:
            detail = " ".join(str(err).split())
            raise ConfigError(f"{path}: not valid YAML: {detail}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(loaded).__name__}")
        data = loaded
    origins: dict[str, str] = {}
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(data, key, value)
        origins[key] = f"--set {item}"
    return _build(cls, data, prefix="", source=source, origins=origins)


def save_config(cfg: Any, run_dir: str | Path) -> Path:
    """Write the resolved config to `run_dir/config.yaml` and return its path."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: is a file, expected a directory for the run")
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / CONFIG_FILENAME
    return write_text_atomic(out, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def to_dict(cfg: Any) -> Any:
    """A config as plain YAML-able data (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. train.lr=1e-5")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    node[parts[-1]] = value


def _origin(key: str, source: str, origins: dict[str, str]) -> str:
    """The `--set` that gave `key` (or a key under it), else the file."""
    if key in origins:
        return origins[key]
    below = [origin for k, origin in origins.items() if k.startswith(key + ".")]
    return below[0] if below else source


def _where(prefix: str, name: str, source: str, origins: dict[str, str]) -> str:
    key = f"{prefix}{name}"
    return f"{_origin(key, source, origins)}: key '{key}'"


def _check_limit(value: Any, rule: str, where: str) -> None:
    """`rule` is ">0", ">=1", "<=1", "[0,1]", "(0,1]", ...; None values pass."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    rule = rule.replace(" ", "")
    if rule[0] in "[(":
        low, high = (float(x) for x in rule[1:-1].split(","))
        ok = (value >= low if rule[0] == "[" else value > low) and (
            value <= high if rule[-1] == "]" else value < high)
        expected = f"a value in {rule}"
    else:
        op = rule[:2] if rule[1] == "=" else rule[:1]
        bound = float(rule[len(op):])
        ok = {">": value > bound, ">=": value >= bound, "<": value < bound,
              "<=": value <= bound}[op]
        expected = f"a value {op} {rule[len(op):]}"
    if not ok:
        raise ConfigError(f"{where} expects {expected}, got {value!r}")


def _build(cls: type[T], data: Any, prefix: str, source: str, origins: dict[str, str]) -> T:
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: key '{prefix.rstrip('.') or '<top>'}' expects a mapping for {cls.__name__}, "
            f"got {type(data).__name__}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(
            f"{_origin(key, source, origins)}: unknown key '{key}' for {cls.__name__}; "
            f"known keys: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], prefix, name, source, origins)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key '{prefix}{name}' ({_type_name(hints[name])})")
    built = cls(**kwargs)
    for name, rule in getattr(cls, "LIMITS", {}).items():
        _check_limit(getattr(built, name), rule, _where(prefix, name, source, origins))
    return built


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, prefix: str, name: str, source: str, origins: dict[str, str]) -> Any:
    """Check `value` against annotation `tp`; convert only where it is lossless."""
    where = _where(prefix, name, source, origins)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def fail() -> typing.NoReturn:
        raise ConfigError(f"{where} expects {_type_name(tp)}, got {type(value).__name__} {value!r}")

    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, prefix, name, source, origins)
            except ConfigError:
                continue
        fail()
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{where} expects one of {list(args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, f"{prefix}{name}.", source, origins)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            fail()
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                fail()
            items = [_coerce(v, a, prefix, name, source, origins) for v, a in zip(value, args)]
        else:
            item_tp = args[0] if args else Any
            items = [_coerce(v, item_tp, prefix, name, source, origins) for v in value]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            fail()
        val_tp = args[1] if args else Any
        return {k: _coerce(v, val_tp, prefix, f"{name}.{k}", source, origins) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                fail()
        fail()
    if tp is str:
        if isinstance(value, str):
            return value
        fail()
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        fail()
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    fail()


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}` (lists stay values)."""
    if not isinstance(data, dict):
        return {prefix.rstrip("."): data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}{key}."))
    return out


def resume_mismatch(cfg: Any, saved: str | Path, keys: Sequence[str]) -> list[str]:
    """Keys under the dotted prefixes `keys` (e.g. "model", "loss", "train.batch_size") whose
    value in `cfg` differs from the run's saved `config.yaml`; each as `key: saved -> now`.
    A missing saved file means nothing to compare."""
    saved = Path(saved)
    if not saved.is_file():
        return []
    try:
        before = flatten(yaml.safe_load(saved.read_text(encoding="utf-8")) or {})
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{saved}: the run's saved config cannot be read ({type(err).__name__})") from None
    now = flatten(to_dict(cfg))
    wanted = tuple(keys)

    def relevant(key: str) -> bool:
        return any(key == k or key.startswith(k + ".") for k in wanted)

    # A key on one side only came with a newer (or older) version of the code: not compared.
    return [f"{key}: {before[key]!r} -> {now[key]!r}"
            for key in sorted(k for k in before.keys() & now.keys() if relevant(k))
            if before[key] != now[key]]


def check_resume_config(cfg: Any, run_dir: str | Path, keys: Sequence[str], force: bool) -> None:
    """Stop a resume whose config differs from the run's saved one in `keys` (the settings
    that change what the checkpoint means), unless `force`: then the differences are
    logged. Call it before writing the new config.yaml."""
    path = Path(run_dir) / CONFIG_FILENAME
    diff = resume_mismatch(cfg, path, keys)
    if not diff:
        return
    if force:
        logging.getLogger(__name__).warning(
            "--resume-force: resuming although the config differs from %s: %s", path, "; ".join(diff))
        return
    raise ConfigError(
        f"{path}: resuming with a different config ({'; '.join(diff)}); "
        "use the saved config, or --resume-force to continue anyway"
    )


def check_run_dir(cfg: Any, run_dir: str | Path, key: str, resume_keys: Sequence[str] | None = None,
                  force: bool = False) -> None:
    """Before anything is built or written: `run_dir` (config key `key`) must be a folder or
    not exist yet, and a resume (`resume_keys` given) must match the saved config."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{key}: {run_dir} is a file, expected a directory for the run")
    if resume_keys is not None:
        check_resume_config(cfg, run_dir, resume_keys, force)


def check_config(cfg: Any) -> None:
    """Check a config built or changed in code as `load_config` checks a file: types,
    `Literal` choices and `LIMITS` (a ConfigError naming the key)."""
    _build(type(cfg), to_dict(cfg), prefix="", source="config", origins={})
