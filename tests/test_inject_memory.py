"""Doors that skip a guard (issue 23): ``inject_adapter_in_model`` with a ``state_dict`` must refuse an adapter too big
for memory before allocating, as it does without one; a NoRA config with an empty ``weight_fingerprint`` must not
load onto another base; and what ``save_pretrained`` writes, the loader must accept (or the save refuses it)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_nola import NolaConfig, NoraConfig
from tests.conftest import REPO_ROOT, tiny_llama
from tests.hostile import UNCHECKED, edit, then


INJECT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
from peft import inject_adapter_in_model
import peft_nola
from peft_nola import NolaConfig
from tests.conftest import tiny_llama
config = NolaConfig(r=4, num_basis_A=10**12, num_basis_B=10, target_modules=["q_proj"], basis_mode="per_layer")
import torch
state_dict = {f"model.layers.{i}.self_attn.q_proj.nola_coef_A": torch.zeros(1, 1) for i in range(2)}
kwargs = {"state_dict": state_dict} if sys.argv[1] == "state_dict" else {}
try:
    inject_adapter_in_model(config, tiny_llama(), **kwargs)
except (ValueError, MemoryError) as error:
    print("REFUSED", error)
    raise SystemExit(0)
print("INJECTED")
"""


@pytest.mark.parametrize("how", ["plain", "state_dict"])
def test_inject_adapter_in_model_refuses_a_huge_adapter_before_allocating(how):
    """Bounded: a subprocess under a 6 GiB address-space cap; 10**12 basis vectors per layer are terabytes."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", INJECT, how], capture_output=True, text=True, timeout=120,
                          env=env, cwd=REPO_ROOT)
    assert done.returncode == 0 and "REFUSED" in done.stdout and "would need" in done.stdout, \
        done.stdout[-1000:] + done.stderr[-2000:]


def test_a_nora_adapter_with_an_empty_weight_fingerprint_is_refused_on_another_base(tmp_path):
    torch.manual_seed(0)
    get_peft_model(tiny_llama(seed=0), NoraConfig(r=4, inner_r=2, init_weights=False, target_modules=["q_proj"])
                   ).save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="not the weights it was trained on"):  # the reference: the intact file
        PeftModel.from_pretrained(tiny_llama(seed=1), tmp_path / "adapter")
    then(edit(weight_fingerprint=[]), UNCHECKED)(tmp_path / "adapter")  # "written by another tool"
    with pytest.raises(ValueError):
        PeftModel.from_pretrained(tiny_llama(seed=1), tmp_path / "adapter")


def save_or_refuse(make, folder):
    """``"refused"`` if building or saving the adapter raised ``ValueError``, else ``"saved"``."""
    try:
        make().save_pretrained(folder)
    except ValueError:
        return "refused"
    return "saved"


def test_a_huge_base_model_name_is_refused_on_save_or_loads(tmp_path):
    def make():
        base = tiny_llama()
        base.name_or_path = "org/" + "m" * ((1 << 20) + 16)
        return get_peft_model(base, NolaConfig(r=4, num_basis_A=20, num_basis_B=10, target_modules=["q_proj"]))

    if save_or_refuse(make, tmp_path / "adapter") == "saved":
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")


def test_a_31_digit_basis_seed_is_refused_on_creation_or_loads(tmp_path):
    seed = 10**30

    def make():
        return get_peft_model(tiny_llama(), NolaConfig(r=4, num_basis_A=20, num_basis_B=10, basis_seed=seed,
                                                       target_modules=["q_proj"]))

    if save_or_refuse(make, tmp_path / "adapter") == "saved":
        assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["basis_seed"] == seed
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
