"""Compression study (issues 19, 26): NOLA at a fraction of LoRA's parameters on E2E, with learning rates chosen on
the validation split, several seeds, and a report that answers the paper's claim from the data; with a paired
``claim`` (configs/studies/paired_study.yaml), per-seed paired differences with 95% intervals (``study_stats.py``).

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python scripts/compression_study.py \
        --study configs/studies/paired_study.yaml [--jobs 2] [--output_dir DIR] [--record_dir DIR] \
        [--seeds 110,111] [--dry_run] [--report_only]

The pairing needs nothing from this script: per seed, every setting gets the same config apart from the adapter
(same training pairs and test inputs), and transformers' Trainer draws the training order from the seed alone
(accelerate's seedable sampler, seeded with ``torch.initial_seed()`` after the Trainer's ``set_seed(seed)``), not
from whatever a method's initialisation drew from the global RNG (tests/test_compression_study.py records it).

Every run is one call of the NLG recipe (``recipes.nlg.main``), in this process or, with ``--jobs N``, in one of N
worker processes (its output then goes to ``log.txt`` in its folder), with a ``run_config.yaml`` written into its own
folder (``python -m recipes.nlg --config that/run_config.yaml`` repeats it alone):

1. selection: per setting and learning rate of its grid, train with each selection seed and decode the validation
   split (``validation_file``, first ``max_validation_inputs`` inputs); the rate with the best mean validation
   ``selection_metric`` wins (the first in grid order on a tie). While the best rate is at an edge of its grid, the
   next rate past that edge joins the grid and is run (at most ``widen_grid`` times per setting, default 2). The test
   split plays no part.
2. test: per setting and seed, train at the chosen rate and decode the test split.

A setting whose ``lr_grid`` holds one rate trains at that rate: it has no selection runs.

Resumable: a run whose ``results.json`` exists, parses and was written for exactly the config the study asks for now
(output folder aside) is kept; any other run folder (a run killed midway, a half-written or deleted results.json, a
config changed since) is emptied and run again. Writes into ``output_dir``: ``runs/<setting>/{select_lr*,test}_seed*``
(each run's adapter, log and full outputs). With ``record_dir`` (a folder meant to be committed), each finished run's
``results.json`` is also copied to ``record_dir/runs/...``, with a test run's predictions (``predictions.jsonl``:
source and prediction per input) and, once for the study, the test inputs' references (``test_references.jsonl``);
a run recorded there counts as finished, so a fresh clone continues where the committed record stops, and the
report is built from the record alone. The report goes to ``record_dir`` (else ``output_dir``): ``study.json``
(selection, per-run metrics, the per-setting mean and sample std, and with a paired ``claim`` the paired
differences and their intervals, see ``study_stats.py``), ``results.md`` and ``bleu_vs_params.png``.

``--dry_run`` lists the runs still to do and estimates their time: per run, training steps times seconds a step
plus decoded inputs times seconds an input plus a fixed overhead, measured on the finished runs of the record when
there are some, else the study's ``time_model``; the runs of a phase go to ``--jobs`` workers in order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if str(Path(__file__).resolve().parent) not in sys.path:  # study_stats, study_report beside this file
    sys.path.append(str(Path(__file__).resolve().parent))

from recipes.cli import RecipeError, run_cli  # noqa: E402
from recipes.config import _unknown_key_error, config_to_dict, load_config, parse_script_args  # noqa: E402
from recipes.nlg import NLGConfig, validate  # noqa: E402
from recipes.nlg_report import TABLE_COLUMNS  # noqa: E402
from recipes.paths import resolve_path  # noqa: E402

import study_report  # noqa: E402

STUDY_KEYS = {"output_dir", "record_dir", "seeds", "selection_seeds", "seed_keys", "validation_file",
              "max_validation_inputs", "widen_grid", "selection_metric", "common", "settings", "claim",
              "paper_reference", "time_model", "history"}
# What --dry_run assumes a run costs until finished runs give measured figures (seconds; see the study YAML).
TIME_MODEL_KEYS = {"train_step_s", "decode_input_s", "overhead_s"}
SETTING_KEYS = {"name", "label", "config", "lr_grid"}
# The study decides these per run; a setting or `common` that sets them would be silently overridden.
RUN_KEYS = {"learning_rate", "output_dir", "test_file", "resume_from_checkpoint"}


@dataclass
class Setting:
    name: str
    label: str
    config: dict
    lr_grid: list[float]


@dataclass
class Study:
    """A study YAML, checked: every run's recipe config is built (so every key is validated) before any run starts."""

    output_dir: Path
    seeds: list[int]
    selection_seeds: list[int]
    seed_keys: list[str]
    validation_file: str
    max_validation_inputs: int | None
    selection_metric: str
    common: dict
    settings: list[Setting]
    claim: dict | None = None
    paper_reference: dict | None = None
    widen_grid: int = 2  # rates added past a grid's edge while its best rate is there
    record_dir: Path | None = None  # finished runs' results (and test predictions) copied here, to be committed
    time_model: dict | None = None  # --dry_run's seconds per training step / decoded input / run, until measured
    history: dict | None = None  # an earlier round's study.json, shown in the report as history
    source: str = ""
    dataset: str = "e2e"
    _configs: dict = field(default_factory=dict, repr=False)


