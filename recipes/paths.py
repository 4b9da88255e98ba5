"""Where files are: the repository, the data root (``$PEFT_NOLA_DATA_DIR``, else ``../shared/data`` next to the
repository), and the one rule that resolves every data path a recipe, script or config gives
(:func:`resolve_data_path`: as given, else under the config's ``data_dir``, else under the data root)."""

from __future__ import annotations

import os
from pathlib import Path

from recipes.cli import RecipeError

REPO_ROOT = Path(__file__).resolve().parents[1]


def default_data_root() -> Path:
    """Where shared datasets live: ``$PEFT_NOLA_DATA_DIR`` if set, else ``../shared/data`` next to the repository."""
    env = os.environ.get("PEFT_NOLA_DATA_DIR")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def resolve_path(path: str | os.PathLike) -> Path:
    """Expand ``~``/env vars; relative paths are taken from the current directory, then from the repository root."""
    p = Path(os.path.expandvars(os.path.expanduser(str(path))))
    if p.is_absolute() or p.exists():
        return p
    from_repo = REPO_ROOT / p
    return from_repo if from_repo.exists() else p


def locate(value: str | os.PathLike, root: str | os.PathLike | None) -> Path:
    """A path as given (:func:`resolve_path`) if that exists, else the same name under ``root`` (which may not exist
    either: callers report missing files together); ``root=None`` leaves it as given."""
    direct = resolve_path(value)
    return direct if direct.exists() or root is None else Path(root) / value


def data_candidates(value: str | os.PathLike, under: str | os.PathLike | None = None) -> list[Path]:
    """Where the data rule looks for ``value``, in order (duplicates dropped): as given (:func:`resolve_path`), under
    ``under`` when given, under the data root."""
    places = [resolve_path(value), *([Path(under) / value] if under is not None else []), default_data_root() / value]
    return list(dict.fromkeys(places))


def resolve_data_path(value: str, key: str, allow_hub: bool = False, under: str | os.PathLike | None = None,
                      hub_hint: str | None = None) -> Path | str:
    """The one rule every recipe and script resolves a data path by: ``value`` as given (absolute, or relative to the
    working directory, then to the repository) when it exists; else under ``under`` (the folder a config's
    ``data_dir`` names) when given; else under the data root (:func:`default_data_root`: ``$PEFT_NOLA_DATA_DIR``,
    else ``../shared/data``). With ``allow_hub`` a value that does not look like a path passes through as a hub name.

    Raises :class:`RecipeError` naming the config key, every place looked and, as ``hub_hint``, how to download the
    data instead.
    """
    places = data_candidates(value, under)
    found = next((place for place in places if place.exists()), None)
    if found is not None:
        return found
    looks_like_path = value.startswith((".", "/", "~")) or Path(value).suffix in (".json", ".jsonl", ".csv", ".txt")
    if allow_hub and not looks_like_path:
        return value
    hint = f", or {hub_hint}" if hub_hint else ""
    raise RecipeError(
        f"{key}: '{value}' not found (looked at {', '.join(map(str, places))}). Pass an existing path, or set "
        f"$PEFT_NOLA_DATA_DIR to the folder holding it{hint}"
    )


def dataset_dir(data_dir: str | None, name: str, key: str = "data_dir", hub_hint: str | None = None) -> Path:
    """The folder of dataset ``name``: ``data_dir`` by :func:`resolve_data_path` when given, else
    ``<data root>/<name>`` (which may not exist: callers name the missing files together)."""
    if data_dir:
        return Path(resolve_data_path(data_dir, key, hub_hint=hub_hint))
    return default_data_root() / name
