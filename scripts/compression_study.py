"""Compression study (issue 19): NOLA at a fraction of LoRA's parameters on E2E, with learning rates chosen on the
validation split, several seeds, and a report that answers the paper's claim from the data.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python scripts/compression_study.py \
        --study configs/studies/compression_study.yaml [--jobs 2] [--output_dir DIR] [--seeds 110,111] [--dry_run] \
        [--report_only]

Every run is one call of the NLG recipe (``recipes.nlg.main``), in this process or, with ``--jobs N``, in one of N
worker processes (its output then goes to ``log.txt`` in its folder), with a ``run_config.yaml`` written into its own
folder (``python -m recipes.nlg --config that/run_config.yaml`` repeats it alone):

1. selection: per setting and learning rate of its grid, train with each selection seed and decode the validation
   split (``validation_file``, first ``max_validation_inputs`` inputs); the rate with the best mean validation
   ``selection_metric`` wins (the first in grid order on a tie). While the best rate is at an edge of its grid, the
   next rate past that edge joins the grid and is run (at most ``widen_grid`` times per setting, default 2). The test
   split plays no part.
2. test: per setting and seed, train at the chosen rate and decode the test split.

Resumable: a run whose ``results.json`` exists, parses and was written for exactly the config the study asks for now
(output folder aside) is kept; any other run folder (a run killed midway, a half-written or deleted results.json, a
config changed since) is emptied and run again. Writes into ``output_dir``: ``runs/<setting>/{select_lr*,test}_seed*``,
``study.json`` (selection, per-run metrics and the per-setting mean and sample std), ``results.md`` and
``bleu_vs_params.png``.
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

from recipes.cli import RecipeError, run_cli  # noqa: E402
from recipes.config import _unknown_key_error, config_to_dict, load_config, parse_script_args  # noqa: E402
from recipes.nlg import NLGConfig, validate  # noqa: E402
from recipes.nlg_report import PERCENT_METRICS, TABLE_COLUMNS  # noqa: E402
from recipes.paths import resolve_path  # noqa: E402
from recipes.results import markdown_table  # noqa: E402

STUDY_KEYS = {"output_dir", "seeds", "selection_seeds", "seed_keys", "validation_file", "max_validation_inputs",
              "widen_grid", "selection_metric", "common", "settings", "claim", "paper_reference"}
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
    source: str = ""
    dataset: str = "e2e"
    _configs: dict = field(default_factory=dict, repr=False)


def _fail(where: str, message: str) -> RecipeError:
    return RecipeError(f"{where}: {message}")


def load_study(path: str | os.PathLike, output_dir: str | None = None, seeds: Sequence[int] | None = None) -> Study:
    """Read and check a study YAML; ``output_dir`` / ``seeds`` override the file's. RecipeError names what is wrong."""
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
    if study.claim:
        missing = [k for k in ("reference", "compressed", "rank_one") if study.claim.get(k) not in names]
        if missing:
            raise _fail(where, f"claim: {missing} must name settings ({', '.join(names)})")
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
    return [Run(s.name, "select", seed, lr)
            for s in study.settings for lr in s.lr_grid for seed in study.selection_seeds]


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