def _fail(where: str, message: str) -> RecipeError:
    return RecipeError(f"{where}: {message}")


def load_study(path: str | os.PathLike, output_dir: str | None = None, seeds: Sequence[int] | None = None,
               record_dir: str | None = None) -> Study:
    """Read and check a study YAML; ``output_dir`` / ``seeds`` / ``record_dir`` override the file's. RecipeError names
    what is wrong."""
    import yaml

    path = resolve_path(path)
    if not path.is_file():
        raise RecipeError(f"study file not found: {path} (pass --study configs/studies/compression_study.yaml)")
    raw = yaml.safe_load(path.read_text()) or {}
    where = str(path)
    unknown = sorted(set(raw) - STUDY_KEYS)
    if unknown:
        raise _fail(where, f"unknown key(s) {unknown}; allowed: {', '.join(sorted(STUDY_KEYS))}")
    for key in ("settings", "common"):
        if key not in raw:
            raise _fail(where, f"missing '{key}'")
    seeds = list(seeds) if seeds else list(raw.get("seeds") or [0])
    settings = []
    for i, item in enumerate(raw["settings"]):
        extra = sorted(set(item) - SETTING_KEYS)
        if extra or "name" not in item or not item.get("lr_grid"):
            raise _fail(where, f"settings[{i}] needs name, config and a non-empty lr_grid (keys: "
                               f"{', '.join(sorted(SETTING_KEYS))}); got {sorted(item)}")
        settings.append(Setting(str(item["name"]), str(item.get("label", item["name"])), dict(item.get("config") or {}),
                                [float(lr) for lr in item["lr_grid"]]))
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        raise _fail(where, f"setting names must be unique, got {names}")
    for bad in RUN_KEYS & (set(raw["common"]) | {k for s in settings for k in s.config}):
        raise _fail(where, f"'{bad}' is set by the study per run (learning rates go in lr_grid); remove it")
    known = [f.name for f in dataclasses.fields(NLGConfig)]
    for part, keys in [("common", raw["common"])] + [(f"setting '{s.name}'", s.config) for s in settings]:
        for key in keys:
            if key not in known:
                raise _unknown_key_error(key, known, f"{part} of {where}")
    study = Study(
        output_dir=resolve_path(output_dir or raw.get("output_dir") or "runs/compression_study").absolute(),
        seeds=[int(s) for s in seeds],
        selection_seeds=[int(s) for s in (raw.get("selection_seeds") or seeds[:1])],
        seed_keys=list(raw.get("seed_keys") or ["seed"]),
        validation_file=str(raw.get("validation_file") or "valid.txt"),
        max_validation_inputs=raw.get("max_validation_inputs"),
        selection_metric=str(raw.get("selection_metric") or "BLEU"),
        widen_grid=int(raw.get("widen_grid", 2)),
        common=dict(raw["common"]),
        settings=settings,
        claim=raw.get("claim"),
        paper_reference=raw.get("paper_reference"),
        record_dir=(resolve_path(record_dir or raw["record_dir"]).absolute()
                    if record_dir or raw.get("record_dir") else None),
        time_model=raw.get("time_model"),
        history=raw.get("history"),
        source=where,
    )
    study.dataset = str(study.common.get("dataset", "e2e"))
    if study.widen_grid < 0:
        raise _fail(where, f"widen_grid must be 0 (never widen a learning-rate grid) or more, got {study.widen_grid}")
    for key in study.seed_keys:
        if key not in known:
            raise _unknown_key_error(key, known, f"seed_keys of {where}")
    metrics = TABLE_COLUMNS.get(study.dataset, [])
    if study.selection_metric not in metrics:
        raise _fail(where, f"selection_metric '{study.selection_metric}' is not a {study.dataset} metric; "
                           f"choose one of {', '.join(metrics)}")
    if study.claim and "compared" in study.claim:  # the paired claim: each compared setting against each reference
        named = [*study.claim.get("references", []), *study.claim.get("compared", [])]
        unknown_names = [n for n in named if n not in names]
        if unknown_names or not study.claim.get("references") or not study.claim.get("compared"):
            raise _fail(where, f"claim: 'references' and 'compared' must be non-empty lists of settings "
                               f"({', '.join(names)}); unknown: {unknown_names}")
        if study.record_dir is None:
            raise _fail(where, "a paired claim (claim.compared) is computed from the runs' recorded predictions: "
                               "set record_dir (e.g. docs/compression_study/<study name>)")
    elif study.claim:
        missing = [k for k in ("reference", "compressed", "rank_one") if study.claim.get(k) not in names]
        if missing:
            raise _fail(where, f"claim: {missing} must name settings ({', '.join(names)})")
    if study.time_model is not None and set(study.time_model) != TIME_MODEL_KEYS:
        raise _fail(where, f"time_model needs exactly the keys {sorted(TIME_MODEL_KEYS)}, "
                           f"got {sorted(study.time_model)}")
    # Build every run's config now: a typo in any key fails here, not after hours of earlier runs.
    for run in planned_runs(study, chosen_lr={s.name: s.lr_grid[0] for s in settings}):
        run_config(study, run)
    return study


