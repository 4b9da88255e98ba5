"""Resuming an NLG recipe run (issue #9): a run stopped after a checkpoint and restarted with
``--resume_from_checkpoint`` ends with bit-identical NOLA coefficients to an uninterrupted run with the same seed,
and a checkpoint holds only training state (adapter, optimizer, scheduler, RNG states), never the base model.

The fast tests run the recipe in-process (decoding kept to one input and two tokens, scoring skipped); the slow test
runs ``python -m recipes.nlg`` as real processes and SIGKILLs one of them after its first checkpoint.
"""

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT, shared_data_dir

DATA = shared_data_dir()
TOKENIZER_JSON = DATA / "gpt2_tokenizer" / "tokenizer.json"
TINY_GPT2 = "{model_type: gpt2, n_embd: 32, n_layer: 2, n_head: 2, n_positions: 256}"

TRAIN_PAIRS, BATCH_SIZE, SAVE_STEPS, NUM_BASIS = 16, 4, 3, 32
STEPS_PER_EPOCH = TRAIN_PAIRS // BATCH_SIZE  # 4: resuming at step 3 lands mid-epoch, and the run crosses epochs
# 2 layers x (A, B) x (q, v slices of c_attn) x 32 basis coefficients.
NUM_COEFFICIENTS = 2 * 2 * 2 * NUM_BASIS

# What Trainer writes into checkpoint-N for a PEFT model with save_only_model off. README.md is the model card that
# PeftModel.save_pretrained always writes next to the adapter (a few KB of text).
CHECKPOINT_FILES = {"adapter_model.safetensors", "adapter_config.json", "README.md", "optimizer.pt", "scheduler.pt",
                    "rng_state.pth", "trainer_state.json", "training_args.bin"}


def need_inputs():
    missing = [p for p in (TOKENIZER_JSON, DATA / "e2e" / "train.txt", DATA / "e2e" / "test.txt") if not p.is_file()]
    if missing:
        pytest.skip(f"real data not present ({', '.join(map(str, missing))}); see ../shared/data/MANIFEST.md")
    pytest.importorskip("peft_nola")


def recipe_args(output_dir: Path, max_steps: int, *extra: str) -> list[str]:
    """NOLA on a tiny random GPT-2 with adapter dropout. The shuffle order and the dropout masks after a resume come
    from the restored RNG states, so bit-identity needs those restored at the right point, not only the coefficients
    and the optimizer; dropout adds an RNG draw inside every step on top of the per-epoch shuffle."""
    return ["--dataset", "e2e", "--data_dir", str(DATA / "e2e"), "--model_config", TINY_GPT2,
            "--tokenizer_name_or_path", str(TOKENIZER_JSON), "--method", "nola", "--target_modules", "c_attn",
            "--output_slices", "{c_attn: {splits: 3, adapt: [0, 2]}}", "--num_basis_A", str(NUM_BASIS),
            "--num_basis_B", str(NUM_BASIS), "--learning_rate", "0.1", "--adapter_dropout", "0.1",
            "--max_train_pairs", str(TRAIN_PAIRS), "--per_device_train_batch_size", str(BATCH_SIZE),
            "--max_steps", str(max_steps), "--warmup_steps", "2", "--save_strategy", "steps",
            "--save_steps", str(SAVE_STEPS), "--save_total_limit", "10", "--logging_steps", "1",
            "--max_test_inputs", "1", "--num_beams", "1", "--max_new_tokens", "2", "--eval_batch_size", "1",
            "--evaluate_base", "false", "--output_dir", str(output_dir), *extra]


