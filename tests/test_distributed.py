"""Data-parallel training through the stock launchers (torchrun, accelerate launch) and transformers.Trainer, on CPU
with two gloo processes: the NOLA basis is generated identically on every rank, the coefficients stay identical
across ranks, two processes x batch 2 train the same coefficients as one process x batch 4, and the adapter saved
under DDP is rank 0's coefficients without any basis. The same with torch FSDP2 on CPU (the basis buffers are not
sharded; per-block units do not work with the shared basis yet). Plus the NLG recipe end to end under torchrun.

The launched processes run tests/distributed_worker.py (or ``-m recipes.nlg``) in subprocesses; the one-process
reference runs the same worker in this process.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import distributed_worker as worker
from tests.conftest import REPO_ROOT, shared_data_dir

WORKER = REPO_ROOT / "tests" / "distributed_worker.py"
STEPS = 3
# Measured: max |2-process - 1-process| = 1.4e-8 to 3.0e-8 after 3 SGD steps (float32 sums in another order), while the
# coefficients move by up to 0.039 from their initial values. 1e-6 leaves 70x margin and is still 4 orders of
# magnitude below what a wrong loss scale across processes (e.g. summed instead of averaged gradients) would give.
COEFFICIENT_ATOL = 1e-6


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env() -> dict:
    """One thread per process (two processes share two cores) and the repository importable from the children."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    for leftover in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(leftover, None)  # a pytest run that itself sits inside a launcher must not leak its rank
    return env


def launch(command: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    started = time.time()
    proc = subprocess.run(command, cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(command)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    print(f"{command[2:4]} took {time.time() - started:.1f}s")
    return proc


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            *args]


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory) -> Path:
    """The reference: one process, batch 4 (the global batch of 2 processes x 2), same examples in the same order."""
    out = tmp_path_factory.mktemp("single")
    worker.main([str(out), "--per_device_batch", "4", "--steps", str(STEPS)])
    return out


@pytest.fixture(scope="module")
def reference_basis_digest(tmp_path_factory) -> dict:
    """The basis this process generates for the worker's model (one forward pass fills the store)."""
    model = worker.build_model()
    with torch.no_grad():
        model(**worker.pad_batch(worker.training_sequences()[:2]))
    digest = worker.basis_digest(model)
    assert digest, "the forward pass generated no basis"
    return digest


def initial_coefficients() -> dict[str, torch.Tensor]:
    model = worker.build_model()
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def first_global_batch_loss() -> float:
    """The un-trained model's loss on examples 0-3 in one padded batch: mean over all predicted label tokens."""
    with torch.no_grad():
        return worker.build_model()(**worker.pad_batch(worker.training_sequences()[:4])).loss.item()


def check_data_parallel_run(out: Path, single: Path, reference_basis: dict, trainer_checkpoint: bool = True) -> float:
    """Assert properties (a)-(d) of a 2-process run in ``out``; returns max |2-process - 1-process| coefficient."""
    reports = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2], "the launcher did not start two data-parallel processes"
    assert [r["global_step"] for r in reports] == [STEPS, STEPS]

    # (a) Each rank generated the basis itself after DDP wrapped the model (nothing for DDP to broadcast), and it is
    # bit-identical across ranks and to the basis this process generates.
    assert [r["basis_buffers_at_train_begin"] for r in reports] == [[0], [0]]
    assert reports[0]["basis"] == reports[1]["basis"] == reference_basis
    assert all(entry["dtype"] == "torch.float32" for entry in reference_basis.values())

    # (b) DDP all-reduces the gradients, so every rank applies the same update: identical to the bit.
    rank0, rank1 = (load_file(str(out / f"coefficients_rank{rank}.safetensors")) for rank in (0, 1))
    assert rank0.keys() == rank1.keys() and rank0
    assert all("nola_coef" in name for name in rank0), "only the coefficients may be trainable"
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name

    # (c) The same global batch in one process gives the same coefficients (up to float32 summation order).
    reference = load_file(str(single / "coefficients_rank0.safetensors"))
    assert reference.keys() == rank0.keys()
    max_diff = max((rank0[n] - reference[n]).abs().max().item() for n in rank0)
    init = initial_coefficients()
    moved = max((rank0[n] - init[n]).abs().max().item() for n in rank0)
    assert max_diff <= COEFFICIENT_ATOL, f"2 processes vs 1: max |diff| {max_diff:.3g}"
    assert moved > 1000 * COEFFICIENT_ATOL, f"training barely moved the coefficients ({moved:.3g}): vacuous check"
    single_losses = json.loads((single / "rank0.json").read_text())["losses"]
    assert reports[0]["losses"] == pytest.approx(single_losses, rel=1e-6)
    # Before any update, the logged loss is the plain model's token-mean loss on the first global batch.
    assert reports[0]["losses"][0] == pytest.approx(first_global_batch_loss(), rel=1e-6)

    # (d) What the Trainer saved under DDP (save_model and its own checkpoint) is rank 0's coefficients, no basis.
    for saved in [out / "adapter"] + ([out / f"checkpoint-{STEPS}"] if trainer_checkpoint else []):
        tensors = load_file(str(saved / "adapter_model.safetensors"))
        assert not any("basis" in key for key in tensors), sorted(tensors)
        # peft drops the adapter name from the keys on save: "...nola_coef_A.default" -> "...nola_coef_A".
        expected = {name.removesuffix(".default"): value for name, value in rank0.items()}
        assert tensors.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(tensors[key], value), f"{saved.name}: {key}"
    return max_diff