# --------------------------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    setting: str
    phase: str  # "select" (validation split) or "test"
    seed: int
    learning_rate: float

    @property
    def relative_dir(self) -> str:
        prefix = f"select_lr{self.learning_rate:g}" if self.phase == "select" else "test"
        return f"runs/{self.setting}/{prefix}_seed{self.seed}"


def selection_runs(study: Study) -> list[Run]:
    """Every (rate, selection seed) of every grid with more than one rate (a one-rate grid is a fixed rate)."""
    return [Run(s.name, "select", seed, lr)
            for s in study.settings if len(s.lr_grid) > 1 for lr in s.lr_grid for seed in study.selection_seeds]


def test_runs(study: Study, chosen_lr: dict[str, float]) -> list[Run]:
    return [Run(s.name, "test", seed, chosen_lr[s.name]) for s in study.settings for seed in study.seeds]


def planned_runs(study: Study, chosen_lr: dict[str, float]) -> list[Run]:
    return selection_runs(study) + test_runs(study, chosen_lr)


def run_values(study: Study, run: Run) -> dict:
    """The recipe config of one run as plain YAML-able values."""
    setting = next(s for s in study.settings if s.name == run.setting)
    values = {**study.common, **setting.config, "learning_rate": run.learning_rate,
              "output_dir": str(study.output_dir / run.relative_dir), "row_label": setting.label}
    for key in study.seed_keys:
        values[key] = run.seed
    if run.phase == "select":
        values["test_file"] = study.validation_file
        values["max_test_inputs"] = study.max_validation_inputs
    return values


