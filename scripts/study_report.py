"""The compression study's paired report: per-seed BLEU differences of each compared setting from each reference
setting, their 95% intervals (``study_stats``), the answer sentence, the table of an earlier round kept as history,
and the plot (BLEU against parameters beside the paired differences, with no overlapping text).

Reads only what the study's record holds: each test run's results.json (passed in) and predictions.jsonl, and the
study's test_references.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import study_stats
from recipes.common import RecipeError


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


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


def _signed(x: float) -> str:
    return f"{round(x, 2) + 0.0:+.2f}"  # + 0.0 turns a rounded -0.0 into 0.0


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
    return (f"Is NOLA within ±{margin:g} BLEU of LoRA? Paired differences over {len(seeds)} seed(s) "
            f"({', '.join(map(str, seeds))}; per seed every setting saw the same training order and the same "
            f"{comparisons[0]['test_inputs']} test inputs), with 95% intervals by paired t over seeds and by a paired "
            f"bootstrap over test inputs: " + "; ".join(parts) + ".")


def paired_markdown(comparisons: Sequence[dict], markdown_table) -> str:
    rows = [{"Compared": c["compared_label"], "Reference": c["reference_label"],
             "Per-seed differences": ", ".join(_signed(d) for d in c["differences"]),
             "Mean": _signed(c["mean"]), "95% CI, paired t (seeds)": _interval(c["t_interval"]),
             "95% CI, bootstrap (test inputs)": _interval(c["bootstrap_interval"]), "Verdict": c["verdict"]}
            for c in comparisons]
    return markdown_table(rows, list(rows[0])).rstrip() if rows else "No paired test runs yet."


def history_markdown(history: dict, path: Path, markdown_table) -> str:
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
