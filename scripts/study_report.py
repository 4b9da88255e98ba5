"""The compression study's report: per-setting aggregates over seeds, results.md, the plots, the claim's answer;
for a paired claim the per-seed BLEU differences of each compared setting from each reference setting with their
95% intervals (``study_stats``), the table of an earlier round kept as history, and a plot (BLEU against parameters
beside the paired differences) whose texts do not overlap.

Reads only what it is given and what the study's record holds: each test run's results.json (passed in) and
predictions.jsonl, and the study's test_references.jsonl.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import study_stats
from recipes.cli import RecipeError
from recipes.results import markdown_table
from recipes.nlg_report import PERCENT_METRICS, TABLE_COLUMNS

if TYPE_CHECKING:
    from compression_study import Run, Study


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


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


def metric_scale(study: Study, metric: str) -> float:
    return 100.0 if metric in PERCENT_METRICS.get(study.dataset, ()) else 1.0


def format_mean_std(study: Study, metric: str, stats: dict | None) -> str:
    """"53.21 ± 0.40" on the paper's scale (E2E BLEU, METEOR, ROUGE-L in percent); "-" when absent."""
    if not stats:
        return "-"
    scale = metric_scale(study, metric)
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
    scale = metric_scale(study, "BLEU")

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


def report_markdown(study: Study, settings: dict, meta: dict, cfg) -> str:
    """results.md: setup (from ``cfg``, a test run's NLGConfig), the claim's answer, the paired differences, the
    per-setting table (mean ± std over seeds), rate selection, paper rows, history."""
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
        cells = ", ".join(f"{lr}: {metric_scale(study, study.selection_metric) * v:.2f}"
                          for lr, v in e["validation"].items()) or "fixed rate (a one-rate grid: no selection)"
        edge = " (still at the edge of the grid: widen it)" if e.get("at_grid_edge") else ""
        selection_rows.append({"Setting": s.label, "Validation " + study.selection_metric: cells,
                               "Chosen LR": f"{e['learning_rate']:g}{edge}"})
    model = (cfg.model_name_or_path if cfg.model_config is None
             else f"random-init {cfg.model_config.get('model_type', '?')}")
    steps = f"{cfg.max_steps} steps" if cfg.max_steps > 0 else f"{cfg.num_train_epochs:g} epoch(s)"
    decoding = ("greedy decoding" if cfg.num_beams == 1 else
                f"beam search ({cfg.num_beams} beams, length penalty {cfg.length_penalty:g})")
    lines = [
        "# Compression study: NOLA vs LoRA on E2E",
        "",
        f"Generated by `scripts/compression_study.py --study {meta['study_file']}` on {meta['generated']}.",
        f"Model `{model}`, dataset {study.dataset}, target modules {', '.join(cfg.target_modules)}; every run: "
        f"{steps} of batch {cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps} on "
        f"{cfg.max_train_pairs or 'all'} training pairs ({cfg.lr_scheduler_type} schedule, {cfg.warmup_steps} warmup "
        f"steps, label smoothing {cfg.label_smoothing:g}), {decoding}, no repeated {cfg.no_repeat_ngram_size}-grams, "
        f"at most {cfg.max_new_tokens} new tokens, on the first {cfg.max_test_inputs or 'all'} test inputs. Seeds: "
        f"{', '.join(map(str, study.seeds))} (config keys {', '.join(study.seed_keys)}). Mean ± sample std over "
        f"seeds; BLEU, METEOR and ROUGE-L in percent.",
        "",
        meta.get("run_time", ""),
        "",
        "## Answer",
        "",
        meta.get("claim") or "Not all settings of the claim have test runs yet.",
        "",
        *([f"## Paired differences (BLEU points, compared − reference; {meta['paired_note']})", "",
           meta["paired"], ""] if meta.get("paired") else []),
        "## Test split",
        "",
        markdown_table(rows, columns, headers).rstrip(),
        "",
        "![BLEU against trainable parameters](bleu_vs_params.png)",
        "",
        f"## Learning rate, chosen on the validation split ({study.validation_file}, first "
        f"{study.max_validation_inputs or 'all'} inputs, seeds {', '.join(map(str, study.selection_seeds))})",
        "",
        markdown_table(selection_rows, list(selection_rows[0])).rstrip() if selection_rows else "No rates chosen.",
        "",
    ]
    ref = study.paper_reference
    if ref:
        paper_rows = [{"Row": p["label"], "Trainable params": f"{int(p['trainable_params']):,}",
                       "BLEU": f"{float(p['BLEU']):.1f}"} for p in ref.get("points", [])]
        lines += ["## Paper reference (drawn in the plot, not comparable in absolute BLEU)", "",
                  f"Source: {ref.get('source', '?')}. GPT-2 L, full E2E training, beam search.", "",
                  markdown_table(paper_rows, ["Row", "Trainable params", "BLEU"]).rstrip(), ""]
    if meta.get("history"):
        lines += [meta["history"]]
    return "\n".join(lines) + "\n"


