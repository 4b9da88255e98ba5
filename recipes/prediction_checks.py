"""Whether decoded predictions can carry a score: a run whose outputs are mostly empty, or all the same string, gets a
BLEU that measures the failure, not the method. :func:`check_predictions` says so in a warning, in a record for
``results.json`` and in a mark for the printed table."""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Sequence

# More than this share of empty predictions makes a run degenerate (a few empty outputs are a model's choice; a tenth
# of them is a decoding or prompt problem).
EMPTY_SHARE_LIMIT = 0.10
# What the tables print after the label of a degenerate run (and explain in a note under the table).
DEGENERATE_MARK = "⚠"


class DegenerateOutputWarning(UserWarning):
    """Predictions that make the scores meaningless (mostly empty, or all identical)."""


def prediction_check(predictions: Sequence[str], empty_share_limit: float = EMPTY_SHARE_LIMIT) -> dict:
    """How healthy a list of decoded predictions is, as a JSON-ready record.

    ``empty`` counts predictions that are empty after stripping whitespace; ``distinct`` counts different predictions;
    ``degenerate`` is true when more than ``empty_share_limit`` of them are empty, or when there are at least two and
    all are the same string; ``problems`` says which, in words (empty when the predictions are healthy).
    """
    total = len(predictions)
    stripped = [p.strip() for p in predictions]
    empty = sum(1 for p in stripped if not p)
    counts = Counter(stripped)
    problems = []
    if total and empty / total > empty_share_limit:
        problems.append(f"{empty} of {total} predictions are empty ({empty / total:.0%}, more than "
                        f"{empty_share_limit:.0%})")
    if total > 1 and len(counts) == 1 and empty < total:
        problems.append(f"all {total} predictions are the same text: {stripped[0][:60]!r}")
    most_common = counts.most_common(1)[0][1] if counts else 0
    return {"predictions": total, "empty": empty, "empty_share": round(empty / total, 4) if total else 0.0,
            "distinct": len(counts), "most_common_share": round(most_common / total, 4) if total else 0.0,
            "degenerate": bool(problems), "problems": problems}


def check_predictions(predictions: Sequence[str], label: str, where: str = "predictions.jsonl") -> dict:
    """:func:`prediction_check` of ``predictions``, warning (:class:`DegenerateOutputWarning`) when they are
    degenerate; ``label`` names the run in the warning and ``where`` says where to read the outputs."""
    record = prediction_check(predictions)
    if record["degenerate"]:
        warnings.warn(f"{label}: {'; '.join(record['problems'])}. Its scores measure that failure, not the method: "
                      f"read the outputs in {where} (prompt, chat template, max_new_tokens, the learning rate).",
                      DegenerateOutputWarning, stacklevel=2)
    return record


def marked_label(label: str, check: dict | None) -> str:
    """``label`` with :data:`DEGENERATE_MARK` appended when ``check`` (a :func:`prediction_check` record) is
    degenerate."""
    return f"{label} {DEGENERATE_MARK}" if check and check.get("degenerate") else label


def degenerate_note(checks: dict[str, dict | None]) -> str:
    """A note for under a table, one line per degenerate run (``{label: check}``), or "" when every run is healthy."""
    lines = [f"{DEGENERATE_MARK} {label}: {'; '.join(check['problems'])}; its scores are not meaningful."
             for label, check in checks.items() if check and check.get("degenerate")]
    return "\n".join(lines)