def finished_results(study: Study, run: Run) -> dict | None:
    """The run's results.json if it is complete and was made by the config the study asks for now, else None."""
    path = study.output_dir / run.relative_dir / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(results, dict) or "metrics" not in results:
        return None
    if _comparable(results.get("config", {})) != _comparable(config_to_dict(run_config(study, run))):
        return None
    return results


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
    if out.exists():
        shutil.rmtree(out)  # whatever a killed or outdated run left (partial adapter, predictions, stale results)
    out.mkdir(parents=True)
    config_path = out / "run_config.yaml"
    config_path.write_text(yaml.safe_dump(run_values(study, run), sort_keys=False))
    print(f"[study] {run.relative_dir}: lr {run.learning_rate:g}, seed {run.seed}"
          + (f" (output in {out / 'log.txt'})" if log_file else ""), flush=True)
    started = time.time()
    with _output_to(out / "log.txt" if log_file else None):
        results = nlg.main(["--config", str(config_path)])
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
                score = _scale(study, study.selection_metric) * results[run]["metrics"][study.selection_metric]
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
# Aggregation and report
# --------------------------------------------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); the std is None for a single value."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def aggregate(study: Study, selection_info: dict, tests: dict[Run, dict]) -> dict:
    """Per setting: chosen rate, trainable parameters, adapter bytes, and mean/std of every metric over seeds."""
    settings = {}
    for s in study.settings:
        runs = [(run, r) for run, r in tests.items() if run.setting == s.name]
        entry: dict[str, Any] = {"label": s.label, "method": s.config.get("method", study.common.get("method")),
                                 "basis_mode": s.config.get("basis_mode", study.common.get("basis_mode")),
                                 "learning_rate": selection_info[s.name]["learning_rate"],
                                 "validation": selection_info[s.name]["validation"],
                                 "at_grid_edge": selection_info[s.name]["at_grid_edge"],
                                 "seeds": [run.seed for run, _ in runs],
                                 "runs": [run.relative_dir for run, _ in runs]}
        if runs:
            params = {r["trainable_params"] for _, r in runs}
            adapter = {r["adapter_bytes"] for _, r in runs}
            if len(params) != 1:
                raise RuntimeError(f"{s.name}: runs disagree on trainable parameters {sorted(params)}")
            entry["trainable_params"] = params.pop()
            entry["adapter_bytes"] = max(adapter)
            names = sorted(set.intersection(*(set(r["metrics"]) for _, r in runs)))
            entry["metrics"] = {}
            for name in names:
                mean, std = mean_std([r["metrics"][name] for _, r in runs])
                entry["metrics"][name] = {"mean": mean, "std": std, "values": [r["metrics"][name] for _, r in runs]}
            entry["wall_time_s"] = statistics.fmean(r["wall_time_s"] for _, r in runs)
        settings[s.name] = entry
    return settings


def _scale(study: Study, metric: str) -> float:
    return 100.0 if metric in PERCENT_METRICS.get(study.dataset, ()) else 1.0


def format_mean_std(study: Study, metric: str, stats: dict | None) -> str:
    """"53.21 ± 0.40" on the paper's scale (E2E BLEU, METEOR, ROUGE-L in percent); "-" when absent."""
    if not stats:
        return "-"
    scale = _scale(study, metric)
    digits = 2 if scale == 100.0 else 3
    mean = f"{scale * stats['mean']:.{digits}f}"
    return mean if stats["std"] is None else f"{mean} ± {scale * stats['std']:.{digits}f}"


def _signed(x: float) -> str:
    return f"{round(x, 2) + 0.0:+.2f}"  # + 0.0 turns a rounded -0.0 into 0.0


def answer_claim(study: Study, settings: dict) -> str | None:
    """One sentence with numbers for each of the issue's two questions, or None when the data are not all there."""
    claim = study.claim
    if not claim:
        return None
    ref, comp, one = (settings.get(claim[k]) for k in ("reference", "compressed", "rank_one"))
    if not all(e and "metrics" in e for e in (ref, comp, one)):
        return None
    margin = float(claim.get("margin_bleu", 1.0))
    scale = _scale(study, "BLEU")

    def bleu(e: dict) -> str:
        return format_mean_std(study, "BLEU", e["metrics"]["BLEU"])

    def delta(a: dict, b: dict) -> float:
        return scale * (a["metrics"]["BLEU"]["mean"] - b["metrics"]["BLEU"]["mean"])

    d1 = delta(comp, ref)
    ratio = ref["trainable_params"] / comp["trainable_params"]
    verdict1 = "yes" if d1 >= -margin else "no"
    first = (f"NOLA at 1/{ratio:.0f} of {ref['label']}'s parameters: {verdict1}, it is "
             f"{'within' if d1 >= -margin else 'not within'} {margin:g} BLEU ({comp['label']}, "
             f"{comp['trainable_params']:,} parameters, {bleu(comp)} BLEU vs {ref['label']}, "
             f"{ref['trainable_params']:,}, {bleu(ref)}; difference {_signed(d1)})")
    below = sorted((e for e in settings.values() if e.get("method") == "nola" and "metrics" in e
                    and e["trainable_params"] < one["trainable_params"]), key=lambda e: -e["trainable_params"])
    if not below:
        return first + f"; no NOLA setting has fewer parameters than {one['label']}."
    parts = [f"{e['label']} ({e['trainable_params']:,}) {bleu(e)} ({_signed(delta(e, one))})"
             for e in below]
    matching = [e for e in below if delta(e, one) >= -margin]
    if not matching:
        verdict2 = "no"
    elif len(matching) == len(below):
        verdict2 = "yes"
    else:
        verdict2 = (f"yes for {', '.join(e['label'] for e in matching)}, not for "
                    f"{', '.join(e['label'] for e in below if e not in matching)}")
    second = (f"NOLA below {one['label']}'s {one['trainable_params']:,} parameters matching it (within {margin:g} "
              f"BLEU of its {bleu(one)}): {verdict2} ({'; '.join(parts)}).")
    return f"{first}; {second}"