def run_config(study: Study, run: Run) -> NLGConfig:
    """The run's NLGConfig, built and checked the way ``python -m recipes.nlg --config`` builds it."""
    import yaml

    key = run
    if key not in study._configs:
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump(run_values(study, run), f, sort_keys=False)
        try:
            cfg = load_config(NLGConfig, [], config_path=f.name)
        except RecipeError as exc:
            raise RecipeError(f"{study.source}, setting '{run.setting}': {exc}") from None
        finally:
            os.unlink(f.name)
        validate(cfg)
        study._configs[key] = cfg
    return study._configs[key]


def _comparable(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "output_dir"}


def _matching_results(study: Study, run: Run, path: Path) -> dict | None:
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(results, dict) or "metrics" not in results:
        return None
    if _comparable(results.get("config", {})) != _comparable(config_to_dict(run_config(study, run))):
        return None
    return results


def finished_results(study: Study, run: Run) -> dict | None:
    """The run's results if it is complete and was made by the config the study asks for now, else None: from the
    record when the study keeps one (a run finished in output_dir but not yet recorded is recorded now), else from
    output_dir."""
    if study.record_dir is None:
        return _matching_results(study, run, study.output_dir / run.relative_dir / "results.json")
    recorded = _matching_results(study, run, study.record_dir / run.relative_dir / "results.json")
    if recorded is not None and (run.phase != "test" or (study.record_dir / run.relative_dir / "predictions.jsonl")
                                 .is_file()):
        return recorded
    results = _matching_results(study, run, study.output_dir / run.relative_dir / "results.json")
    if results is not None:
        record_run(study, run, results)
    return results


def record_run(study: Study, run: Run, results: dict) -> None:
    """Copy a finished run into the record: its results.json and, for a test run, its predictions (source and
    prediction per input) and the study's test references (written by the first test run recorded, checked by every
    later one: the runs of a paired study must decode the same inputs with the same references)."""
    out = study.output_dir / run.relative_dir
    folder = study.record_dir / run.relative_dir
    folder.mkdir(parents=True, exist_ok=True)
    if run.phase == "test":
        records = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
        references = "".join(json.dumps({"source": r["source"], "references": r["references"]}, ensure_ascii=False)
                             + "\n" for r in records)
        shared = study.record_dir / "test_references.jsonl"
        if shared.is_file() and shared.read_text(encoding="utf-8") != references:
            raise RecipeError(f"{run.relative_dir} decoded other test inputs or references than {shared} holds: the "
                              "runs of a study must share their test inputs (was the test file or max_test_inputs "
                              "changed? then record the study anew in an empty record_dir)")
        if not shared.is_file():
            _write_atomic(shared, references)
        _write_atomic(folder / "predictions.jsonl", "".join(
            json.dumps({"source": r["source"], "prediction": r["prediction"]}, ensure_ascii=False) + "\n"
            for r in records))
    _write_atomic(folder / "results.json", json.dumps(results, indent=2) + "\n")  # last: it marks the run finished


def execute(study: Study, run: Run, log: list[dict], log_file: bool = False) -> dict:
    """Return the run's results, running the recipe first unless a finished run is on disk. ``log_file``: send the
    run's output (progress bars, the scorer's) to ``log.txt`` in its folder instead of the terminal."""
    from recipes import nlg

    results = finished_results(study, run)
    if results is not None:
        log.append({"run": run.relative_dir, "action": "kept"})
        return results
    import yaml

    out = study.output_dir / run.relative_dir
    for folder in (out, study.record_dir / run.relative_dir if study.record_dir else None):
        if folder is not None and folder.exists():
            shutil.rmtree(folder)  # whatever a killed or outdated run left (partial adapter, predictions, results)
    out.mkdir(parents=True)
    config_path = out / "run_config.yaml"
    config_path.write_text(yaml.safe_dump(run_values(study, run), sort_keys=False))
    print(f"[study] {run.relative_dir}: lr {run.learning_rate:g}, seed {run.seed}"
          + (f" (output in {out / 'log.txt'})" if log_file else ""), flush=True)
    started = time.time()
    with _output_to(out / "log.txt" if log_file else None):
        results = nlg.main(["--config", str(config_path)])
    if study.record_dir is not None:
        record_run(study, run, results)
    log.append({"run": run.relative_dir, "action": "ran", "seconds": round(time.time() - started, 1)})
    return results