def test_torchrun_two_processes_match_one_process(tmp_path, single_process_run, reference_basis_digest):
    out = tmp_path / "torchrun"
    launch(torchrun(str(WORKER), str(out), "--per_device_batch", "2", "--steps", str(STEPS)))
    max_diff = check_data_parallel_run(out, single_process_run, reference_basis_digest)
    print(f"torchrun: max |coefficient difference| 2 processes vs 1 = {max_diff:.3g}")


@pytest.mark.slow
def test_fsdp2_root_unit_on_cpu_matches_one_process(tmp_path, single_process_run, reference_basis_digest):
    """torch FSDP2 (fully_shard, gloo on CPU; FSDP1 refuses CPU-only machines) with the whole model as one unit:
    parameters are sharded, buffers are not, so each rank holds the full basis it generated itself; the gathered
    full state dict holds the same coefficients as one process."""
    out = tmp_path / "fsdp2"
    launch(torchrun(str(WORKER), str(out), "--per_device_batch", "2", "--steps", str(STEPS), "--fsdp2", "root"))
    max_diff = check_data_parallel_run(out, single_process_run, reference_basis_digest, trainer_checkpoint=False)
    for rank in (0, 1):
        report = json.loads((out / f"rank{rank}.json").read_text())
        assert report["basis_buffer_types"] == ["Tensor"], "a basis buffer became a DTensor (sharded)"
        shards = report["coefficient_shards"]
        assert shards and all(local[0] * 2 == full[0] for full, local in shards.values()), shards
    print(f"FSDP2: max |coefficient difference| 2 processes vs 1 = {max_diff:.3g}")


@pytest.mark.slow
def test_fsdp2_one_unit_per_block_with_shared_basis(tmp_path, single_process_run, reference_basis_digest):
    out = tmp_path / "fsdp2_per_block"
    launch(torchrun(str(WORKER), str(out), "--per_device_batch", "2", "--steps", str(STEPS), "--fsdp2", "per_block"))
    check_data_parallel_run(out, single_process_run, reference_basis_digest, trainer_checkpoint=False)


@pytest.mark.slow
def test_fsdp2_one_unit_per_block_with_on_the_fly_basis(tmp_path):
    """basis_mode per_layer (each layer generates its basis in its own forward, nothing stored) does work with one
    FSDP unit per block: same coefficients as one process in the same mode, saved without basis."""
    single = tmp_path / "single"
    worker.main([str(single), "--per_device_batch", "4", "--steps", str(STEPS), "--basis_mode", "per_layer"])
    out = tmp_path / "fsdp2_per_block"
    launch(torchrun(str(WORKER), str(out), "--per_device_batch", "2", "--steps", str(STEPS), "--fsdp2", "per_block",
                    "--basis_mode", "per_layer"))
    max_diff = check_data_parallel_run(out, single, reference_basis={}, trainer_checkpoint=False)
    print(f"FSDP2 per block, on-the-fly basis: max |coefficient difference| 2 processes vs 1 = {max_diff:.3g}")


@pytest.mark.slow
def test_accelerate_launch_two_processes_match_one_process(tmp_path, single_process_run, reference_basis_digest):
    """``accelerate launch`` with the repository's CPU config (configs/accelerate/cpu_2proc.yaml)."""
    out = tmp_path / "accelerate"
    config = REPO_ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"
    launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--main_process_port", str(free_port()), str(WORKER), str(out), "--per_device_batch", "2",
            "--steps", str(STEPS)])
    max_diff = check_data_parallel_run(out, single_process_run, reference_basis_digest)
    print(f"accelerate launch: max |coefficient difference| 2 processes vs 1 = {max_diff:.3g}")


