"""MkDocs hook: the config reference is generated from the config classes themselves when the site is built.

A page line ``<!-- config-fields: module.ClassName -->`` becomes tables of that dataclass's fields (name, type,
default, the field's ``metadata["help"]``), one table per class that declares fields, most specific first. The
tables are read from ``dataclasses.fields`` at build time, so the reference cannot drift from the code; a field
without help text gets an empty cell. An unknown class fails the build.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PLACEHOLDER = re.compile(r"^<!-- config-fields: ([\w.]+) -->$", re.M)


def _load(dotted: str) -> type:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))  # document this checkout, not an installed copy
    module_name, _, class_name = dotted.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"config-fields: {dotted} is not a dataclass")
    return cls


def _cell(text: str) -> str:
    """Table-safe Markdown: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _type_name(tp) -> str:
    if isinstance(tp, str):
        return tp
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if hasattr(value, "value") and type(value).__module__.startswith("peft"):  # peft's str enums
        value = value.value
    return f"`{value!r}`"


def _owner(cls: type, name: str) -> type:
    """The most specific class in ``cls``'s MRO that annotates ``name``."""
    return next(c for c in cls.__mro__ if name in inspect.get_annotations(c))


def render(dotted: str) -> str:
    cls = _load(dotted)
    groups: dict[type, list[dataclasses.Field]] = {}
    for field in dataclasses.fields(cls):
        groups.setdefault(_owner(cls, field.name), []).append(field)
    parts = []
    for owner in sorted(groups, key=cls.__mro__.index):
        where = "" if owner is cls else f" (from `{owner.__module__}.{owner.__qualname__}`)"
        parts.append(f"**`{cls.__name__}`** fields declared by `{owner.__qualname__}`{where}:\n")
        parts.append("| field | type | default | meaning |\n|---|---|---|---|")
        for field in groups[owner]:
            parts.append(
                f"| `{field.name}` | {_cell(_type_name(field.type))} | {_cell(_default(field))} "
                f"| {_cell(field.metadata.get('help', ''))} |"
            )
        parts.append("")
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    return PLACEHOLDER.sub(lambda match: render(match.group(1)), markdown)