@contextlib.contextmanager
def _output_to(path: Path | None):
    """Redirect this process's stdout and stderr (file descriptors, so subprocesses such as the Java scorers too)."""
    if path is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


_WORKER_STUDY: Study | None = None


def _worker_start(study: Study, threads: int | None) -> None:
    global _WORKER_STUDY
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    _WORKER_STUDY = study


def _worker_run(run: Run) -> tuple[dict, list[dict]]:
    log: list[dict] = []
    return execute(_WORKER_STUDY, run, log, log_file=True), log


def execute_all(study: Study, runs: list[Run], log: list[dict], jobs: int) -> dict[Run, dict]:
    """Every run's results; with ``jobs`` > 1 the runs not finished yet go to that many worker processes, each with
    its share of the CPU threads unless OMP_NUM_THREADS is set."""
    if jobs <= 1:
        return {run: execute(study, run, log) for run in runs}
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    results = {run: res for run in runs if (res := finished_results(study, run)) is not None}
    log.extend({"run": run.relative_dir, "action": "kept"} for run in results)
    todo = [run for run in runs if run not in results]
    threads = None if os.environ.get("OMP_NUM_THREADS") else max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(min(jobs, max(1, len(todo))), mp_context=get_context("spawn"),
                             initializer=_worker_start, initargs=(study, threads)) as pool:
        futures = {pool.submit(_worker_run, run): run for run in todo}
        try:
            for future in as_completed(futures):
                run = futures[future]
                results[run], worker_log = future.result()
                log.extend(worker_log)
                score = (study_report.metric_scale(study, study.selection_metric)
                         * results[run]["metrics"][study.selection_metric])
                print(f"[study] {run.relative_dir}: done in {worker_log[-1]['seconds']:.0f} s, "
                      f"{study.selection_metric} {score:.2f}", flush=True)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return {run: results[run] for run in runs}


def choose_learning_rates(study: Study, selection: dict[Run, dict]) -> dict[str, dict]:
    """Per setting: the mean validation metric of each grid rate and the chosen rate (best mean, first on a tie)."""
    chosen = {}
    for s in study.settings:
        if len(s.lr_grid) == 1:  # a fixed rate: nothing to choose
            chosen[s.name] = {"validation": {}, "learning_rate": s.lr_grid[0], "at_grid_edge": False}
            continue
        scores = {}
        for lr in s.lr_grid:
            values = [selection[Run(s.name, "select", seed, lr)]["metrics"][study.selection_metric]
                      for seed in study.selection_seeds]
            scores[lr] = statistics.fmean(values)
        best = max(s.lr_grid, key=lambda lr: scores[lr])  # max keeps the first of equal scores
        chosen[s.name] = {"validation": {f"{lr:g}": scores[lr] for lr in s.lr_grid}, "learning_rate": best,
                          "at_grid_edge": len(s.lr_grid) > 1 and best in (min(s.lr_grid), max(s.lr_grid))}
    return chosen


def rate_beyond(grid: Sequence[float], edge: float) -> float:
    """The next rate past ``edge`` (the grid's smallest or largest), a step of the grid's ratio at that end."""
    g = sorted(grid)
    rate = g[0] * g[0] / g[1] if edge == g[0] else g[-1] * g[-1] / g[-2]
    return float(f"{rate:.3g}")  # 1e-2 * 1e-2 / 5e-3 is 0.019999999999999997; the run folder and config say 0.02


