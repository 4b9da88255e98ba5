"""How every recipe and script runs from the command line: :class:`RecipeError` for bad user input, and
:func:`run_cli`, which turns it into one ``error: <message>`` line and exit status 2 instead of a traceback."""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence


class RecipeError(Exception):
    """Bad input to a recipe: the message names the problem and how to fix it."""


def quiet_known_noise() -> None:
    """Silence third-party messages that say nothing about the run: bitsandbytes' note that an optional CPU kernel
    package is absent (it falls back to its own code), and transformers' deprecation of a name peft still calls."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def run_cli(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> Any:
    """Run a recipe's ``main(argv)``, turning :class:`RecipeError` into one ``error: ...`` line and exit status 2."""
    from recipes.console import each_warning_once

    each_warning_once()
    quiet_known_noise()
    try:
        return main(argv)
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
