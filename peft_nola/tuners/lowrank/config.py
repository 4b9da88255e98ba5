"""The settings every low-rank method here shares (:class:`LowRankConfig`), their validators, and the regex safety
check for ``target_modules``/``exclude_modules`` strings; a method's config subclasses it and adds its own fields."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from ...adapter_files import MAX_INT_DIGITS, check_config_writable
from ...checks import check_adapter_dir
from ...checksums import file_checksum
from ...constants import WEIGHTS_NAME
from ...model_card import write_model_card
from .geometry import validate_output_slices


def require_int(name: str, value: Any, minimum: int) -> None:
    """Raise ``ValueError`` naming the config field unless ``value`` is an integer >= ``minimum`` of at most
    ``MAX_INT_DIGITS`` digits (the bound adapter loading enforces on every JSON integer)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if len(str(abs(value))) > MAX_INT_DIGITS:
        raise ValueError(f"{name} must be an integer of at most {MAX_INT_DIGITS} digits (adapter loading refuses "
                         f"longer integers), got one of {len(str(abs(value)))} digits")


def require_probability(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")


def require_finite(name: str, value: Any) -> None:
    """Raise ``ValueError`` naming the config field unless ``value`` is a finite number (a NaN or infinite scale would
    turn every adapted layer's output into NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _names(value: Any, item_type: type = str) -> bool:
    """None, one ``item_type``, or a list/set of them (how peft's configs name modules and layers)."""
    items = value if isinstance(value, (list, set, tuple)) else [value]
    return value is None or all(isinstance(item, item_type) and not isinstance(item, bool) for item in items)


# Shared fields whose values must have these types (checked on creation and on load, before anything is adapted).
_FIELD_TYPES = {
    "target_modules": (_names, "a module name, a regex, or a list of names"),
    "exclude_modules": (_names, "a module name, a regex, or a list of names"),
    "modules_to_save": (lambda v: v is None or (isinstance(v, (list, set, tuple)) and _names(v)), "a list of names"),
    "layers_to_transform": (lambda v: _names(v, int), "a layer index or a list of indices"),
    "layers_pattern": (_names, "a name or a list of names"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
    "init_weights": (lambda v: isinstance(v, bool), "true or false"),
    "layout_fingerprint": (lambda v: v is None or isinstance(v, str), "a string"),
    "weights_checksum": (lambda v: v is None or isinstance(v, str), "a string"),
    "config_fingerprint": (
        lambda v: v is None or (isinstance(v, dict) and all(isinstance(x, str) for x in v.values())),
        "a mapping of field names to strings",
    ),
    "task_type": (lambda v: v is None or isinstance(v, str), "a task type name or null"),
}

# peft interpolates layers_pattern into its own regex: a plain name keeps that regex linear.
_LAYERS_PATTERN = r"[A-Za-z0-9_.]+"


@dataclass
class LowRankConfig(PeftConfig):
    """Fields every low-rank method here shares; see :class:`peft_nola.NolaConfig` for their meaning."""

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Names (or dotted suffixes) of the modules to adapt, a regex matched against the full name, or "
            "'all-linear'. For example ['q_proj', 'v_proj'] or ['c_attn']. Default: peft's LoRA defaults per model type."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Names or a regex of modules not to adapt."}
    )
    output_slices: Optional[dict] = field(
        default=None,
        metadata={
            "help": "Adapt only some equal blocks of a fused output, each with its own adapter, e.g. "
            "{'c_attn': {'splits': 3, 'adapt': [0, 2]}} for the query and value parts of GPT-2's c_attn (the "
            "papers' 'QV' rows). Keys are module names or dotted suffixes."
        },
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={
            "help": "True if the adapted layers store their weight as (fan_in, fan_out), like GPT-2's Conv1D. Each "
            "layer's own layout is detected and used; a mismatch only warns."
        },
    )
    bias: str = field(
        default="none", metadata={"help": "Which biases train: 'none', 'all', or '<method>_only' (adapted layers)."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules besides the adapted ones that are fully trained and saved (e.g. a new head)."},
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: the adapted model starts equal to the base model. False: a random non-zero update "
            "(for tests)."
        },
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt the layers with these indices (see layers_pattern)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Name of the ModuleList holding the layers, e.g. 'layers' or 'h' (with layers_to_transform)."},
    )
    layout_fingerprint: Optional[str] = field(
        default=None, metadata={"help": "Set on creation: hash of the adapted layers' names, shapes and slices."}
    )
    weights_checksum: Optional[str] = field(
        default=None,
        metadata={"help": "Set on save: hash of every tensor of the adapter file as written and of the pinned fields; "
                  "checked on load."},
    )
    config_fingerprint: Optional[dict] = field(
        default=None,
        metadata={"help": "Set on save: a short hash per pinned field (those that determine what the adapter "
                  "computes); a field edited after training is an error naming it."},
    )

    #: Fields that determine what a trained adapter computes and that a user does not change after training: covered
    #: by ``config_fingerprint`` and ``weights_checksum``. The scale (``nola_alpha``/``nora_alpha``) and the dropout
    #: are left out on purpose: a scale is the knob users turn to weaken or strengthen a trained adapter (as with
    #: LoRA's alpha), dropout acts only in training. Methods add their own (see :meth:`pinned_fields`).
    PINNED_FIELDS: ClassVar[tuple[str, ...]] = (
        "peft_type", "task_type", "target_modules", "exclude_modules", "output_slices", "modules_to_save",
        "layers_to_transform", "layers_pattern", "bias",
    )

    def __post_init__(self):
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            # peft's matcher ignores layers_to_transform for a regex (peft >= 0.22 refuses it too): one rule for every
            # peft release.
            raise ValueError(
                f"layers_to_transform cannot be used when target_modules is a string (a regex or 'all-linear'), got "
                f"target_modules={self.target_modules!r}: give target_modules as a list of names such as "
                f"['q_proj', 'v_proj'], or write the layer numbers into the regex."
            )
        super().__post_init__()
        for name, (valid, expected) in _FIELD_TYPES.items():
            if not valid(getattr(self, name)):
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        validate_output_slices(self.output_slices)
        allowed_bias = ("none", "all", f"{PeftType(self.peft_type).value.lower()}_only")
        if self.bias not in allowed_bias:
            raise ValueError(f"bias must be one of {allowed_bias}, got {self.bias!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern is set but layers_to_transform is not: set both or neither")
        for name in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, name), str):
                check_regex(name, getattr(self, name))
        patterns = self.layers_pattern if isinstance(self.layers_pattern, (list, tuple, set)) else [self.layers_pattern]
        for pattern in patterns:
            if pattern is not None and not re.fullmatch(_LAYERS_PATTERN, pattern):
                raise ValueError(f"layers_pattern must be a module name such as 'layers' or 'h' (letters, digits, "
                                 f"'_', '.'), got {pattern!r}")

    def pinned_fields(self) -> dict:
        """``{field: value}`` of :attr:`PINNED_FIELDS` in a canonical JSON form (sets as sorted lists)."""

        def canonical(value):
            if isinstance(value, (set, frozenset, list, tuple)):
                items = [canonical(v) for v in value]
                return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
            if isinstance(value, dict):
                return {str(k): canonical(v) for k, v in value.items()}
            return value.value if isinstance(value, PeftType) else value

        pinned = {name: canonical(getattr(self, name)) for name in self.PINNED_FIELDS}
        for name in ("target_modules", "modules_to_save"):
            # Sets of names to peft (PeftModelForSequenceClassification appends its heads to modules_to_save again
            # on every load).
            if isinstance(pinned[name], list):
                pinned[name] = sorted(set(pinned[name]))
        return pinned

    def prefix_for_checksum(self) -> str:
        """The method's tensor prefix (``"nola_"``), which the first checksum version covered."""
        from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

        return PEFT_TYPE_TO_PREFIX_MAPPING[self.peft_type]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        # Called by PeftModel.from_pretrained and load_adapter (new name) before a model is touched: every file of
        # the adapter is checked here, and the config returned is the one built from the bytes checked (peft's own
        # from_pretrained would read the file a second time). The model-dependent checks follow in inject_adapter,
        # still before the first module is replaced.
        path = Path(pretrained_model_name_or_path) / (subfolder or "")
        if not path.exists() and not path.is_symlink():  # a Hub id: peft downloads it (checked in the load hook)
            return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        _, class_kwargs, _ = cls._split_kwargs(kwargs)
        checked = check_adapter_dir(path, cls, class_kwargs=class_kwargs)
        config = checked.config
        config._checked = checked
        return config

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        # PeftModel.save_pretrained writes the weights, then this config: record the checksum of the file just
        # written (every tensor in it), if it is the one this save produced.
        check_config_writable(self.to_dict())
        pending = self.__dict__.pop("_pending_own_digest", None)
        if pending is not None:
            self.weights_checksum = file_checksum(Path(save_directory) / WEIGHTS_NAME, self, pending)
        super().save_pretrained(save_directory, **kwargs)
        write_model_card(save_directory, self)  # after the weights and config it describes

    @classmethod
    def check_kwargs(cls, **kwargs):
        # peft drops unknown keys with a warning (forward compatibility); a key this version does not know could
        # change what the adapter computes, so here it is an error.
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(
                f"adapter_config.json has keys {cls.__name__} does not know: {unknown}. The adapter was saved by "
                f"another peft-nola version, or the file was edited; remove the keys or use that version."
            )
        return super().check_kwargs(**kwargs)