def select_learning_rates(study: Study, get) -> tuple[dict[Run, dict | None], dict[str, dict] | None]:
    """The selection runs (through ``get``, a function from runs to their results) and the chosen rates. While a
    setting's best rate is at an edge of its grid and the grid was widened fewer than ``widen_grid`` times, the rate
    beyond that edge joins the grid and is run too. The chosen rates are None while a run is unfinished (``get``
    returned None for it: a dry run, --report_only)."""
    widened = {s.name: 0 for s in study.settings}
    selection: dict[Run, dict | None] = {}
    while True:
        selection.update(get([run for run in selection_runs(study) if run not in selection]))  # each run asked once
        if any(res is None for res in selection.values()):
            return selection, None
        info = choose_learning_rates(study, selection)
        grew = [s for s in study.settings if info[s.name]["at_grid_edge"] and widened[s.name] < study.widen_grid]
        for s in grew:
            s.lr_grid = sorted(s.lr_grid + [rate_beyond(s.lr_grid, info[s.name]["learning_rate"])])
            widened[s.name] += 1
            print(f"[study] {s.name}: best validation {study.selection_metric} at the edge of the grid "
                  f"({info[s.name]['learning_rate']:g}); widened to {', '.join(f'{lr:g}' for lr in s.lr_grid)}",
                  flush=True)
        if not grew:
            return selection, info


# --------------------------------------------------------------------------------------------------------------------
# Time estimate (--dry_run)
# --------------------------------------------------------------------------------------------------------------------


def time_figures(study: Study, finished: Sequence[dict]) -> dict | None:
    """Seconds a training step, a decoded input and a run's overhead (loading, scoring): measured on ``finished``
    runs' results when there are some, else the study's ``time_model``; None when neither is there."""
    done = [r for r in finished if r.get("train_steps") and r.get("test_inputs")]
    if done:
        return {"train_step_s": sum(r["train_time_s"] for r in done) / sum(r["train_steps"] for r in done),
                "decode_input_s": sum(r["decode_time_s"] for r in done) / sum(r["test_inputs"] for r in done),
                "overhead_s": statistics.fmean(r["wall_time_s"] - r["train_time_s"] - r["decode_time_s"] for r in done),
                "source": f"measured on {len(done)} finished run(s)"}
    if study.time_model:
        return {**{k: float(v) for k, v in study.time_model.items()}, "source": f"time_model of {study.source}"}
    return None


def run_estimate_s(study: Study, run: Run, figures: dict) -> float | None:
    """A run's estimated seconds: steps x s/step + decoded inputs x s/input + overhead; None when the config does not
    say its number of steps or inputs (epochs over all pairs, all inputs)."""
    cfg = run_config(study, run)
    steps = cfg.max_steps if cfg.max_steps > 0 else (
        math.ceil(cfg.num_train_epochs * cfg.max_train_pairs / cfg.per_device_train_batch_size)
        if cfg.max_train_pairs else None)
    inputs = cfg.max_test_inputs
    if steps is None or inputs is None:
        return None
    return steps * figures["train_step_s"] + inputs * figures["decode_input_s"] + figures["overhead_s"]


def makespan(durations: Sequence[float], jobs: int) -> float:
    """Wall time of runs handed in order to ``jobs`` workers, each taking the next run when it is free."""
    free = [0.0] * max(1, jobs)
    for seconds in durations:
        free[free.index(min(free))] += seconds
    return max(free)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


