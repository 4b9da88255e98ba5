"""The export command line on what users hand it (issue 23): ``python -m peft_nola.export ADAPTER_DIR OUT_DIR``
must not write through links planted in OUT_DIR, must refuse OUT_DIR == ADAPTER_DIR (and leave the adapter as it
was), must refuse a base whose config would need a huge allocation before allocating it, and must answer an OUT_DIR
that is a file or a ``modules_to_save`` key the base lacks with a clear error (exit status 2), not a traceback."""

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from peft import get_peft_model
from transformers import LlamaConfig

from peft_nola import NolaConfig
from peft_nola import export
from peft_nola.export import main
from tests.conftest import REPO_ROOT, tiny_llama
from tests.hostile import UNCHECKED, add_tensor, edit, tensors_edit, then



@pytest.fixture
def adapter(tmp_path):
    """A NOLA adapter of a tiny LLaMA whose base config is saved beside it (the export needs only the config)."""
    tiny_llama().save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), NolaConfig(r=4, num_basis_A=20, num_basis_B=10, init_weights=False,
                                                    target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def run_cli(args):
    """The exit status of the command line run in-process; any exception other than SystemExit propagates (that is
    the traceback a user would see)."""
    try:
        status = main([str(a) for a in args])
    except SystemExit as exit_:
        status = exit_.code
    return status


def test_links_planted_in_out_dir_are_not_written_through(adapter, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md", "export_report.json"):
        (outside / name).write_text(f"user file {name}\n")
        (out / name).symlink_to(outside / name)
    before = snapshot(outside)
    assert run_cli([adapter, out, "--base", tmp_path / "base"]) == 0
    assert snapshot(outside) == before
    written = ("adapter_model.safetensors", "adapter_config.json", "export_report.json")
    assert all((out / name).is_file() and not (out / name).is_symlink() for name in written)
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (out / "README.md").is_symlink()  # not the export's: left as it was
    assert sorted(p.name for p in out.iterdir()) == sorted([*written, "README.md"])  # no staging folder left


def test_out_dir_equal_to_the_adapter_dir_is_refused(adapter, tmp_path, capsys):
    before = snapshot(adapter)
    status = run_cli([adapter, adapter, "--base", tmp_path / "base"])
    assert status == 2 and "error:" in capsys.readouterr().err
    assert snapshot(adapter) == before


def test_out_dir_that_is_the_adapter_dir_through_a_link_is_refused(adapter, tmp_path, capsys):
    before = snapshot(adapter)
    (tmp_path / "link").symlink_to(adapter)
    status = run_cli([adapter, tmp_path / "link", "--base", tmp_path / "base"])
    assert status == 2 and "the adapter's own folder" in capsys.readouterr().err
    assert snapshot(adapter) == before


def test_out_dir_under_a_file_gives_a_clear_error(adapter, tmp_path, capsys):
    (tmp_path / "file").write_text("a file\n")
    status = run_cli([adapter, tmp_path / "file" / "out", "--base", tmp_path / "base"])
    assert status == 2 and str(tmp_path / "file" / "out") in capsys.readouterr().err


def test_out_dir_that_is_a_file_gives_a_clear_error(adapter, tmp_path, capsys):
    out = tmp_path / "out.txt"
    out.write_text("not a directory\n")
    status = run_cli([adapter, out, "--base", tmp_path / "base"])
    assert status == 2 and str(out) in capsys.readouterr().err
    assert out.read_text() == "not a directory\n"


def test_a_modules_to_save_key_the_base_lacks_gives_a_clear_error(adapter, tmp_path, capsys):
    then(tensors_edit(add_tensor("base_model.model.no_such_module.weight", (4, 4))),
         edit(modules_to_save=["no_such_module"]), UNCHECKED)(adapter)
    status = run_cli([adapter, tmp_path / "out", "--base", tmp_path / "base"])
    assert status == 2 and "no_such_module" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


LIMITED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
from peft_nola import export
from peft_nola.export import main
raise SystemExit(main(sys.argv[1:]))
"""


def test_a_whole_model_modules_to_save_on_a_70b_config_is_refused_before_allocation(adapter, tmp_path):
    """``modules_to_save=["model"]`` (the whole decoder, as an adapter written by another tool holds it) exported
    against a 70B-shaped config.json. Bounded: a subprocess under a 6 GiB address-space cap and a 120 s limit; the
    decoder of a 70B LLaMA in float32 is ~280 GB, so only a refusal before allocating finishes cleanly."""
    LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256).save_pretrained(tmp_path / "base70b")

    def whole_decoder(tensors):
        tensors.update({f"base_model.model.{k}": v.clone() for k, v in tiny_llama().state_dict().items()
                        if k.startswith("model.")})

    then(tensors_edit(whole_decoder), edit(modules_to_save=["model"]), UNCHECKED)(adapter)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", LIMITED, str(adapter), str(tmp_path / "out"),
                           "--base", str(tmp_path / "base70b")], capture_output=True, text=True, timeout=120,
                          env=env, cwd=REPO_ROOT)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "error:" in done.stderr
    assert time.monotonic() - start < 120
    assert not (tmp_path / "out").exists()


def test_a_modules_to_save_tensor_of_another_shape_than_the_base_is_refused_before_allocation(adapter, tmp_path):
    """Legitimate ``modules_to_save=["embed_tokens", "lm_head"]`` of the tiny model (the files pass every file check)
    exported against the 70B-shaped config: the two modules are 8.4 GB there, so only a refusal before allocating
    (their shapes differ from the file's) finishes cleanly under the 6 GiB cap."""
    LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256).save_pretrained(tmp_path / "base70b")
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), NolaConfig(r=4, num_basis_A=20, num_basis_B=10, init_weights=False,
                                                    target_modules=["q_proj"],
                                                    modules_to_save=["embed_tokens", "lm_head"]))
    model.save_pretrained(tmp_path / "with_heads")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", LIMITED, str(tmp_path / "with_heads"), str(tmp_path / "out"),
                           "--base", str(tmp_path / "base70b")], capture_output=True, text=True, timeout=120,
                          env=env, cwd=REPO_ROOT)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert re.search(r"holds 'base_model\.model\.(model\.embed_tokens|lm_head)\.weight' of shape \(96, 32\), but "
                     r"the base model '.*base70b' \(LlamaForCausalLM\) has \(128256, 8192\)", done.stderr)
    assert not (tmp_path / "out").exists()


