"""Results in the project's format: ``results.json`` (with the keys every recipe reports) and ``results.md``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence


def markdown_table(rows: Sequence[dict], columns: Sequence[str], headers: Sequence[str] | None = None) -> str:
    """A Markdown table; floats print with up to 4 significant decimals, missing cells as '-'."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1 else f"{v:.2f}"
        return str(v)

    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_results(output_dir: str | os.PathLike, results: dict, markdown: str | None = None) -> Path:
    """Write ``results.json`` (and ``results.md`` when given) into ``output_dir``; returns the JSON path.

    ``results`` must hold the keys every recipe reports: recipe, config, method, trainable_params, adapter_bytes,
    metrics, base_metrics, wall_time_s, peak_memory_bytes; a comparison of several runs holds ``runs`` (one such
    record each, less the shared keys) instead of method, trainable_params, adapter_bytes and metrics.
    """
    required = ("recipe", "config", "method", "trainable_params", "adapter_bytes", "metrics", "base_metrics",
                "wall_time_s", "peak_memory_bytes")
    if "runs" in results:  # a comparison: each run holds its own method, parameters, bytes and metrics
        required = ("recipe", "config", "runs", "base_metrics", "wall_time_s", "peak_memory_bytes")
    missing = [k for k in required if k not in results]
    if missing:
        raise ValueError(f"results lack required keys: {missing}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    if markdown is not None:
        (out / "results.md").write_text(markdown)
    return path
