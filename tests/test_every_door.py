"""One guard, every door (issue 23): every mutation class of ``tests/hostile.py`` loaded through every way into the
library that reads an adapter directory (``tests.hostile.DOORS``: peft's loaders, transformers' ``load_adapter`` and
``AutoModelForCausalLM.from_pretrained``, ``hotswap_adapter``, ``export_lora``) ends as it does on the door it shares
expectations with: the same refusal before the model changed, or the same model.

The fast suite runs every mutation through the transformers loaders and hotswap (peft's own loaders are in
tests/test_hostile_adapters.py); ``-m slow`` runs every mutation through every door and prints the table. peft's
manual flow (``PeftConfig.from_pretrained``, ``load_file``, ``inject_adapter_in_model`` with or without
``state_dict``, ``set_peft_model_state_dict``) is run and printed too, but not held to the guard: the caller reads
the files itself and no peft-nola code sees the directory (docs/safety.md, "Every door").
"""

from collections import Counter, defaultdict

import pytest

from .hostile import BASES, CASES, DOORS, expected_outcome, make_valid_adapters
from .test_hostile_adapters import run_suite

FAST_DOORS = ("tf-load-adapter", "tf-auto", "hotswap")
UNGUARDED = ("inject", "inject-state-dict")

# hotswap_adapter refuses any adapter with modules_to_save (it swaps values in place; load_adapter replaces modules)
# and one whose structure differs from the loaded adapter's: per_layer -> per_layer_cached is another basis_mode.
HOTSWAP_REFUSES = {case[0]: "refused" for case in CASES
                   if BASES[case[1]] is BASES["nola"] or case[0] == "per-layer-to-per-layer-cached"}
#: Where a door's outcome differs from the shared expectation for a reason it cannot remove (each says why).
KNOWN = {
    # transformers' load_adapter reads adapter_config.json itself (peft's PeftConfig.from_pretrained) before any
    # peft-nola code: a config without peft_type crashes there as a TypeError (peft's own loader: a KeyError).
    ("config-missing-peft-type", "tf-load-adapter"): "raw:TypeError",
    ("config-missing-peft-type", "tf-auto"): "raw:TypeError",
    ("config-missing-peft-type", "export"): "raw:TypeError",  # export_lora also asks PeftConfig.from_pretrained
    # load_adapter onto a new name of a NOLA model: peft itself refuses to add a LoRA adapter beside it.
    ("peft-type-LORA", "new"): "refused-by-peft",
    # hotswap checks the saved fingerprints against this base as a new load does (loading into the existing adapter
    # keeps the fingerprints it already verified).
    ("nora-weight-fingerprint-edited", "hotswap"): "refused",
    # AutoModel*.from_pretrained(adapter_dir) loads the base named by base_model_name_or_path (here unreachable).
    ("base-model-name-edited", "tf-auto"): "raw:OSError",
    # export_lora looks for adapter_config.json and the method itself before peft reads the config: a missing or
    # unreadable config and a LoRA adapter are its own refusals (ExportError), not peft's (or a LoRA load).
    **{(name, "export"): "refused" for name in ("config-is-directory", "config-is-fifo", "config-dangling-symlink",
                                                "config-missing", "peft-type-LORA")},
    **{(name, "hotswap"): outcome for name, outcome in HOTSWAP_REFUSES.items()},
}


def expected(case, door):
    return KNOWN.get((case[0], door), expected_outcome(case, door))


def run_doors(tmp_path, doors):
    make_valid_adapters(tmp_path)
    jobs = [(case[0], door) for case in CASES for door in doors]
    results = run_suite(tmp_path, jobs)
    table = defaultdict(Counter)
    for (case, door), (outcome, _) in results.items():
        table[door][outcome] += 1
    print(f"\nevery door: {len(CASES)} mutations x {len(doors)} doors")
    for door in doors:
        print(f"  {door:18s} {dict(sorted(table[door].items()))}")
    print("  " + "mutation".ljust(44) + " ".join(door[:16].ljust(16) for door in doors))
    for case in CASES:
        print("  " + case[0].ljust(44) + " ".join(results[(case[0], door)][0][:16].ljust(16) for door in doors))
    wrong = {job: result for job, result in results.items() if job[1] not in UNGUARDED
             and result[0] != expected(next(c for c in CASES if c[0] == job[0]), job[1])}
    assert not wrong, "\n".join(f"{case} via {door}: {outcome} {detail}" for (case, door), (outcome, detail)
                                in sorted(wrong.items()))
    assert not (tmp_path / "unpickled-marker").exists()


def test_transformers_loaders_and_hotswap_give_every_mutation_the_outcome_peft_s_loaders_give(tmp_path):
    run_doors(tmp_path, FAST_DOORS)


@pytest.mark.slow
def test_every_door_gives_every_mutation_the_same_outcome(tmp_path):
    run_doors(tmp_path, tuple(DOORS))