def coefficients(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def assert_bit_identical(expected: dict, actual: dict):
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and torch.equal(actual[name], tensor), name


def is_complete(checkpoint: Path) -> bool:
    """Trainer writes trainer_state.json last, after the adapter, optimizer, scheduler and RNG files."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return state.get("global_step") == int(checkpoint.name.split("-")[1])


# ---------------------------------------------------------------------------------------------------------------
# Fast: in-process runs.
# ---------------------------------------------------------------------------------------------------------------


class Recorder:
    """Counts optimizer steps run in this process and records every torch.load (file name, weights_only)."""

    def __init__(self, mp: pytest.MonkeyPatch):
        from transformers import Trainer

        self.steps = 0
        self.loads: list[tuple[str, object]] = []
        training_step, load = Trainer.training_step, torch.load

        def counting_step(trainer, *args, **kwargs):
            self.steps += 1
            return training_step(trainer, *args, **kwargs)

        def recording_load(f, *args, **kwargs):
            self.loads.append((Path(f).name, kwargs.get("weights_only")))
            return load(f, *args, **kwargs)

        mp.setattr(Trainer, "training_step", counting_step)
        mp.setattr(torch, "load", recording_load)


def run_in_process(argv: list[str]) -> tuple[dict, Recorder]:
    from recipes import nlg

    with pytest.MonkeyPatch.context() as mp:
        # Scoring starts METEOR's JVM (~20 s) and has no bearing on resuming; the slow test runs the recipe unpatched.
        mp.setattr(nlg, "score", lambda *args, **kwargs: {})
        recorder = Recorder(mp)
        return nlg.main(argv), recorder


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 6-step run saving checkpoint-3 and checkpoint-6."""
    need_inputs()
    out = tmp_path_factory.mktemp("resume") / "reference"
    results, recorder = run_in_process(recipe_args(out, 6))
    assert recorder.steps == 6 and results["train_steps"] == 6
    assert results["trainable_params"] == NUM_COEFFICIENTS
    return out


def test_checkpoint_holds_only_training_state(reference):
    checkpoint = reference / "checkpoint-3"
    assert {p.name for p in checkpoint.iterdir()} == CHECKPOINT_FILES  # no tokenizer, no base-model weights
    saved = coefficients(checkpoint)
    assert all("nola_coef_" in name for name in saved)
    assert sum(t.numel() for t in saved.values()) == NUM_COEFFICIENTS
    sizes = {p.name: p.stat().st_size for p in checkpoint.iterdir()}
    coefficient_bytes = 4 * NUM_COEFFICIENTS
    assert sizes["adapter_model.safetensors"] <= coefficient_bytes + 1024  # + safetensors header
    assert sizes["optimizer.pt"] <= 2 * coefficient_bytes + 8 * 1024  # AdamW's two moments + pickle framing
    # The coefficients three times over (weights, two Adam moments) plus a fixed allowance for the JSON files, the
    # pickled TrainingArguments, the model card and the torch/numpy/python RNG states (~15 KB). The tiny GPT-2 base
    # alone is ~6.5 MB (50257 x 32 fp32 embeddings), so any base-model weights would break this bound.
    assert sum(sizes.values()) <= 3 * coefficient_bytes + 48 * 1024, sizes


def test_resume_from_first_checkpoint_is_bit_identical(reference, tmp_path):
    results, recorder = run_in_process(
        recipe_args(tmp_path, 6, "--resume_from_checkpoint", str(reference / "checkpoint-3")))
    assert recorder.steps == 3 and results["train_steps"] == 6  # steps 4..6 ran here, 1..3 came from the checkpoint
    assert not (tmp_path / "checkpoint-3").exists()
    assert_bit_identical(coefficients(reference / "adapter"), coefficients(tmp_path / "adapter"))
    # Trainer's resume path reads only these three pickles, each with weights_only=True (no arbitrary unpickling);
    # the adapter comes back through safetensors and training_args.bin is never read.
    assert {name for name, _ in recorder.loads} == {"rng_state.pth", "optimizer.pt", "scheduler.pt"}
    assert all(weights_only is True for _, weights_only in recorder.loads), recorder.loads


def test_resume_without_the_rng_state_is_not_identical(reference, tmp_path):
    """Control for the test above: it can fail. Without rng_state.pth the batches and dropout masks of steps 4..6
    differ from the uninterrupted run's."""
    checkpoint = tmp_path / "checkpoint-3"
    shutil.copytree(reference / "checkpoint-3", checkpoint)
    (checkpoint / "rng_state.pth").unlink()
    run_in_process(recipe_args(tmp_path / "run", 6, "--resume_from_checkpoint", str(checkpoint)))
    expected, actual = coefficients(reference / "adapter"), coefficients(tmp_path / "run" / "adapter")
    assert not all(torch.equal(actual[name], tensor) for name, tensor in expected.items())


def test_resume_true_skips_a_checkpoint_torn_by_a_kill(reference, tmp_path):
    """A kill while checkpoint-6 is being written leaves it without trainer_state.json (written last):
    ``resume_from_checkpoint: true`` must resume from checkpoint-3, the newest complete one."""
    shutil.copytree(reference / "checkpoint-3", tmp_path / "checkpoint-3")
    torn = tmp_path / "checkpoint-6"
    torn.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(reference / "checkpoint-6" / name, torn / name)
    results, recorder = run_in_process(recipe_args(tmp_path, 6, "--resume_from_checkpoint", "true"))
    assert recorder.steps == 3 and results["train_steps"] == 6
    assert_bit_identical(coefficients(reference / "adapter"), coefficients(tmp_path / "adapter"))


def _flip_last_coefficient_byte(checkpoint: Path) -> None:
    path = checkpoint / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # the last coefficient changes by a few ulps: still a valid file, but another model
    path.write_bytes(bytes(data))


def _scale_coefficients_tenfold(checkpoint: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v * 10 for k, v in coefficients(checkpoint).items()}, checkpoint / "adapter_model.safetensors")


def _truncate(checkpoint: Path) -> None:
    path = checkpoint / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-7])


