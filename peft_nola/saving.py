"""Saving an adapter over an existing one so that an interruption never leaves a broken adapter in its place.

peft's ``PeftModel.save_pretrained`` replaces ``adapter_model.safetensors`` (safetensors writes a temporary file and
renames it) and then rewrites ``adapter_config.json`` in place. A kill, a full disk or a power cut in between leaves
the new weights with the old config, or a truncated config: the previous good adapter is gone. A plugin cannot change
how peft writes (we do not patch peft); :func:`save_pretrained_atomic` wraps it instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME


def save_pretrained_atomic(model, save_directory: str | os.PathLike, **kwargs) -> None:
    """``model.save_pretrained(save_directory, **kwargs)``, such that an interruption never leaves a half-written file.

    peft saves into a fresh hidden folder inside ``save_directory`` (so on the same filesystem); every file is flushed
    to disk and then moved over its destination with ``os.replace``, which is atomic. An interruption before the moves
    leaves the previous adapter untouched (and a ``.tmp-save-*`` folder, deleted by the next save); each file is at
    every moment either the complete old one or the complete new one. The weights are moved immediately before the config: in
    the microseconds between those two renames the folder holds new weights with the old config, which loading
    refuses (the config's ``weights_checksum`` no longer matches) rather than loading a mixture. Other files in
    ``save_directory`` are kept; an existing ``README.md`` model card is updated, as peft does.

    Saves into one folder hold an exclusive lock on it (``flock``, POSIX) from start to end, so concurrent saves (two
    processes, or threads) run one after the other and the folder ends with one complete adapter, the last one
    saved; under the lock, staging folders left by killed saves are deleted (disk is not leaked past the next save).
    """
    if not kwargs.get("is_main_process", True):
        model.save_pretrained(save_directory, **kwargs)  # writes nothing on other ranks; keeps any collective calls
        return
    destination = Path(save_directory)
    destination.mkdir(parents=True, exist_ok=True)
    with _save_lock(destination) as locked:
        if locked:
            # Every live save into this folder holds the lock, so any staging folder seen now is a killed save's.
            for stale in destination.glob(STAGING_PREFIX + "*"):
                shutil.rmtree(stale, ignore_errors=True)
        _save_staged(model, destination, kwargs)


STAGING_PREFIX = ".tmp-save-"


@contextmanager
def _save_lock(destination: Path):
    """Hold an exclusive ``flock`` on the folder itself (no lock file is left behind) for the whole save, so that
    concurrent saves into one folder run one after the other and each leaves a complete adapter. The kernel releases
    the lock when its holder dies, even by SIGKILL. Yields ``False`` where ``fcntl`` is missing (Windows): no lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield False
        return
    descriptor = os.open(destination, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(descriptor)  # releases the lock


def _save_staged(model, destination: Path, kwargs: dict) -> None:
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=destination))
    try:
        # A README.md that is a link (to a file outside the adapter, perhaps private) is not the card: it is neither
        # read nor written through; the rename below replaces the link itself.
        card = destination / "README.md"
        if card.is_file() and not card.is_symlink():
            shutil.copy2(destination / "README.md", staging / "README.md")
        model.save_pretrained(str(staging), **kwargs)
        written = sorted(path for path in staging.rglob("*") if path.is_file())
        for path in written:
            _fsync(path)
        # Other files (model card) first; then each weights file immediately followed by its config, so that the
        # only moment the pair is inconsistent is between two rename calls.
        order = {SAFETENSORS_WEIGHTS_NAME: 1, CONFIG_NAME: 2}
        moves = sorted(written, key=lambda p: (order.get(p.name, 0) > 0, p.parent, order.get(p.name, 0)))
        targets = [destination / path.relative_to(staging) for path in moves]
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
        for number, target in enumerate(targets):
            # A second link to each old file, so that replacing it frees nothing: the blocks of a large old file are
            # freed when the staging folder goes, not inside the rename between the weights and their config.
            try:
                os.link(target, staging / f".old-{number}")
            except OSError:
                pass  # no old file, or a filesystem without hard links: the renames stay atomic, only slower
        for path, target in zip(moves, targets):
            os.replace(path, target)
        for folder in {target.parent for target in targets}:
            _fsync(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        descriptor = os.open(path, flags)
    except OSError:
        return  # directories cannot be opened on Windows; os.replace is still atomic there
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