def test_modules_the_base_cannot_hold_in_memory_are_refused_before_allocation(adapter, tmp_path, monkeypatch,
                                                                              capsys):
    """The skeleton makes real (zeros) the base layers the adapter touches; more bytes than are available is a clear
    refusal, not an allocation. Here the tiny model's two q_proj and two v_proj weights: 4 x 32 x 32 x 4 bytes minus
    the two smaller v_proj (32 x 16)."""
    needed = 4 * (2 * 32 * 32 + 2 * 16 * 32)
    monkeypatch.setattr(export, "available_memory", lambda device: (needed - 1, "memory in this test"))
    status = run_cli([adapter, tmp_path / "out", "--base", tmp_path / "base"])
    assert status == 2 and f"would allocate {needed:,} bytes" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(export, "available_memory", lambda device: (needed, "memory in this test"))
    assert run_cli([adapter, tmp_path / "out", "--base", tmp_path / "base"]) == 0


@pytest.mark.parametrize("what", ["missing folder", "missing gguf", "folder without config.json"])
def test_an_unusable_base_is_named_as_given(adapter, tmp_path, capsys, what):
    """The error names the ``--base`` given, not the adapter's ``base_model_name_or_path`` (issue 24)."""
    base = {"missing folder": tmp_path / "no_such_base", "missing gguf": tmp_path / "model.Q4_1.gguf",
            "folder without config.json": tmp_path}[what]
    status = run_cli([adapter, tmp_path / "out", "--base", base])
    err = capsys.readouterr().err
    assert status == 2 and repr(str(base)) in err and "Traceback" not in err
    assert "base_model_name_or_path" not in err
    assert not (tmp_path / "out").exists()


def test_an_export_that_fails_while_writing_leaves_out_dir_as_it_was(adapter, tmp_path, monkeypatch):
    """Files are written into a staging folder and moved in only when all are written: a failure in between leaves an
    existing out_dir's files as they were (and no staging folder), and removes an out_dir the export created."""
    def broken_save_file(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_file", broken_save_file)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "adapter_config.json").write_text("the previous export\n")
    for out in (existing, tmp_path / "new"):
        with pytest.raises(OSError, match="disk full"):
            export.export_lora(adapter, out, base_model=tmp_path / "base")
    assert [p.name for p in existing.iterdir()] == ["adapter_config.json"]
    assert (existing / "adapter_config.json").read_text() == "the previous export\n"
    assert not (tmp_path / "new").exists()


def test_an_adapter_of_another_base_names_the_base_given(adapter, tmp_path, capsys):
    """The loader's refusal (another layout) is reported against the ``--base`` that was tried."""
    tiny_llama(hidden_size=64).save_pretrained(tmp_path / "wider")
    status = run_cli([adapter, tmp_path / "out", "--base", tmp_path / "wider"])
    err = capsys.readouterr().err
    assert status == 2 and f"does not fit the base given, {str(tmp_path / 'wider')!r}" in err
    assert "made for a different model" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