def _pickle_instead(checkpoint: Path) -> None:
    tensors = coefficients(checkpoint)
    (checkpoint / "adapter_model.safetensors").unlink()
    torch.save(tensors, checkpoint / "adapter_model.bin")


@pytest.mark.parametrize("corrupt, message", [
    (_flip_last_coefficient_byte, "do not match the weights_checksum"),
    pytest.param(_scale_coefficients_tenfold, "do not match the weights_checksum", marks=pytest.mark.slow),
    pytest.param(_truncate, "truncated or corrupted", marks=pytest.mark.slow),
    (_pickle_instead, "is a pickle file"),
])
def test_resume_from_a_corrupted_checkpoint_is_refused_before_training(reference, tmp_path, corrupt, message):
    """Trainer resumes with load_adapter onto the existing adapter name, for which peft reads no adapter config: the
    checkpoint's directory is still checked in full, before any weight is written or a step runs."""
    checkpoint = tmp_path / "checkpoint-3"
    shutil.copytree(reference / "checkpoint-3", checkpoint)
    corrupt(checkpoint)
    from recipes import nlg

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nlg, "score", lambda *args, **kwargs: {})
        recorder = Recorder(mp)
        with pytest.raises(ValueError, match=message):
            nlg.main(recipe_args(tmp_path / "run", 6, "--resume_from_checkpoint", str(checkpoint)))
    assert recorder.steps == 0
    assert all(name != "adapter_model.bin" for name, _ in recorder.loads), "the pickle file was opened"


# ---------------------------------------------------------------------------------------------------------------
# Slow: real processes, one of them killed with SIGKILL after its first checkpoint.
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def start_recipe():
    """Starts ``python -m recipes.nlg`` processes; any still running when the test ends (it failed) are killed."""
    started: list[subprocess.Popen] = []

    def start(argv: list[str], log: Path) -> subprocess.Popen:
        # One thread each: the reference and the run to be killed share the CPU, and a fixed thread count keeps
        # the float reductions in the same order in every process.
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
        with log.open("w") as sink:
            started.append(subprocess.Popen([sys.executable, "-m", "recipes.nlg", *argv], cwd=REPO_ROOT, env=env,
                                            stdout=sink, stderr=subprocess.STDOUT))
        return started[-1]

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def finish(process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    assert process.wait(timeout=timeout) == 0, log.read_text()[-3000:]


def logged_steps(log: Path) -> list[int]:
    """Global steps of the per-step loss lines this process printed (logging_steps 1), from their epoch field."""
    records = [ast.literal_eval(m) for m in re.findall(r"\{'loss': [^}]*\}", log.read_text())]
    return [round(float(r["epoch"]) * STEPS_PER_EPOCH) for r in records]


@pytest.mark.slow
def test_sigkill_after_first_checkpoint_then_resume_matches_uninterrupted_run(tmp_path, start_recipe):
    need_inputs()
    if shutil.which("java") is None:
        pytest.skip("the recipe scores with METEOR, which needs Java (apt-get install default-jre-headless)")
    max_steps = 9
    reference_out, killed_out = tmp_path / "reference", tmp_path / "killed"
    reference = start_recipe(recipe_args(reference_out, max_steps), tmp_path / "reference.log")
    victim = start_recipe(recipe_args(killed_out, max_steps), tmp_path / "killed.log")
    first = killed_out / f"checkpoint-{SAVE_STEPS}"
    deadline = time.monotonic() + 300
    while not is_complete(first):
        assert victim.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no complete checkpoint-3 within 300 s"
        time.sleep(0.02)
    assert victim.poll() is None and not (killed_out / f"checkpoint-{max_steps}").exists()
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL
    # Killed mid-training: the last checkpoint, the final adapter and the results were never written.
    assert not (killed_out / f"checkpoint-{max_steps}").exists()
    assert not (killed_out / "adapter").exists() and not (killed_out / "results.json").exists()
    assert logged_steps(tmp_path / "killed.log")[-1] < max_steps
    complete = [int(p.name.split("-")[1]) for p in killed_out.glob("checkpoint-*") if is_complete(p)]
    resumed_from = max(complete)
    assert resumed_from in (3, 6)  # 6 only if the kill came late, after a second complete save

    finish(reference, tmp_path / "reference.log")
    resumed = start_recipe(recipe_args(killed_out, max_steps, "--resume_from_checkpoint", "true"),
                           tmp_path / "resumed.log")
    finish(resumed, tmp_path / "resumed.log")

    assert logged_steps(tmp_path / "reference.log") == list(range(1, max_steps + 1))
    assert logged_steps(tmp_path / "resumed.log") == list(range(resumed_from + 1, max_steps + 1))
    assert json.loads((killed_out / "results.json").read_text())["train_steps"] == max_steps
    assert_bit_identical(coefficients(reference_out / "adapter"), coefficients(killed_out / "adapter"))
