"""Run configurations: nested frozen dataclasses, read from YAML files (a ``base:`` key inherits another file) and
overridden from the command line (``--set optim.lr=1e-4``). An unknown key or an ill-typed value is an error that
names the file or flag it came from; ``describe`` lists every field with its type, default and help.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml


class ConfigError(ValueError):
    """A configuration that cannot be built; the message names the key and where it came from."""


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, typ: Any, key: str, where: str) -> Any:
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key} must be a list, not {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, key, where) for v in value)
    if typ is Any:
        return value
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ in (int, float, str, bool) and (not isinstance(value, typ) or (typ is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: {key} must be {typ.__name__}, not {value!r}")
    return value


def build(cls, data: Mapping[str, Any] | None, where: str, prefix: str = ""):
    """``cls`` (a dataclass) from a nested mapping; missing keys keep their defaults."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(prefix + k for k in unknown)}; known under {prefix or 'the top level'}: "
            f"{', '.join(sorted(fields))}"
        )
    hints = _hints(cls)
    kw = {}
    for name, value in data.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: {prefix}{name} is a section, not {value!r}")
            kw[name] = build(typ, value, where, f"{prefix}{name}.")
        else:
            kw[name] = _coerce(value, typ, prefix + name, where)
            _check_range(kw[name], fields[name].metadata, prefix + name, where)
    return cls(**kw)


def _check_range(value: Any, meta: Mapping[str, Any], key: str, where: str) -> None:
    """A number within its field's ``min`` / ``max`` metadata (and finite): the one place ranges are checked."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {key} must be a finite number, not {value}")
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{where}: {key} must be at least {meta['min']}, not {value}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{where}: {key} must be at most {meta['max']}, not {value}")


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def read_yaml(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML mapping; ``base: other.yaml`` (relative to this file) is read first and overridden by this one."""
    path = Path(path).resolve()
    if path in _chain:
        raise ConfigError(f"{path}: 'base' files form a cycle: {' -> '.join(p.name for p in (*_chain, path))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the config ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file holds a mapping, not {type(data).__name__}")
    base = data.pop("base", None)
    return merge(read_yaml(path.parent / base, (*_chain, path)), data) if base else data


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``["optim.lr=1e-4", "data.path=x.json"]`` -> a nested mapping; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def load(cls, path: str | os.PathLike | None = None, sets: Sequence[str] = ()):
    """``cls`` from an optional YAML file and ``--set`` overrides (the overrides win)."""
    data = read_yaml(path) if path else {}
    where = str(path) if path else "defaults"
    if sets:
        data = merge(data, parse_sets(sets))
        where += " + --set " + " ".join(sets)
    return build(cls, data, where)


def to_yaml(config) -> str:
    """``config`` as YAML that ``load`` reads back to an equal config (a run's resolved config, ``config.yaml``)."""

    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return [plain(v) for v in x] if isinstance(x, (list, tuple)) else x

    return yaml.safe_dump(plain(dataclasses.asdict(config)), sort_keys=False)


def describe(cls, prefix: str = "") -> list[str]:
    """``key: type = default  help`` for every field, sections flattened with dotted names."""
    lines = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            lines += describe(typ, f"{prefix}{f.name}.")
            continue
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        )
        name = getattr(typ, "__name__", str(typ).replace("typing.", ""))
        bounds = [f"{op} {f.metadata[k]}" for k, op in (("min", ">="), ("max", "<=")) if k in f.metadata]
        help_ = "; ".join(filter(None, [", ".join(bounds), f.metadata.get("help", "")]))
        lines.append(f"{prefix}{f.name}: {name} = {default!r}" + (f"  # {help_}" if help_ else ""))
    return lines