def dry_run(study: Study, jobs: int) -> dict:
    """Print the runs still to do with their estimated times, and the study's estimated wall time at one job and at
    ``jobs`` (2 when 1 is asked: a 2-core machine's choice); runs nothing. Test runs whose rate the selection has not
    chosen yet are counted at the grid's first rate (a run's time does not depend on its rate)."""
    selection, info = select_learning_rates(study, lambda runs: {r: finished_results(study, r) for r in runs})
    select_todo = [r for r, res in selection.items() if res is None]
    chosen = {name: entry["learning_rate"] for name, entry in (info or {}).items()}
    fixed = {s.name: s.lr_grid[0] for s in study.settings if len(s.lr_grid) == 1}
    tests = test_runs(study, {s.name: chosen.get(s.name, fixed.get(s.name, s.lr_grid[0])) for s in study.settings})
    test_todo = [r for r in tests if (r.setting not in chosen and r.setting not in fixed)
                 or finished_results(study, r) is None]
    done = [res for res in selection.values() if res is not None]
    done += [res for r in tests if r not in test_todo and (res := finished_results(study, r)) is not None]
    figures = time_figures(study, done)
    print(f"selection: {len(select_todo)} of {len(selection)} run(s) to do"
          + ("" if info else " (more if a best rate ends at the edge of its grid)")
          + f"; test: {len(test_todo)} of {len(tests)} run(s) to do"
          + ("" if info else " (at the rates the selection chooses)"))
    estimates = {}
    for r in [*select_todo, *test_todo]:
        estimates[r] = run_estimate_s(study, r, figures) if figures else None
        when = f"~{estimates[r] / 60:.0f} min" if estimates[r] is not None else "no estimate"
        print(f"   {r.relative_dir}  {when}")
    result: dict[str, Any] = {"todo": [r.relative_dir for r in [*select_todo, *test_todo]], "figures": figures}
    if figures is None:
        print("no time estimate: no finished runs yet and no time_model in the study")
        return result
    known = [r for r, e in estimates.items() if e is not None]
    wall = {}
    for n in sorted({1, jobs if jobs > 1 else 2}):
        wall[n] = sum(makespan([estimates[r] for r in phase if estimates[r] is not None], n)
                      for phase in (select_todo, test_todo))
    result.update(estimate_s=sum(estimates[r] for r in known), wall_s=wall)
    print(f"estimate ({figures['source']}: {figures['train_step_s']:.2f} s a training step, "
          f"{figures['decode_input_s']:.2f} s a decoded input, {figures['overhead_s']:.0f} s a run besides; one "
          f"thread a run): {_hours(result['estimate_s'])} of runs; wall time "
          + ", ".join(f"{_hours(w)} with --jobs {n}" for n, w in wall.items())
          + (f"; {len(estimates) - len(known)} run(s) without an estimate" if len(known) < len(estimates) else ""))
    return result


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # workers may write the shared references at once
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class StudyOptions:
    """python scripts/compression_study.py options."""

    study: str = field(default="configs/studies/compression_study.yaml", metadata={"help": "The study YAML."})
    output_dir: str | None = field(default=None, metadata={"help": "Override the study's output_dir."})
    record_dir: str | None = field(default=None, metadata={"help": (
        "Override the study's record_dir (finished runs' results and the report, meant to be committed).")})
    seeds: str | None = field(default=None, metadata={"help": (
        "Comma-separated seeds overriding the study's, e.g. 110,111.")})
    jobs: int = field(default=1, metadata={"help": (
        "Runs at once, each in its own process (e.g. 2 on a 2-core machine with OMP_NUM_THREADS=1).")})
    dry_run: bool = field(default=False, metadata={"help": "Check the study, list the runs still to do, stop."})
    report_only: bool = field(default=False, metadata={"help": (
        "Write the report from the finished runs on disk; run nothing.")})


