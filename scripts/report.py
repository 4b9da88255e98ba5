"""Gather NLG ``results.json`` files into the paper's tables (Markdown) and a parameters-vs-BLEU plot (PNG).

    python scripts/report.py runs/ [more dirs or results.json files] --out reports/nlg

Writes ``OUT/nlg_tables.md`` (one table per dataset and base model, rows sorted by trainable parameters) and
``OUT/params_vs_bleu.png`` (trainable parameters on a log axis against BLEU, NOLA vs LoRA, one panel per dataset).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes.nlg import paper_markdown, paper_row  # noqa: E402

DATASET_TITLES = {"e2e": "E2E NLG", "dart": "DART", "webnlg": "WebNLG 2017"}


def find_results(paths: list[str]) -> list[dict]:
    """Every NLG results.json under the given folders (recursively) or named directly, with its path recorded."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files.extend(sorted(p.rglob("results.json")))
        else:
            raise SystemExit(f"error: {p} does not exist")
    results = []
    for f in files:
        data = json.loads(f.read_text())
        if data.get("recipe") == "nlg":
            data["_path"] = str(f)
            results.append(data)
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


def plot_params_vs_bleu(results: list[dict], path: Path) -> None:
    """Trainable parameters (log x) vs BLEU, NOLA and LoRA as separate series, one panel per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in results})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.2), squeeze=False)
    styles = {"nola": ("o", "tab:red", "NOLA"), "lora": ("s", "tab:blue", "LoRA"), "nora": ("^", "tab:green", "NoRA"),
              "full": ("x", "black", "Full FT")}
    for ax, dataset in zip(axes[0], datasets):
        scale = 100.0 if dataset == "e2e" else 1.0  # E2E BLEU is 0..1, DART/WebNLG BLEU is 0..100
        for method, (marker, color, label) in styles.items():
            runs = [r for r in results if r["dataset"] == dataset and r["method"] == method and "BLEU" in r["metrics"]]
            for model in sorted({_model_name(r) for r in runs}):
                pts = sorted((r["trainable_params"], scale * r["metrics"]["BLEU"]) for r in runs
                             if _model_name(r) == model)
                ax.plot([p for p, _ in pts], [b for _, b in pts], marker=marker, color=color, linestyle="-",
                        label=f"{label} ({Path(model).name})")
                for r in runs:
                    if _model_name(r) == model:
                        ax.annotate(r["row_label"], (r["trainable_params"], scale * r["metrics"]["BLEU"]),
                                    textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("BLEU")
        ax.set_title(DATASET_TITLES.get(dataset, dataset))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="folders to search for results.json, or results.json files")
    parser.add_argument("--out", default="reports/nlg", help="folder for nlg_tables.md and params_vs_bleu.png")
    args = parser.parse_args(argv)
    results = find_results(args.paths)
    if not results:
        print(f"error: no NLG results.json found under {', '.join(args.paths)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = tables_markdown(results)
    (out / "nlg_tables.md").write_text(text)
    plot_params_vs_bleu(results, out / "params_vs_bleu.png")
    print(text)
    print(f"wrote {out / 'nlg_tables.md'} and {out / 'params_vs_bleu.png'} from {len(results)} runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