def plot(study: Study, settings: dict, path: Path) -> None:
    """BLEU against trainable parameters (log x), mean with sample-std error bars; the paper's points in a panel
    beside (same x axis, their own y axis: another model, decoding and training length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = metric_scale(study, "BLEU")
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


# --------------------------------------------------------------------------------------------------------------------
# Paired claim (a study with claim.compared and a record_dir)
# --------------------------------------------------------------------------------------------------------------------


def bleu_statistics_of_run(record_dir: Path, relative_dir: str, results: dict,
                           references: list[dict]) -> Any:
    """The run's per-input BLEU statistics, checked: its predictions are for the study's test inputs in the study's
    order, and their corpus BLEU is the BLEU the run reported (so the bootstrap resamples what was scored)."""
    predictions = read_jsonl(record_dir / relative_dir / "predictions.jsonl")
    if [p["source"] for p in predictions] != [r["source"] for r in references]:
        raise RecipeError(f"{relative_dir}: its predictions are not for the study's test inputs in the study's order "
                          f"({record_dir / 'test_references.jsonl'}); the comparison would not be paired")
    stats = study_stats.bleu_statistics([r["references"] for r in references], [p["prediction"] for p in predictions])
    bleu = float(study_stats.bleu_from_statistics(stats.sum(axis=0)))
    if abs(bleu - results["metrics"]["BLEU"]) > 1e-9:
        raise RecipeError(f"{relative_dir}: BLEU recomputed from predictions.jsonl is {bleu!r}, the run reported "
                          f"{results['metrics']['BLEU']!r}; the record is inconsistent (rerun the run)")
    return stats


def paired_comparisons(claim: dict, labels: dict[str, str], params: dict[str, int], seeds: Sequence[int],
                       tests: dict[tuple[str, int], tuple[str, dict]], record_dir: Path) -> list[dict]:
    """One entry per (compared, reference) pair of ``claim`` with test runs on common seeds: the per-seed BLEU
    differences (points), their mean, the paired-t interval over seeds (None with one seed), the paired bootstrap
    interval over test inputs, and the verdict against ``claim['margin_bleu']``.

    ``tests[(setting, seed)]`` = (run folder relative to ``record_dir``, that run's results)."""
    margin = float(claim.get("margin_bleu", 1.0))
    resamples = int(claim.get("bootstrap_resamples", 2000))
    references = read_jsonl(record_dir / "test_references.jsonl") if tests else []
    cache: dict[tuple[str, int], Any] = {}

    def stats(setting: str, seed: int):
        if (setting, seed) not in cache:
            rel, results = tests[setting, seed]
            cache[setting, seed] = bleu_statistics_of_run(record_dir, rel, results, references)
        return cache[setting, seed]

    out = []
    for ref in claim["references"]:
        for comp in claim["compared"]:
            common = [s for s in seeds if (ref, s) in tests and (comp, s) in tests]
            if not common:
                continue
            diffs = [100.0 * (tests[comp, s][1]["metrics"]["BLEU"] - tests[ref, s][1]["metrics"]["BLEU"])
                     for s in common]
            t_interval = study_stats.paired_t_interval(diffs)[1:] if len(common) > 1 else None
            mean, low, high = study_stats.paired_bootstrap_interval(
                [stats(comp, s) for s in common], [stats(ref, s) for s in common], resamples,
                int(claim.get("bootstrap_seed", 0)))
            intervals = [i for i in (t_interval, (low, high)) if i is not None]
            out.append({"compared": comp, "reference": ref, "compared_label": labels[comp],
                        "reference_label": labels[ref], "compared_params": params.get(comp),
                        "reference_params": params.get(ref), "seeds": common, "differences": diffs,
                        "mean": mean, "t_interval": list(t_interval) if t_interval else None,
                        "bootstrap_interval": [low, high], "bootstrap_resamples": resamples,
                        "test_inputs": len(references), "verdict": study_stats.verdict(intervals, margin)})
    return out


def _interval(interval: Sequence[float] | None) -> str:
    return "-" if interval is None else f"[{_signed(interval[0])}, {_signed(interval[1])}]"


def paired_answer(comparisons: Sequence[dict], margin: float) -> str | None:
    """The one-sentence answer: per comparison, the mean difference, both intervals and whether they lie within
    ±margin BLEU."""
    if not comparisons:
        return None
    seeds = sorted({s for c in comparisons for s in c["seeds"]})
    parts = [f"{c['compared_label']} ({c['compared_params']:,} parameters) − {c['reference_label']} "
             f"({c['reference_params']:,}): {_signed(c['mean'])} BLEU (t {_interval(c['t_interval'])}, bootstrap "
             f"{_interval(c['bootstrap_interval'])}), {c['verdict']}" for c in comparisons]
    return (f"NOLA within ±{margin:g} BLEU of LoRA, by paired BLEU differences over {len(seeds)} seed(s) "
            f"({', '.join(map(str, seeds))}; per seed every setting saw the same training order and the same "
            f"{comparisons[0]['test_inputs']} test inputs), with 95% intervals by paired t over seeds and by a paired "
            f"bootstrap over test inputs: " + "; ".join(parts) + ".")


def paired_markdown(comparisons: Sequence[dict]) -> str:
    rows = [{"Compared": c["compared_label"], "Reference": c["reference_label"],
             "Per-seed differences": ", ".join(_signed(d) for d in c["differences"]),
             "Mean": _signed(c["mean"]), "95% CI, paired t (seeds)": _interval(c["t_interval"]),
             "95% CI, bootstrap (test inputs)": _interval(c["bootstrap_interval"]), "Verdict": c["verdict"]}
            for c in comparisons]
    return markdown_table(rows, list(rows[0])).rstrip() if rows else "No paired test runs yet."


def history_markdown(history: dict, path: Path) -> str:
    """An earlier round's per-setting test table (from its study.json at ``path``), with a link to its report."""
    earlier = json.loads(path.read_text())
    rows = []
    for entry in sorted(earlier["settings"].values(), key=lambda e: -e.get("trainable_params", 0)):
        bleu = entry.get("metrics", {}).get("BLEU")
        if not bleu:
            continue
        std = f" ± {100 * bleu['std']:.2f}" if bleu.get("std") is not None else ""
        rows.append({"Setting": entry["label"], "Trainable params": f"{entry['trainable_params']:,}",
                     "LR": f"{entry['learning_rate']:g}", "Seeds": len(entry["seeds"]),
                     "BLEU": f"{100 * bleu['mean']:.2f}{std}"})
    lines = [f"## History: {history.get('title', 'an earlier round')}", ""]
    if history.get("note"):
        lines += [history["note"], ""]
    if history.get("report"):
        lines += [f"Full report: [{history['report']}]({history['report']}).", ""]
    lines += [markdown_table(rows, ["Setting", "Trainable params", "LR", "Seeds", "BLEU"]).rstrip(), ""]
    return "\n".join(lines)


def text_overlaps(fig) -> list[tuple[str, str]]:
    """Pairs of drawn texts of ``fig`` (titles, axis labels, the tick labels drawn, legend entries, legend frames
    against every text outside them) whose boxes on the canvas intersect."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts, frames = list(fig.texts), []
    for ax in fig.axes:
        texts += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        for axis in (ax.xaxis, ax.yaxis):
            texts += [tick.label1 for tick in axis._update_ticks()]  # the ticks inside the view, as drawn
        legend = ax.get_legend()
        if legend is not None:
            texts += legend.get_texts()
            frames.append((legend, legend.get_window_extent(renderer)))
    boxes = [(t, t.get_window_extent(renderer)) for t in texts if t.get_visible() and t.get_text().strip()]
    clashes = [(a.get_text(), b.get_text()) for i, (a, box_a) in enumerate(boxes) for b, box_b in boxes[i + 1:]
               if box_a.overlaps(box_b)]
    for legend, frame in frames:
        own = set(map(id, legend.get_texts()))
        clashes += [("legend", t.get_text()) for t, box in boxes if id(t) not in own and frame.overlaps(box)]
    return clashes


def plot_paired(settings: dict, comparisons: Sequence[dict], margin: float, title: str, path: Path):
    """Left: test BLEU (mean ± sample std over seeds) against trainable parameters, one legend entry per setting (no
    labels beside the points, so none can overlap; settings with the same count are nudged apart on the log axis).
    Right: each paired difference with its two 95% intervals, the ±margin band shaded. Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, len(comparisons))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, max(4.8, 1.6 + 0.42 * rows)),
                                      gridspec_kw={"width_ratios": [1, 1.15]})
    markers = {"lora": ["s", "D", "P"], "nola": ["o", "^", "v", "<", ">"]}
    used: dict[int, int] = {}
    drawn = {"lora": 0, "nola": 0}
    for name, e in sorted(settings.items(), key=lambda kv: -kv[1].get("trainable_params", 0)):
        if "metrics" not in e:
            continue
        method = "lora" if e.get("method") == "lora" else "nola"
        x = e["trainable_params"]
        nth = used.get(x, 0)
        used[x] = nth + 1
        x_drawn = x * (1.12 ** nth)  # the same count drawn beside, not on top
        bleu = e["metrics"]["BLEU"]
        left.errorbar([x_drawn], [100 * bleu["mean"]], yerr=[100 * (bleu["std"] or 0.0)], capsize=3,
                      marker=markers[method][drawn[method] % len(markers[method])],
                      color="tab:blue" if method == "lora" else "tab:red",
                      markerfacecolor="white" if str(e.get("basis_mode") or "").startswith("per_layer") else None,
                      linestyle="none", label=f"{e['label']} ({x:,})")
        drawn[method] += 1
    left.set_xscale("log")
    left.set_xlabel("trainable parameters (log scale)")
    left.set_ylabel("test BLEU (mean ± std over seeds)")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8, loc="best")
    left.set_title(title, fontsize=9)
    for i, c in enumerate(comparisons):
        y = rows - 1 - i
        if c["t_interval"]:
            right.hlines(y + 0.12, *c["t_interval"], color="black", linewidth=3,
                         label="95% CI, paired t over seeds" if i == 0 else None)
        right.hlines(y - 0.12, *c["bootstrap_interval"], color="tab:orange", linewidth=3,
                     label="95% CI, bootstrap over test inputs" if i == 0 else None)
        right.plot([c["mean"]], [y], "o", color="black", markersize=5, label="mean difference" if i == 0 else None)
    right.axvspan(-margin, margin, color="tab:green", alpha=0.12, label=f"±{margin:g} BLEU")
    right.axvline(0.0, color="gray", linewidth=0.8)
    right.set_yticks(range(rows))
    right.set_yticklabels([f"{c['compared_label']} − {c['reference_label']}" for c in reversed(comparisons)]
                          or [""], fontsize=8)
    right.set_ylim(-0.7, rows - 0.3)
    right.set_xlabel("BLEU difference (points), paired by seed")
    right.set_title("paired differences", fontsize=9)
    right.grid(True, axis="x", alpha=0.3)
    if comparisons:
        right.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14 - 0.02 * rows), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig
