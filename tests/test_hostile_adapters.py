"""The hostile-input suite (issue 18): every mutation of a valid adapter directory in tests/hostile.py, loaded through
``PeftModel.from_pretrained`` and through ``load_adapter`` onto an existing adapter name (what ``Trainer`` does to
resume; every third case also onto a new name), ends as its expected outcome: an identical model, or peft-nola's
documented refusal raised before the model was changed. A few configs are parsed by peft itself before any peft-nola code runs; their expected outcomes record
what peft does (README: "Loading broken or hostile adapters").

The cases run in worker processes (torch imported once per worker), each under a memory cap (RLIMIT_AS, 8 GiB) and a
per-case time limit; a case that hangs or kills its worker is recorded as such and the worker is restarted.
"""

import json
import os
import select
import subprocess
import sys
import time
from collections import Counter

import pytest

from .conftest import REPO_ROOT
from .hostile import CASES, expected_outcome, make_valid_adapters

PATHS = ("pretrained", "existing")
CASE_TIMEOUT = 60  # seconds; a refusal takes well under one here
WORKERS = 2


class Worker:
    def __init__(self, root):
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        self.process = subprocess.Popen([sys.executable, "-m", "tests.hostile", str(root)], cwd=REPO_ROOT, env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        text=True)
        self.ready = False
        self.job = None
        self.deadline = time.monotonic() + 300  # startup: imports and the reference outputs

    def send(self, job):
        self.job = job
        self.process.stdin.write(" ".join(job) + "\n")
        self.process.stdin.flush()
        self.deadline = time.monotonic() + CASE_TIMEOUT

    def kill(self):
        self.process.kill()
        self.process.wait()


def run_suite(root, jobs):
    """``{(case, path): (outcome, detail)}`` for every job, run by WORKERS worker processes."""
    pending, results = list(jobs), {}
    workers = [Worker(root) for _ in range(WORKERS)]
    try:
        while len(results) < len(jobs):
            for worker in workers:
                if worker.ready and worker.job is None and pending:
                    worker.send(pending.pop(0))
            streams = {w.process.stdout: w for w in workers if w.process.poll() is None}
            readable, _, _ = select.select(list(streams), [], [], 1.0)
            for stream in readable:
                worker = streams[stream]
                line = stream.readline()
                if line:
                    message = json.loads(line)
                    if message.get("ready"):
                        worker.ready = True
                    else:
                        results[worker.job] = (message["outcome"], message["detail"])
                        worker.job = None
            for index, worker in enumerate(workers):
                dead = worker.process.poll() is not None
                if dead or time.monotonic() > worker.deadline:
                    assert worker.ready or not dead, "a worker died while starting"
                    if worker.job is not None:
                        results[worker.job] = ("hang" if not dead else f"died:{worker.process.returncode}", "")
                    if not dead:
                        worker.kill()
                    if not worker.ready:
                        raise AssertionError("a worker did not start within 300 s")
                    workers[index] = Worker(root)
    finally:
        for worker in workers:
            worker.kill()
    return results


def test_hostile_adapters_load_identically_or_are_refused_before_injection(tmp_path):
    make_valid_adapters(tmp_path)
    # load_adapter onto a new name runs the same hooks as from_pretrained, on a model that already has an adapter:
    # a sample of the cases, one per 3.
    jobs = [(case[0], path) for case in CASES for path in PATHS] + [(case[0], "new") for case in CASES[::3]]
    assert len(CASES) >= 60 and len({case[0] for case in CASES}) == len(CASES)
    results = run_suite(tmp_path, jobs)
    table = Counter(outcome for outcome, _ in results.values())
    by_path = Counter((path, outcome) for (_, path), (outcome, _) in results.items())
    print(f"\nhostile suite: {len(CASES)} mutations, {len(jobs)} loads")
    for (path, outcome), count in sorted(by_path.items()):
        print(f"  {path:11s} {outcome:24s} {count}")
    print("  total:", dict(sorted(table.items())))
    wrong = {job: result for job, result in results.items()
             if result[0] != expected_outcome(next(c for c in CASES if c[0] == job[0]), job[1])}
    assert not wrong, "\n".join(f"{case} via {path}: {outcome} {detail}" for (case, path), (outcome, detail)
                                in sorted(wrong.items()))
    assert not (tmp_path / "unpickled-marker").exists()
