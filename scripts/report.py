"""Gather NLG ``results.json`` files into the paper's tables (Markdown) and a parameters-vs-BLEU plot (PNG).

    python scripts/report.py runs/ [more dirs or results.json files] --out reports/nlg

Writes ``OUT/nlg_tables.md`` (one table per dataset and base model, rows sorted by trainable parameters) and
``OUT/params_vs_bleu.png`` (trainable parameters on a log axis against BLEU, NOLA vs LoRA, one panel per dataset).
A comparison run's ``results.json`` (the quickstart) contributes each of its runs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes.nlg_report import find_results, plot_params_vs_bleu, tables_markdown  # noqa: E402
from recipes.config import parse_script_args  # noqa: E402


@dataclass
class Options:
    """python scripts/report.py options."""

    paths: list[str] = field(metadata={"positional": True, "help": (
        "Folders to search for results.json (recursively), or results.json files.")})
    out: str = field(default="reports/nlg", metadata={"help": "Folder for nlg_tables.md and params_vs_bleu.png."})


def main(argv: list[str] | None = None) -> int:
    args = parse_script_args(Options, argv, "python scripts/report.py PATH [PATH ...] [--out FOLDER]", __doc__)
    try:
        results = find_results(args.paths)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