def test_accelerate_configs_load_with_accelerates_own_parser():
    """Every shipped config passes accelerate's loader (which rejects unknown keys) and is the setup its name says;
    ZeRO-3 keeps tensors of NOLA's coefficient size un-partitioned and gathers weights on save."""
    from accelerate.commands.config.config_args import load_config_from_file

    folder = REPO_ROOT / "configs" / "accelerate"
    expected = {"cpu_2proc": "MULTI_GPU", "multi_gpu_ddp": "MULTI_GPU", "deepspeed_zero2": "DEEPSPEED",
                "deepspeed_zero3": "DEEPSPEED", "fsdp2_one_unit": "FSDP", "fsdp2_per_block": "FSDP"}
    assert {p.stem for p in folder.glob("*.yaml")} == set(expected)
    for name, distributed_type in expected.items():
        config = load_config_from_file(str(folder / f"{name}.yaml"))
        assert config.distributed_type.value == distributed_type, name
    assert load_config_from_file(str(folder / "cpu_2proc.yaml")).num_processes == 2
    for name, wrap in (("fsdp2_one_unit", "NO_WRAP"), ("fsdp2_per_block", "TRANSFORMER_BASED_WRAP")):
        fsdp = load_config_from_file(str(folder / f"{name}.yaml")).fsdp_config
        assert (fsdp["fsdp_version"], fsdp["fsdp_auto_wrap_policy"], fsdp["fsdp_state_dict_type"]) == \
            (2, wrap, "FULL_STATE_DICT")
    zero3 = load_config_from_file(str(folder / "deepspeed_zero3.yaml")).deepspeed_config
    ds = json.loads((REPO_ROOT / zero3["deepspeed_config_file"]).read_text())["zero_optimization"]
    assert ds["stage"] == 3 and ds["stage3_gather_16bit_weights_on_model_save"] is True
    # The paper's largest NOLA coefficient tensor: 2 adapted blocks x 1000 basis coefficients (GPT-2 QV rows).
    assert ds["stage3_param_persistence_threshold"] >= 2 * 1000


# ---------------------------------------------------------------------------------------------------------------
# The NLG recipe itself under torchrun (real E2E slices, decoding sharded across the two processes).
# ---------------------------------------------------------------------------------------------------------------

DATA = shared_data_dir()
TOKENIZER_JSON = DATA / "gpt2_tokenizer" / "tokenizer.json"
TINY_GPT2 = "{model_type: gpt2, n_embd: 32, n_layer: 2, n_head: 2, n_positions: 256}"


@pytest.mark.slow
def test_nlg_recipe_under_torchrun_writes_one_sane_result(tmp_path):
    import shutil

    for needed in (DATA / "e2e" / "train.txt", DATA / "e2e" / "test.txt", TOKENIZER_JSON):
        if not needed.is_file():
            pytest.skip(f"real data not present: {needed}; see ../shared/data/MANIFEST.md")
    if shutil.which("java") is None:
        pytest.skip("METEOR and the PTB tokenizer need Java")
    out = tmp_path / "e2e"
    recipe_args = ["--dataset", "e2e", "--data_dir", str(DATA / "e2e"), "--model_config", TINY_GPT2,
                   "--tokenizer_name_or_path", str(TOKENIZER_JSON), "--method", "nola", "--target_modules", "c_attn",
                   "--output_slices", "{c_attn: {splits: 3, adapt: [0, 2]}}", "--num_basis_A", "32",
                   "--num_basis_B", "32", "--learning_rate", "0.1", "--max_train_pairs", "16", "--max_test_inputs", "5",
                   "--max_steps", "2", "--per_device_train_batch_size", "4", "--warmup_steps", "0", "--num_beams", "2",
                   "--max_new_tokens", "6", "--eval_batch_size", "4", "--save_strategy", "no", "--logging_steps", "1",
                   "--evaluate_base", "false", "--output_dir", str(out)]
    proc = launch(torchrun("-m", "recipes.nlg", *recipe_args))

    # Only rank 0 scores and writes: one results file, announced once.
    assert (proc.stdout + proc.stderr).count("results written to") == 1
    results = json.loads((out / "results.json").read_text())
    assert results["processes"] == 2 and results["train_steps"] == 2 and results["test_inputs"] == 5
    assert results["trainable_params"] == 2 * 2 * (32 + 32)
    assert {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"} <= set(results["metrics"])
    assert all(isinstance(v, float) and v == v for v in results["metrics"].values())  # floats, no NaN
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("nola_coef" in key for key in adapter), sorted(adapter)

    # Five inputs over two ranks (3 + 2, interleaved) gathered back in input order: decoding them here, in one
    # process, with the saved adapter on a freshly built base gives the same predictions in the same order.
    from peft import PeftModel

    from recipes.config import load_config
    from recipes.models import load_model_and_tokenizer
    from recipes.nlg import NLGConfig, generate

    cfg = load_config(NLGConfig, recipe_args)
    base, tokenizer = load_model_and_tokenizer(cfg)
    reloaded = PeftModel.from_pretrained(base, out / "adapter")
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 5
    assert generate(reloaded, tokenizer, cfg, [r["source"] for r in records]) == [r["prediction"] for r in records]