# -------------------------------------------------------------------------------------------------------- regexes

#: Unbounded repetitions a target_modules regex may hold in sequence: matching time grows like n**count in the length
#: n of a module name (about 100 characters), so three keep the worst case near a million steps per name.
MAX_REGEX_REPEATS = 3
MAX_REGEX_LENGTH = 512


def check_regex(name: str, pattern: str) -> None:
    """Raise ``ValueError`` naming the field unless ``pattern`` matches in time polynomial (and small) in the length of
    a module name. peft matches ``target_modules``/``exclude_modules`` strings with ``re.fullmatch`` against every
    module name, and Python's backtracking matcher cannot be interrupted: a pattern with nested quantifiers
    (``(a+)+``), a quantified alternation (``(a|a)*``) or a backreference can take time exponential in the name's
    length, which hangs loading. Such patterns are refused with the reason; lists of names are not regexes."""
    try:
        import re._parser as sre_parse  # Python >= 3.11
        from re._constants import MAXREPEAT
    except ImportError:  # pragma: no cover - Python 3.10
        import sre_parse
        from sre_constants import MAXREPEAT

    if len(pattern) > MAX_REGEX_LENGTH:
        raise ValueError(f"{name} is a regex of {len(pattern)} characters, more than {MAX_REGEX_LENGTH}; "
                         f"list the module names instead")
    try:
        parsed = sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError) as error:
        raise ValueError(f"{name} is not a valid regex ({error}): {pattern!r}") from None

    def refuse(reason: str):
        raise ValueError(
            f"{name}={pattern!r} contains {reason}, which can make matching take time exponential in the length of a "
            f"module name (loading would hang). Write the regex without it, or list the module names."
        )

    repeats = 0

    def walk(items, in_repeat: bool) -> None:
        nonlocal repeats
        for op, av in items:
            op = str(op)
            if op in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                low, high, sub = av
                if high > 1 and in_repeat:
                    refuse("nested quantifiers")
                if high > 1 and any(str(o) == "BRANCH" for o, _ in _flatten(sub)):
                    refuse("a quantified alternation")
                if high == MAXREPEAT or high > 64:
                    repeats += 1
                walk(sub, in_repeat or high > 1)
            elif op in ("GROUPREF", "GROUPREF_EXISTS"):
                refuse("a backreference")
            elif op == "SUBPATTERN":
                walk(av[-1], in_repeat)
            elif op == "BRANCH":
                for branch in av[1]:
                    walk(branch, in_repeat)
            elif op in ("ASSERT", "ASSERT_NOT"):
                walk(av[1], in_repeat)
            elif op == "ATOMIC_GROUP":
                walk(av, in_repeat)

    walk(parsed, False)
    if repeats > MAX_REGEX_REPEATS:
        raise ValueError(
            f"{name}={pattern!r} has {repeats} unbounded repetitions (more than {MAX_REGEX_REPEATS}): matching time "
            f"grows like the name length to that power. Simplify the regex, or list the module names."
        )


def _flatten(items):
    """Every ``(op, av)`` in a parsed regex, recursively."""
    for op, av in items:
        yield op, av
        name = str(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            yield from _flatten(av[2])
        elif name == "SUBPATTERN":
            yield from _flatten(av[-1])
        elif name == "BRANCH":
            for branch in av[1]:
                yield from _flatten(branch)
        elif name in ("ASSERT", "ASSERT_NOT"):
            yield from _flatten(av[1])
        elif name == "ATOMIC_GROUP":
            yield from _flatten(av)