def report_markdown(study: Study, settings: dict, meta: dict) -> str:
    """results.md: setup, the claim's answer, per-setting table (mean ± std over seeds), rate selection, paper rows."""
    metrics = TABLE_COLUMNS.get(study.dataset, ["BLEU"])
    order = sorted(study.settings, key=lambda s: -settings[s.name].get("trainable_params", 0))
    rows = []
    for s in order:
        e = settings[s.name]
        row = {"Setting": s.label, "Trainable params": f"{e['trainable_params']:,}" if "trainable_params" in e else "-",
               "Adapter bytes": f"{e['adapter_bytes']:,}" if "adapter_bytes" in e else "-",
               "LR": f"{e['learning_rate']:g}", "Seeds": len(e["seeds"])}
        for m in metrics:
            row[m] = format_mean_std(study, m, e.get("metrics", {}).get(m))
        rows.append(row)
    columns = ["Setting", "Trainable params", "Adapter bytes", "LR", "Seeds", *metrics]
    headers = [c.replace("METEOR", "MET").replace("ROUGE_L", "ROUGE-L") for c in columns]
    selection_rows = []
    for s in study.settings:
        e = settings[s.name]
        cells = ", ".join(f"{lr}: {_scale(study, study.selection_metric) * v:.2f}" for lr, v in e["validation"].items())
        edge = " (still at the edge of the grid: widen it)" if e.get("at_grid_edge") else ""
        selection_rows.append({"Setting": s.label, "Validation " + study.selection_metric: cells,
                               "Chosen LR": f"{e['learning_rate']:g}{edge}"})
    c = study.common
    model = c.get("model_name_or_path") or f"random-init {(c.get('model_config') or {}).get('model_type', '?')}"
    lines = [
        "# Compression study: NOLA vs LoRA on E2E",
        "",
        f"Generated by `scripts/compression_study.py --study {meta['study_file']}` on {meta['generated']}.",
        f"Model `{model}`, dataset {study.dataset}, target modules "
        f"{', '.join(c.get('target_modules', []))}; every run: {c.get('max_steps')} steps of batch "
        f"{c.get('per_device_train_batch_size')} on {c.get('max_train_pairs')} training pairs, decoding with "
        f"{c.get('num_beams')} beam(s), at most {c.get('max_new_tokens')} new tokens, on the first "
        f"{c.get('max_test_inputs')} test inputs. Seeds: {', '.join(map(str, study.seeds))} (config keys "
        f"{', '.join(study.seed_keys)}). Mean ± sample std over seeds; BLEU, METEOR and ROUGE-L in percent.",
        "",
        meta.get("run_time", ""),
        "",
        "## Answer",
        "",
        meta.get("claim") or "Not all settings of the claim have test runs yet.",
        "",
        "## Test split",
        "",
        markdown_table(rows, columns, headers).rstrip(),
        "",
        "![BLEU against trainable parameters](bleu_vs_params.png)",
        "",
        f"## Learning rate, chosen on the validation split ({study.validation_file}, first "
        f"{study.max_validation_inputs or 'all'} inputs, seeds {', '.join(map(str, study.selection_seeds))})",
        "",
        markdown_table(selection_rows, list(selection_rows[0])).rstrip(),
        "",
    ]
    ref = study.paper_reference
    if ref:
        paper_rows = [{"Row": p["label"], "Trainable params": f"{int(p['trainable_params']):,}",
                       "BLEU": f"{float(p['BLEU']):.1f}"} for p in ref.get("points", [])]
        lines += ["## Paper reference (drawn in the plot, not comparable in absolute BLEU)", "",
                  f"Source: {ref.get('source', '?')}. GPT-2 L, full E2E training, beam search.", "",
                  markdown_table(paper_rows, ["Row", "Trainable params", "BLEU"]).rstrip(), ""]
    return "\n".join(lines) + "\n"


