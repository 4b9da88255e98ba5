"""The peft internals this package relies on (peft_nola/_peft_compat.py) exist in the installed peft, each named."""

import importlib

import pytest

from peft_nola import _peft_compat


@pytest.mark.parametrize("module, name", _peft_compat.PRIVATE_NAMES, ids=lambda x: str(x))
def test_private_name_exists(module, name):
    assert hasattr(importlib.import_module(module), name), f"peft no longer has {module}.{name}"


@pytest.mark.parametrize("owner, hook", _peft_compat.HOOKS, ids=lambda x: str(x))
def test_hook_exists(owner, hook):
    module, cls = owner.rsplit(".", 1)
    assert hasattr(getattr(importlib.import_module(module), cls), hook), f"peft's {owner} no longer has {hook}"


@pytest.mark.parametrize("module, name", _peft_compat.TRANSFORMERS_HOOKS, ids=lambda x: str(x))
def test_transformers_name_exists(module, name):
    assert hasattr(importlib.import_module(module), name), f"transformers no longer has {module}.{name}"


def test_transformers_load_adapter_still_has_the_locals_the_guard_reads():
    # check_transformers_load reads these locals of transformers' load_adapter (see TRANSFORMERS_HOOKS).
    from transformers.integrations.peft import PeftAdapterMixin

    names = PeftAdapterMixin.load_adapter.__code__.co_varnames
    assert set(_peft_compat.TRANSFORMERS_LOAD_ADAPTER_LOCALS) <= set(names)


def test_pickled_save_detection_still_sees_peft_s_flag():
    # refuse_pickled_save reads save_pretrained's local variable: peft must still call it safe_serialization.
    from peft import PeftModel

    assert "safe_serialization" in PeftModel.save_pretrained.__code__.co_varnames


def test_save_pretrained_asks_for_the_adapter_names_before_writing_the_model_card():
    # _AdapterConfigs.keys() removes a linked README.md when save_pretrained asks it, before peft writes the card.
    import inspect

    from peft import PeftModel

    source = inspect.getsource(PeftModel.save_pretrained)
    assert {"save_directory", "is_main_process"} <= set(PeftModel.save_pretrained.__code__.co_varnames)
    assert 0 <= source.index("self.peft_config.keys()") < source.index("create_or_update_model_card(")


def test_a_missing_name_is_a_clear_import_error():
    with pytest.raises(ImportError, match=r"needs peft\.tuners\.tuners_utils\._no_such_helper, which peft .* does not"):
        _peft_compat.private_name("peft.tuners.tuners_utils", "_no_such_helper")


def test_the_floor_job_installs_the_floors_pyproject_declares():
    import re
    import tomllib

    from .conftest import REPO_ROOT

    def release(version: str) -> tuple:  # "2.13" and "2.13.0" are one release
        parts = [int(part) for part in version.split(".")]
        while parts and parts[-1] == 0:
            parts.pop()
        return tuple(parts)

    declared = {}
    for requirement in tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        name, floor = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement).groups()
        declared[name] = release(floor)
    constraints = (REPO_ROOT / ".ci" / "floor-constraints.txt").read_text().splitlines()
    pinned = {name: release(version) for name, version in
              (line.split("==") for line in constraints if line and not line.startswith("#"))}
    assert pinned == declared