def main(argv: Sequence[str] | None = None) -> dict:
    """Run (or resume) the study and write its report; returns study.json's content plus the run log."""
    usage = "python scripts/compression_study.py [--study FILE.yaml] [--key value ...]"
    args = parse_script_args(StudyOptions, argv, usage, __doc__)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    study = load_study(args.study, args.output_dir, seeds, args.record_dir)
    study.output_dir.mkdir(parents=True, exist_ok=True)
    log: list[dict] = []

    def finished(runs: list[Run]) -> dict[Run, dict | None]:
        return {run: finished_results(study, run) for run in runs}

    if args.dry_run:
        return dry_run(study, args.jobs)

    if args.jobs < 1:
        raise RecipeError(f"--jobs must be at least 1, got {args.jobs}")

    def get(runs: list[Run]) -> dict[Run, dict | None]:
        return finished(runs) if args.report_only else execute_all(study, runs, log, args.jobs)

    selection, selection_info = select_learning_rates(study, get)
    if selection_info is None:
        missing = [r.relative_dir for r, res in selection.items() if res is None]
        raise RecipeError(f"--report_only: selection runs not finished yet ({', '.join(missing[:5])}"
                          f"{', ...' if len(missing) > 5 else ''}); run the study without --report_only")
    chosen = {name: info["learning_rate"] for name, info in selection_info.items()}
    for name, info in selection_info.items():
        if info["at_grid_edge"]:
            print(f"[study] warning: {name}'s best validation {study.selection_metric} is still at the edge of its "
                  f"lr_grid ({info['learning_rate']:g}) after widening it {study.widen_grid} time(s)", flush=True)
    tests = {run: res for run, res in get(test_runs(study, chosen)).items() if res is not None}
    settings = study_report.aggregate(study, selection_info, tests)

    meta = {"study_file": os.path.relpath(study.source, Path.cwd()),
            "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    report_dir = study.record_dir or study.output_dir
    report_dir.mkdir(parents=True, exist_ok=True)
    comparisons = None
    if study.claim and "compared" in study.claim:
        comparisons = study_report.paired_comparisons(
            study.claim, {s.name: s.label for s in study.settings},
            {name: e["trainable_params"] for name, e in settings.items() if "trainable_params" in e}, study.seeds,
            {(run.setting, run.seed): (run.relative_dir, r) for run, r in tests.items()}, study.record_dir)
        meta["claim"] = study_report.paired_answer(comparisons, float(study.claim.get("margin_bleu", 1.0)))
        meta["paired"] = study_report.paired_markdown(comparisons)
        meta["paired_note"] = (f"bootstrap: {study.claim.get('bootstrap_resamples', 2000)} resamples of the test "
                               f"inputs, seed {study.claim.get('bootstrap_seed', 0)}")
    else:
        meta["claim"] = study_report.answer_claim(study, settings)
    if study.history:
        meta["history"] = study_report.history_markdown(study.history, resolve_path(study.history["study_json"]))
    run_seconds = [r["wall_time_s"] for r in [*selection.values(), *tests.values()]]  # type: ignore[index]
    meta["run_time"] = (f"{len(selection)} selection and {len(tests)} test runs; their wall times sum to "
                        f"{sum(run_seconds) / 3600:.1f} h ({statistics.fmean(run_seconds) / 60:.1f} min a run; runs "
                        f"in parallel with --jobs overlap).")
    summary = {"study": meta["study_file"], "generated": meta["generated"], "seeds": study.seeds,
               "selection_seeds": study.selection_seeds, "selection_metric": study.selection_metric,
               "settings": settings, "claim": meta["claim"],
               "test_runs": {run.relative_dir: {"metrics": r["metrics"], "trainable_params": r["trainable_params"],
                                                "adapter_bytes": r["adapter_bytes"]} for run, r in tests.items()},
               "selection_runs": {run.relative_dir: r["metrics"] for run, r in selection.items()},  # type: ignore
               "paper_reference": study.paper_reference}
    if comparisons is not None:
        summary["paired"] = comparisons
    _write_atomic(report_dir / "study.json", json.dumps(summary, indent=2) + "\n")
    cfg = run_config(study, test_runs(study, chosen)[0])  # what every test run shares (data, steps, decoding)
    _write_atomic(report_dir / "results.md", study_report.report_markdown(study, settings, meta, cfg))
    if comparisons is not None:
        import matplotlib.pyplot as plt

        title = (f"{cfg.model_name_or_path if cfg.model_config is None else 'random-init model'}, "
                 f"{f'{cfg.max_steps} steps' if cfg.max_steps > 0 else f'{cfg.num_train_epochs:g} epoch(s)'}, "
                 f"{cfg.max_test_inputs or 'all'} test inputs, {len(study.seeds)} seed(s)")
        plt.close(study_report.plot_paired(settings, comparisons, float(study.claim.get("margin_bleu", 1.0)), title,
                                           report_dir / "bleu_vs_params.png"))
    elif any("metrics" in e for e in settings.values()):
        study_report.plot(study, settings, report_dir / "bleu_vs_params.png")
    ran = [entry for entry in log if entry["action"] == "ran"]
    print(f"[study] {len(ran)} run(s) done now, {len(log) - len(ran)} kept; report: {report_dir / 'results.md'}")
    if meta["claim"]:
        print(meta["claim"])
    return dict(summary, log=log)


if __name__ == "__main__":
    run_cli(main)
