"""Settings read from environment variables."""

from __future__ import annotations

import os
from typing import Optional


def bytes_from_env(name: str, note: str = "", minimum: Optional[int] = None) -> Optional[int]:
    """The byte count set in the environment variable ``name`` (``None`` when unset or empty). Anything else than a
    number, or a number below ``minimum``, is a ``ValueError`` naming the variable; ``note`` (e.g. what 0 means) is
    added to the message."""
    value = os.environ.get(name)
    if not value:
        return None
    try:
        number = int(float(value))
    except ValueError:
        raise ValueError(f"{name} must be a number of bytes{note}, not {value!r}") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be >= {minimum}{note}, not {value!r}")
    return number
