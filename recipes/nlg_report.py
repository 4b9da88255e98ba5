"""NLG ``results.json`` files gathered into the paper's tables (Markdown) and a parameters-vs-BLEU plot (PNG).

Used by ``scripts/report.py`` (many runs) and by ``recipes.nlg`` itself for a comparison (``compare:``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from recipes.nlg import DATASET_TITLES, paper_markdown, paper_row, printed_metrics


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
            results.append({**run, "base_metrics": data.get("base_metrics", {}), "_path": str(f)})
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
                                       trainable_params=None), dataset))
        rows.extend(paper_row(r, dataset) for r in runs)
        parts.append(f"### {DATASET_TITLES.get(dataset, dataset)}: {model}\n\n{paper_markdown(rows, dataset)}")
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
