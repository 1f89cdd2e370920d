"""Stage configs: YAML files shipped here, loaded into :class:`PretrainConfig` with overrides.

    cfg = load_config("vitb16_stage1", ["optim.lr=1e-4", "data.batch_size=8"])

A YAML file may start from another with ``base: NAME`` (a packaged config name or a path relative
to the file) and state only what differs. Overrides are ``dotted.key=value`` with the value read
as YAML (``data.roots=[/a,/b]``, ``model.init_weights=null``). Unknown keys, in files and
overrides alike, are errors that list the valid keys.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from nnunet_meddinov3.data.intensity import merge_preset_dict, preset_from_nnunet_plans

from .plain import ConfigError, from_plain, nested_config_class, to_plain
from .schema import PretrainConfig

PRESET_FIELDS = ("intensity",)  # dict-valued fields that merge as intensity presets (see merge_preset_dict)

CONFIG_DIR = Path(__file__).resolve().parent

__all__ = [
    "CONFIG_DIR",
    "ConfigError",
    "PretrainConfig",
    "apply_overrides",
    "available_configs",
    "config_from_dict",
    "load_config",
    "resolve_config_path",
]


def available_configs() -> list[str]:
    """Names of the packaged stage configs."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str | os.PathLike, relative_to: Path | None = None) -> Path:
    """A config file from a path (absolute, or relative to ``relative_to``/the working directory)
    or a packaged config name (with or without ``.yaml``)."""
    text = str(name_or_path)
    candidates = [Path(text).expanduser()]
    if relative_to is not None:
        candidates.insert(0, relative_to / text)
    candidates.append(CONFIG_DIR / (text if text.endswith((".yaml", ".yml")) else f"{text}.yaml"))
    for path in candidates:
        if path.is_file():
            return path.resolve()
    raise ConfigError(f"no config '{text}': not a file and not a packaged config ({', '.join(available_configs())})")


def _merge(cls: type, base: dict, update: Any, where: str = "") -> dict:
    """``update`` merged into ``base`` following the schema: nested configs merge key by key, an
    intensity preset merges as :func:`merge_preset_dict` (``data.intensity.kind=mri`` selects the MRI
    preset with its defaults), every other value (lists) is replaced."""
    if not isinstance(update, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'} must be a mapping, got {update!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    merged = dict(base)
    for key, value in update.items():
        if key not in names:
            scope = f" in {where.rstrip('.')}" if where else ""
            raise ConfigError(f"unknown key '{where}{key}'; valid keys{scope}: {', '.join(names)}")
        nested = nested_config_class(cls, key)
        if nested:
            merged[key] = _merge(nested, base[key], value, f"{where}{key}.")
        elif key in PRESET_FIELDS and isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = merge_preset_dict(base[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The file's mapping merged onto its ``base`` (recursively), without the ``base`` key."""
    if path in seen:
        raise ConfigError(f"config base cycle: {' -> '.join(str(p) for p in (*seen, path))}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping")
    base_name = data.pop("base", None)
    if base_name is None:
        return data
    base = _read_yaml_chain(resolve_config_path(base_name, relative_to=path.parent), (*seen, path))
    return _deep_update(base, data)


def _deep_update(base: dict, update: dict) -> dict:
    """Plain recursive dict update for file-level inheritance (checked against the schema later)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_preset_dict(out[key], value) if key in PRESET_FIELDS else _deep_update(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(config: dict, overrides: Iterable[str]) -> dict:
    """Apply ``dotted.key=value`` overrides to a full plain config dict (returns a new dict)."""
    result = config
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form dotted.key=value")
        value = yaml.safe_load(raw) if raw.strip() else None
        nested: Any = value
        for part in reversed(key.strip().split(".")):
            nested = {part: nested}
        result = _merge(PretrainConfig, result, nested)
    return result


def resolve_nnunet_intensity(intensity: dict) -> dict:
    """``{kind: nnunet, plans: PATH[, channel: C]}`` replaced by the preset equal to that plans file's
    normalisation, so the run, its checkpoints and its export record plain numbers."""
    if intensity.get("kind") != "nnunet":
        return intensity
    extra = sorted(set(intensity) - {"kind", "plans", "channel"})
    if "plans" not in intensity or extra:
        raise ConfigError("data.intensity.kind=nnunet takes data.intensity.plans=PATH (an nnU-Net plans JSON, e.g. "
                          "$nnUNet_preprocessed/DatasetXXX/nnUNetPlans.json) and optionally data.intensity.channel"
                          + (f"; not {extra}" if extra else ""))
    path = Path(str(intensity["plans"])).expanduser()
    try:
        plans = json.loads(path.read_text())
        preset = preset_from_nnunet_plans(plans, int(intensity.get("channel", 0)))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"data.intensity.plans: cannot read nnU-Net plans from {path}: {e}") from None
    except (KeyError, ValueError) as e:
        raise ConfigError(f"data.intensity.plans {path}: {e}") from None
    return preset.to_dict()


def config_from_dict(data: dict, overrides: Iterable[str] = ()) -> PretrainConfig:
    """A validated config from a (partial) plain dict, e.g. one stored in a checkpoint."""
    merged = _merge(PretrainConfig, to_plain(PretrainConfig()), data)
    merged = apply_overrides(merged, overrides)
    merged["data"]["intensity"] = resolve_nnunet_intensity(merged["data"]["intensity"])
    return from_plain(PretrainConfig, merged).validate()


def load_config(name_or_path: str | os.PathLike, overrides: Iterable[str] = ()) -> PretrainConfig:
    """Load a packaged config by name or a YAML file by path, then apply ``overrides``."""
    path = resolve_config_path(name_or_path)
    data = _read_yaml_chain(path)
    data.setdefault("name", path.stem)
    return config_from_dict(data, overrides)
