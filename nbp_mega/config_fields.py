"""Typed config dataclasses with strict merging.

Every component owns a dataclass whose fields are declared with `option(...)`: a default, a
one-line help text, and optionally a range or a set of choices. `merge(cfg, dict)` applies a
(YAML or command-line) dict onto it: an unknown key fails and lists the valid ones, a value of
the wrong type or out of range names the full key and what is allowed. Components may define
`validate(self)` for constraints across fields; `check(cfg)` runs all of them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, or out of range."""


def option(default: Any = dataclasses.MISSING, help: str = "", *, min=None, max=None,
           choices=None, default_factory=dataclasses.MISSING) -> Any:
    """A dataclass field with help text and the allowed values, checked by `merge`/`check`."""
    meta = {"help": help, "min": min, "max": max, "choices": choices}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _allowed(f: dataclasses.Field, hint) -> str:
    m = f.metadata
    if m.get("choices") is not None:
        return "one of " + ", ".join(repr(c) for c in m["choices"])
    parts = [_type_name(hint)]
    if m.get("min") is not None:
        parts.append(f">= {m['min']}")
    if m.get("max") is not None:
        parts.append(f"<= {m['max']}")
    return " ".join(parts)


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(hint))
        return f"{origin.__name__}[{args}]"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _coerce(value, hint, key: str):
    """Return `value` as type `hint`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(hint)
    bad = ConfigError(f"config key '{key}': expected {_type_name(hint)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise bad
    if hint is type(None):
        if value is None:
            return None
        raise bad
    if hint is Any:
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        (item,) = typing.get_args(hint) or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if hint is str:
        if isinstance(value, str):
            return value
        raise bad
    raise ConfigError(f"config key '{key}': unsupported field type {hint}")


def _check_range(f: dataclasses.Field, hint, value, key: str) -> None:
    m = f.metadata
    values = value if isinstance(value, list) else [value]
    for v in values:
        if v is None:
            continue
        if m.get("choices") is not None and v not in m["choices"]:
            raise ConfigError(f"config key '{key}': got {v!r}, expected {_allowed(f, hint)}")
        lo, hi = m.get("min"), m.get("max")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ConfigError(f"config key '{key}': got {v!r}, expected {_allowed(f, hint)}")


def merge(cfg, updates: dict, prefix: str = ""):
    """Return a copy of dataclass `cfg` with `updates` (a nested dict) applied strictly."""
    if not isinstance(updates, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}': expected a "
                          f"mapping of keys, got {updates!r}")
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    hints = _hints(type(cfg))
    changes = {}
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in fields:
            valid = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key '{key}'; valid keys in "
                              f"'{prefix.rstrip('.') or '<root>'}': {valid}")
        current = getattr(cfg, name)
        if dataclasses.is_dataclass(current):
            changes[name] = merge(current, value, prefix=f"{key}.")
            continue
        value = _coerce(value, hints[name], key)
        _check_range(fields[name], hints[name], value, key)
        changes[name] = value
    return dataclasses.replace(cfg, **changes)


def check(cfg, prefix: str = "") -> None:
    """Check every field's type and range, then each component's own `validate()`."""
    hints = _hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check(value, prefix=f"{key}.")
        else:
            _check_range(f, hints[f.name], _coerce(value, hints[f.name], key), key)
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        validate()


def deep_merge(base: dict, top: dict) -> dict:
    """Nested dict `base` updated by `top` (mappings merged key by key, the rest replaced)."""
    out = dict(base)
    for k, v in top.items():
        nested = isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = deep_merge(out[k], v) if nested else v
    return out


def parse_overrides(items: list[str]) -> dict:
    """['train.steps=10', 'model.block_shape=[1,1,16]'] -> nested dict (values parsed as YAML)."""
    import yaml

    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}': expected key.sub=value")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override")
        node[leaf] = value
    return out


def describe(cls, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) rows for documentation and `--help` output."""
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        default = (f.default_factory() if f.default_factory is not dataclasses.MISSING
                   else f.default)
        if dataclasses.is_dataclass(default):
            rows += describe(type(default), prefix=f"{key}.")
        else:
            rows.append((key, repr(default), f.metadata.get("help", "")))
    return rows