def plot(study: Study, settings: dict, path: Path) -> None:
    """BLEU against trainable parameters (log x), mean with sample-std error bars; the paper's points in a panel
    beside (same x axis, their own y axis: another model, decoding and training length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = _scale(study, "BLEU")
    points = (study.paper_reference or {}).get("points", [])
    fig, axes = plt.subplots(1, 2 if points else 1, figsize=(11 if points else 6.5, 4.6), sharex=True, squeeze=False)
    ax = axes[0][0]
    styles = {"lora": ("s", "tab:blue", "LoRA"), "nola": ("o", "tab:red", "NOLA")}
    for method, (marker, color, name) in styles.items():
        for per_layer in (False, True):
            pts = sorted((e["trainable_params"], scale * e["metrics"]["BLEU"]["mean"],
                          scale * (e["metrics"]["BLEU"]["std"] or 0.0), e["label"])
                         for e in settings.values() if e.get("method") == method and "metrics" in e
                         and str(e.get("basis_mode") or "").startswith("per_layer") == per_layer)
            if not pts:
                continue
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker=marker,
                        color=color, linestyle="none" if per_layer else "-", capsize=3,
                        markerfacecolor="white" if per_layer else color,
                        label=f"{name}{' (per-layer basis)' if per_layer else ''}")
            for x, y, _, label in pts:
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, -10), fontsize=7)
    ax.set_title(f"this study: {study.common.get('model_name_or_path') or 'random-init model'} "
                 f"(mean ± std, {len(study.seeds)} seeds)", fontsize=9)
    if points:
        paper = axes[0][1]
        for p in points:
            marker, color, _ = styles.get(p.get("method"), ("^", "gray", ""))
            paper.scatter([p["trainable_params"]], [p["BLEU"]], marker=marker, color=color, s=50, label=p["label"])
            paper.annotate(p["label"], (p["trainable_params"], p["BLEU"]), textcoords="offset points",
                           xytext=(5, -10), fontsize=7)
        # The same BLEU span as the left panel, so gaps read alike on both; the source is named in results.md.
        low, high = ax.get_ylim()
        span = max(high - low, 2.0)  # at least 2 BLEU points, so near-equal scores do not fill the panel
        ax.set_ylim((low + high - span) / 2, (low + high + span) / 2)
        middle = statistics.fmean(float(p["BLEU"]) for p in points)
        paper.set_ylim(middle - span / 2, middle + span / 2)
        paper.set_title("for reference: the paper's points (same y span; source in results.md)", fontsize=9)
    for a in axes[0]:
        a.set_xscale("log")
        a.set_xlabel("trainable parameters (log scale)")
        a.set_ylabel("BLEU (test)")
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
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
    study = load_study(args.study, args.output_dir, seeds)
    study.output_dir.mkdir(parents=True, exist_ok=True)
    log: list[dict] = []

    def finished(runs: list[Run]) -> dict[Run, dict | None]:
        return {run: finished_results(study, run) for run in runs}

    if args.dry_run:
        selection, selection_info = select_learning_rates(study, finished)
        if selection_info is None:
            todo = [r for r, res in selection.items() if res is None]
            print(f"{len(todo)} of {len(selection)} selection runs to do (more if a best rate is at the edge of its "
                  f"grid), then {len(study.settings)} x {len(study.seeds)} test runs at the chosen rates (finished "
                  f"ones are kept)")
        else:
            tests = test_runs(study, {k: v["learning_rate"] for k, v in selection_info.items()})
            todo = [r for r in tests if finished_results(study, r) is None]
            print(f"selection finished; {len(todo)} of {len(tests)} test runs to do")
        for r in todo:
            print("  ", r.relative_dir)
        return {"todo": [r.relative_dir for r in todo]}

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
    settings = aggregate(study, selection_info, tests)

    meta = {"study_file": os.path.relpath(study.source, Path.cwd()),
            "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    meta["claim"] = answer_claim(study, settings)
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
    _write_atomic(study.output_dir / "study.json", json.dumps(summary, indent=2) + "\n")
    _write_atomic(study.output_dir / "results.md", report_markdown(study, settings, meta))
    if any("metrics" in e for e in settings.values()):
        plot(study, settings, study.output_dir / "bleu_vs_params.png")
    ran = [entry for entry in log if entry["action"] == "ran"]
    print(f"[study] {len(ran)} run(s) done now, {len(log) - len(ran)} kept; report: {study.output_dir / 'results.md'}")
    if meta["claim"]:
        print(meta["claim"])
    return dict(summary, log=log)


if __name__ == "__main__":
    run_cli(main)
