"""Strict typed configs: YAML file + dotted ``key=value`` overrides -> frozen dataclasses.

Every job's config is a tree of frozen, keyword-only dataclasses; only those classes hold defaults. Loading
fails at once, naming the key and the file, on an unknown key, a wrong type or a bad value (a dataclass's
``__post_init__`` raising ``ValueError``). Ray Tune and the command line override the same dotted keys.

    cfg = load_config(SftConfig, "jobs/configs/sft/tiny.yaml", ["train.steps=10", "model.name=x"])
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and where it came from."""


def load_config(cls: type[C], path: str | Path | None, overrides: Sequence[str] = ()) -> C:
    """Build ``cls`` from a YAML file (or none: defaults only) plus dotted ``key=value`` overrides."""
    where = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value, where=f"override {item!r}")
    return from_dict(cls, raw, where=where)


def from_dict(cls: type[C], data: Mapping[str, Any], *, where: str = "<dict>") -> C:
    """Validate a plain mapping into the dataclass ``cls`` (recursively), failing with the dotted key."""
    return typing.cast(C, _build(cls, data, key="", where=where))


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=3`` -> ("a.b", 3). The value is parsed as YAML, so ``x=[1,2]``, ``x=null``, ``x=true`` work."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from None
    return key, value


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain JSON-able data (tuples become lists)."""
    return typing.cast(dict[str, Any], json.loads(json.dumps(dataclasses.asdict(cfg), default=str)))


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys -> leaf values, e.g. for MLflow params: {"train.lr": 1e-4, ...}."""
    out: dict[str, Any] = {}
    for key, value in (to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg).items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, prefix=f"{dotted}."))
        else:
            out[dotted] = value
    return out


def config_hash(cfg: Any, *, length: int = 12) -> str:
    """A stable short hash of the config's content (what caches and run names key on)."""
    text = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML that ``load_config`` reads back unchanged."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


# --- internals -----------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def _set_dotted(raw: dict[str, Any], key: str, value: Any, *, where: str) -> None:
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build(tp: Any, value: Any, *, key: str, where: str) -> Any:
    name = key or "<root>"
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _build_dataclass(tp, value, key=key, where=where)
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: '{name}' must be one of {list(get_args(tp))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        return _build_union(tp, value, key=key, where=where)
    if origin in (list, tuple, Sequence):
        return _build_sequence(tp, value, key=key, where=where)
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: '{name}' must be a mapping, got {value!r}")
        _, vt = get_args(tp) or (str, Any)
        return {str(k): _build(vt, v, key=f"{key}.{k}", where=where) for k, v in value.items()}
    return _build_scalar(tp, value, key=name, where=where)


def _build_dataclass(cls: type, value: Any, *, key: str, where: str) -> Any:
    name = key or "<root>"
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: '{name}' must be a section (mapping), got {value!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        dotted = ", ".join(f"'{key + '.' if key else ''}{u}'" for u in unknown)
        raise ConfigError(f"{where}: unknown key {dotted}; known keys here: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {
        fname: _build(hints[fname], value[fname], key=f"{key + '.' if key else ''}{fname}", where=where)
        for fname in fields
        if fname in value
    }
    missing = [
        f
        for f, fd in fields.items()
        if f not in kwargs and fd.default is dataclasses.MISSING and fd.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {[f'{key}.{m}'.lstrip('.') for m in missing]}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: bad value in '{name}': {exc}") from None


def _build_union(tp: Any, value: Any, *, key: str, where: str) -> Any:
    args = get_args(tp)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{where}: '{key}' must not be null")
    errors = []
    for arg in (a for a in args if a is not type(None)):
        try:
            return _build(arg, value, key=key, where=where)
        except ConfigError as exc:
            errors.append(str(exc))
    raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: '{key}' matches no allowed type: {errors}")


def _build_sequence(tp: Any, value: Any, *, key: str, where: str) -> tuple[Any, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ConfigError(f"{where}: '{key}' must be a list, got {value!r}")
    args = get_args(tp)
    if get_origin(tp) is tuple and args and args[-1] is not Ellipsis:
        if len(args) != len(value):
            raise ConfigError(f"{where}: '{key}' must have {len(args)} items, got {len(value)}")
        return tuple(
            _build(a, v, key=f"{key}[{i}]", where=where) for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    item_tp = args[0] if args else Any
    return tuple(_build(item_tp, v, key=f"{key}[{i}]", where=where) for i, v in enumerate(value))


_EXPONENT_LITERAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _build_scalar(tp: Any, value: Any, *, key: str, where: str) -> Any:
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _EXPONENT_LITERAL.fullmatch(value):
        return float(value)  # YAML 1.1 reads "3e-6" (no dot) as a string; it is the number everyone means
    if tp is Path and isinstance(value, str):
        return Path(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: '{key}' must be true or false, got {value!r}")
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: '{key}' must be of type {tp.__name__}, got {type(value).__name__} {value!r}")
    return value
