"""NLG ``results.json`` files gathered into the paper's tables (Markdown) and a parameters-vs-BLEU plot (PNG).

Used by ``scripts/report.py`` (many runs) and by ``recipes.nlg`` itself for a comparison (``compare:``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from recipes.methods import METHOD_NAMES
from recipes.models import hub_id
from recipes.prediction_checks import degenerate_note, marked_label
from recipes.results import markdown_table


DATASET_TITLES = {"e2e": "E2E NLG", "dart": "DART", "webnlg": "WebNLG 2017"}
TABLE_COLUMNS = {
    "e2e": ["BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"],
    "dart": ["BLEU", "METEOR", "TER"],
    "webnlg": ["BLEU_U", "BLEU_S", "BLEU", "METEOR_U", "METEOR_S", "METEOR", "TER_U", "TER_S", "TER"],
}
# Metrics the paper prints x100 (E2E: BLEU 70.4, MET 46.8, ROUGE-L 71.8); the rest print on the scorer's scale
# (NIST 8.85, CIDEr 2.53; DART/WebNLG BLEU is already 0..100, METEOR and TER print as .46).
PERCENT_METRICS = {"e2e": ("BLEU", "METEOR", "ROUGE_L"), "dart": (), "webnlg": ()}


METRIC_SCALES = {
    dataset: {"metrics": "as the official scorer prints them" + (
                  " (e2e-metrics measure_scores.py: BLEU, METEOR, ROUGE_L in 0..1)" if dataset == "e2e" else ""),
              "printed_metrics": "as results.md and the paper print them" + (
                  " (BLEU, METEOR, ROUGE_L in percent: 0.538 -> 53.8)" if dataset == "e2e" else " (the same)")}
    for dataset in TABLE_COLUMNS
}


def printed_metrics(metrics: dict[str, float], dataset: str) -> dict[str, float]:
    """``metrics`` on the scale the tables print: x100 for the metrics the paper gives in percent (E2E BLEU 0.704 ->
    70.4), the others as they are."""
    def percent(name: str) -> bool:
        return (name[:-2] if name.endswith(("_S", "_U")) else name) in PERCENT_METRICS[dataset]

    return {name: round(100 * value if percent(name) else value, 4) for name, value in metrics.items()}


def row_label(cfg) -> str:
    if cfg.row_label:
        return cfg.row_label
    targets = set(cfg.target_modules)
    where = "MLP" if targets & {"c_fc", "mlp.c_proj", "up_proj", "down_proj", "gate_proj"} else "QV"
    if cfg.method == "full":
        return METHOD_NAMES["full"]
    if cfg.method == "lora":
        return f"{METHOD_NAMES['lora']} (r={cfg.r})"
    return f"{METHOD_NAMES[cfg.method]} ({where})"


def format_params(n: int | None) -> str:
    """Trainable parameters the way the paper prints them (e.g. 0.096M)."""
    return "-" if n is None else f"{n / 1e6:.3f}M"


def paper_row(results: dict, dataset: str) -> dict:
    """One table row as the paper prints it: label, parameter count, and metric strings (E2E "70.4" for BLEU, METEOR
    and ROUGE-L in percent with one decimal; NIST "8.85", CIDEr, DART/WebNLG BLEU, METEOR and TER with two). A run
    whose ``prediction_check`` found degenerate outputs (empty, all identical) is marked after its label."""
    row = {"Method": marked_label(results["row_label"], results.get("prediction_check")), "# Trainable Parameters": format_params(results["trainable_params"])}
    printed = printed_metrics(results["metrics"], dataset)
    for name in TABLE_COLUMNS[dataset]:
        value = printed.get(name)
        base_name = name[:-2] if name.endswith(("_S", "_U")) else name
        if value is None:
            row[name] = None
        elif base_name in PERCENT_METRICS[dataset]:
            row[name] = f"{value:.1f}"
        else:
            row[name] = f"{value:.2f}"
    return row


def paper_markdown(rows: Sequence[dict], dataset: str) -> str:
    columns = ["Method", "# Trainable Parameters", *TABLE_COLUMNS[dataset]]
    headers = [c.replace("METEOR", "MET").replace("ROUGE_L", "ROUGE-L") for c in columns]
    return markdown_table(rows, columns, headers)


def model_title(cfg) -> str:
    if cfg.model_config is not None:
        return f"random-init {cfg.model_config.get('model_type', '?')}"
    name = hub_id(cfg)
    return f"{name.split('/')[-1]} ({cfg.model_name_or_path})" if name else str(cfg.model_name_or_path)


def heading_short(cfg, results: dict) -> str:
    """One line: dataset, model, steps, test inputs."""
    return (f"{DATASET_TITLES.get(cfg.dataset, cfg.dataset)}, {model_title(cfg)}: {results['train_steps']} steps, "
            f"{results['test_inputs']} test inputs")


def run_heading(cfg, results: dict) -> str:
    """What a table's numbers come from: model, data, steps, test inputs, decoding (and the config's table_note)."""
    decoding = "greedy decoding" if cfg.num_beams == 1 else f"beam {cfg.num_beams}"
    text = (f"**{DATASET_TITLES.get(cfg.dataset, cfg.dataset)}, {model_title(cfg)}**: {results['train_steps']} "
            f"training steps of batch {cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps} "
            f"({results['train_pairs']} training pairs); {results['test_inputs']} test inputs "
            f"({results['test_references']} references), {decoding} of up to {cfg.max_new_tokens} new tokens.")
    return f"{text} {cfg.table_note}" if cfg.table_note else text


def comparison_markdown(results: dict) -> str:
    """The comparison table: the un-adapted model, then each run, with parameters, adapter bytes, the paper's metrics
    and train / decode seconds."""
    dataset = results["dataset"]
    metric_columns = TABLE_COLUMNS[dataset]
    rows = []
    if results["base_metrics"]:
        base = {"row_label": "Base model (no training)", "trainable_params": None, "metrics": results["base_metrics"],
                "prediction_check": results.get("base_prediction_check")}
        rows.append({**paper_row(base, dataset), "Adapter bytes": None, "Train (s)": None,
                     "Decode (s)": results["base_decode_time_s"]})
    for run in results["runs"]:
        rows.append({**paper_row(run, dataset), "# Trainable Parameters": f"{run['trainable_params']:,}",
                     "Adapter bytes": f"{run['adapter_bytes']:,}", "Train (s)": f"{run['train_time_s']:.0f}",
                     "Decode (s)": f"{run['decode_time_s']:.0f}"})
    for row in rows:
        if isinstance(row["Decode (s)"], float):
            row["Decode (s)"] = f"{row['Decode (s)']:.0f}"
    columns = ["Method", "# Trainable Parameters", "Adapter bytes", *metric_columns, "Train (s)", "Decode (s)"]
    headers = [c.replace("METEOR", "MET").replace("ROUGE_L", "ROUGE-L") for c in columns]
    return markdown_table(rows, columns, headers)



def find_results(paths: list[str]) -> list[dict]:
    """Every NLG run under the given folders (recursively) or files, with its path recorded; a comparison's
    ``results.json`` contributes each of its runs (with the comparison's base-model scores)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files.extend(sorted(p.rglob("results.json")))
        else:
            raise FileNotFoundError(f"{p} does not exist")
    results = []
    for f in files:
        data = json.loads(f.read_text())
        if data.get("recipe") != "nlg":
            continue
        for run in data.get("runs", [data]):
            results.append({**run, "base_metrics": data.get("base_metrics", {}),
                            "base_prediction_check": data.get("base_prediction_check"), "_path": str(f)})
    return results


def _model_name(result: dict) -> str:
    return result.get("model") or result["config"].get("model_name_or_path", "?")


def tables_markdown(results: list[dict]) -> str:
    """One Markdown table per (dataset, model), rows in increasing trainable parameters; a base-model row first when
    some run measured it."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in results:
        groups[(r["dataset"], _model_name(r))].append(r)
    parts = []
    for (dataset, model), runs in sorted(groups.items()):
        runs.sort(key=lambda r: (r["trainable_params"], r["row_label"]))
        rows = []
        base = next((r for r in runs if r.get("base_metrics")), None)
        if base is not None:
            rows.append(paper_row(dict(base, metrics=base["base_metrics"], row_label="Base model (no training)",
                                       trainable_params=None, prediction_check=base.get("base_prediction_check")),
                                  dataset))
        rows.extend(paper_row(r, dataset) for r in runs)
        checks = {"Base model (no training)": base.get("base_prediction_check")} if base is not None else {}
        checks.update({r["row_label"]: r.get("prediction_check") for r in runs})
        note = degenerate_note(checks)
        parts.append(f"### {DATASET_TITLES.get(dataset, dataset)}: {model}\n\n{paper_markdown(rows, dataset)}"
                     + (f"\n{note}\n" if note else ""))
    return "\n".join(parts)


def plot_params_vs_bleu(results: list[dict], path: Path, title: str | None = None) -> None:
    """Trainable parameters (log x) vs BLEU as the tables print it, NOLA and LoRA as separate series, one panel per
    dataset; the un-adapted model's BLEU, where measured, as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    datasets = sorted({r["dataset"] for r in results})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.2), squeeze=False)
    styles = {"nola": ("o", "tab:red", "NOLA"), "lora": ("s", "tab:blue", "LoRA"), "nora": ("^", "tab:green", "NoRA"),
              "full": ("x", "black", "Full FT")}
    for ax, dataset in zip(axes[0], datasets):
        in_panel = [r for r in results if r["dataset"] == dataset and "BLEU" in r["metrics"]]

        def bleu(r: dict, key: str = "metrics") -> float:
            return printed_metrics(r[key], dataset)["BLEU"]

        for method, (marker, color, label) in styles.items():
            runs = [r for r in in_panel if r["method"] == method]
            for model in sorted({_model_name(r) for r in runs}):
                mine = [r for r in runs if _model_name(r) == model]
                pts = sorted((r["trainable_params"], bleu(r)) for r in mine)
                ax.plot([p for p, _ in pts], [b for _, b in pts], marker=marker, color=color, linestyle="-",
                        label=f"{label} ({Path(model).name})")
                for r in mine:
                    ax.annotate(f"{r['row_label']}: {bleu(r):.1f}", (r["trainable_params"], bleu(r)),
                                textcoords="offset points", xytext=(4, 4), fontsize=7)
        with_base = [r for r in in_panel if "BLEU" in (r.get("base_metrics") or {})]
        if with_base:
            ax.axhline(bleu(with_base[0], "base_metrics"), color="gray", linestyle="--",
                       label=f"base model, no training: {bleu(with_base[0], 'base_metrics'):.1f}")
        ax.set_xscale("log")
        ax.margins(x=0.35)  # room for the point labels at the ends
        # Plain parameter counts at the points themselves; a narrow log range otherwise gets crowded 10^x labels.
        counts = sorted({r["trainable_params"] for r in in_panel if r["trainable_params"]})
        if counts:
            ax.set_xticks(counts, [f"{c:,}" for c in counts], fontsize=8)
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("BLEU")
        ax.set_title(title or DATASET_TITLES.get(dataset, dataset), fontsize=9 if title else None)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
