"""Plain data <-> config dataclasses: a dataclass as a YAML/JSON-safe dict, and back with every value checked
against its field's annotation (unknown keys are errors that list the valid ones)."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any


class ConfigError(ValueError):
    """A config that cannot be run; the message names the field and what is valid."""


def to_plain(obj: Any) -> Any:
    """Dataclasses, tuples and lists -> dicts and lists (YAML/JSON-safe)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def nested_config_class(cls: type, name: str) -> type | None:
    """The config dataclass that field ``name`` of ``cls`` holds, or None for a plain value. Annotations are
    strings (``from __future__ import annotations``), so the class is looked up where ``cls`` is defined."""
    annotation = {f.name: f.type for f in dataclasses.fields(cls)}[name]
    if not isinstance(annotation, str):
        return None
    candidate = vars(sys.modules[cls.__module__]).get(annotation)
    return candidate if isinstance(candidate, type) and dataclasses.is_dataclass(candidate) else None


def _coerce(value: Any, annotation: str, where: str) -> Any:
    """Check ``value`` against a field annotation (as written, e.g. ``"list[int] | None"``)."""
    kinds = [a.strip() for a in annotation.split("|")]
    if value is None:
        if "None" in kinds:
            return None
        raise ConfigError(f"{where} must not be null (expected {annotation})")
    kind = next(k for k in kinds if k != "None")
    scalar = {"int": int, "float": float, "str": str, "bool": bool, "dict": dict}
    if kind in scalar:
        return _coerce_scalar(value, kind, scalar[kind], where)
    if kind.startswith(("list[", "tuple[")):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list ({annotation}), got {value!r}")
        inner = kind[kind.index("[") + 1 : -1].split(",")
        if kind.startswith("tuple["):
            if len(value) != len(inner):
                raise ConfigError(f"{where} must have {len(inner)} entries, got {value!r}")
            return tuple(_coerce(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, inner)))
        return [_coerce(v, inner[0], f"{where}[{i}]") for i, v in enumerate(value)]
    raise ConfigError(f"{where}: unsupported annotation {annotation}")  # a schema bug, not a user error


def _coerce_scalar(value: Any, kind: str, target: type, where: str) -> Any:
    if target is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if target is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if target is str and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # a YAML number where a name is expected, e.g. eval.dataset=501
    if isinstance(value, bool) and target is not bool:
        raise ConfigError(f"{where} must be {kind}, got {value!r}")
    if not isinstance(value, target):
        raise ConfigError(f"{where} must be {kind}, got {value!r}")
    return value


def from_plain(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys are errors that list the valid ones."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(f'{where}{k}' for k in unknown)}; valid keys"
            f"{' in ' + where.rstrip('.') if where else ''}: {', '.join(fields)}"
        )
    values = {}
    for name, value in data.items():
        nested = nested_config_class(cls, name)
        if nested:
            values[name] = from_plain(nested, value, f"{where}{name}.")
        else:
            values[name] = _coerce(value, fields[name].type, f"{where}{name}")
    return cls(**values)
