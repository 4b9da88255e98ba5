"""Where files are: the repository, the shared data root (``$PEFT_NOLA_DATA_DIR`` or ``../shared/data``), and the
rule that resolves a path a config gives."""

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


def resolve_data_path(value: str, key: str, allow_hub: bool = False) -> Path | str:
    """A data path as given (cwd, then repository root), else under the shared data root; hub names pass through.

    Raises :class:`RecipeError` naming the config key when nothing matches.
    """
    found = locate(value, default_data_root())
    if found.exists():
        return found
    looks_like_path = value.startswith((".", "/", "~")) or Path(value).suffix in (".json", ".jsonl", ".csv")
    if allow_hub and not looks_like_path:
        return value
    raise RecipeError(
        f"{key}: '{value}' not found (looked in the current directory, the repository and {default_data_root()};"
        " set PEFT_NOLA_DATA_DIR or pass an existing path)"
    )
