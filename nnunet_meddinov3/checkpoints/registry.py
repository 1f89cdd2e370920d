"""Names -> files: the weights registry (``weights/registry.yaml``) and the local cache."""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import yaml

REGISTRY_FILE = Path(__file__).with_name("registry.yaml")  # a link to weights/registry.yaml
CACHE_ENV = "MEDDINOV3_CACHE"
WEIGHTS_ENV = "MEDDINOV3_WEIGHTS"  # the encoder weights a MedDINOv3 trainer starts from


def cache_dir() -> Path:
    """Where downloaded and exported checkpoints live: $MEDDINOV3_CACHE or ~/.cache/meddinov3."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "meddinov3").expanduser()


@lru_cache(maxsize=None)
def _registry_entries(path: str) -> tuple[dict, ...]:
    with open(path, encoding="utf-8") as f:
        return tuple(yaml.safe_load(f)["checkpoints"])


def registry_entries() -> dict[str, dict]:
    """Known checkpoints by name, plus the project's own exports found in the cache."""
    entries = {e["name"]: dict(e) for e in _registry_entries(str(REGISTRY_FILE))}
    exports = cache_dir() / "exports"
    if exports.is_dir():
        for f in sorted(exports.glob("*.safetensors")):
            entries.setdefault(f.stem, {"name": f.stem, "file": f"exports/{f.name}", "layout": "meddinov3",
                                        "description": "exported by this project's pretraining",
                                        "licence": "see the file's metadata", "access": "local export"})
    return entries


def converted_path(name: str) -> Path:
    """Where ``meddinov3 weights fetch NAME`` puts the file converted to this project's format."""
    return cache_dir() / f"{name}.safetensors"


def cached_paths(name: str, entry: dict) -> list[Path]:
    """Cache locations of a registered checkpoint, best first: converted file, then the original."""
    paths = [converted_path(name)]
    if entry.get("file"):
        paths.append(cache_dir() / entry["file"])
    return list(dict.fromkeys(paths))


def find_cached(name: str, entry: dict) -> Path | None:
    return next((p for p in cached_paths(name, entry) if p.exists()), None)


def resolve_weights(name_or_path: str | os.PathLike) -> Path:
    """A checkpoint path from a path or a registry name; a clear error if neither exists.

    A registered name resolves to its converted file in the cache (``NAME.safetensors``, what
    ``meddinov3 weights fetch`` writes) or else to the original file (``file`` in the registry).
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        return path
    entries = registry_entries()
    if text in entries:
        cached = find_cached(text, entries[text])
        if cached is not None:
            return cached
        cached = cache_dir() / (entries[text].get("file") or f"{text}.safetensors")
        raise FileNotFoundError(
            f"checkpoint '{text}' is registered but not in the cache ({cached}). "
            f"Get it with `meddinov3 weights fetch {text}` ({entries[text].get('access', '')}), "
            f"or pass the file's path instead of the name.")
    raise FileNotFoundError(
        f"'{text}' is neither an existing file nor a registered checkpoint name. "
        f"Registered: {', '.join(sorted(entries))}. Pass a path, a name, or set {CACHE_ENV} to "
        f"the folder holding the cached files.")
