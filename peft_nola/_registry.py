"""Registering a tuner with the stock ``peft`` release, without editing or vendoring it.

``peft.utils.register_peft_method`` is peft's own extension point, but it only accepts names that are members of
the ``PeftType`` enum, and ``adapter_config.json`` round-trips through ``PeftType(value)``. Python enums cannot be
extended by subclassing, so the member is added the way ``EnumType`` itself adds members: into the class
namespace, ``_member_map_``, ``_value2member_map_`` and ``_member_names_``.
"""

from __future__ import annotations

from peft.utils import PeftType, register_peft_method


def add_peft_type(name: str) -> PeftType:
    """Return ``PeftType[name]``, adding the member first if this peft release does not have it."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


def register(name: str, config_cls, model_cls, prefix: str) -> None:
    """Make ``name`` (e.g. ``"nola"``) a peft method: ``get_peft_model``, ``PeftConfig.from_pretrained``, ... know it."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    peft_type = add_peft_type(name.upper())
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is config_cls:
        return  # already registered (e.g. the module was reloaded)
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)
