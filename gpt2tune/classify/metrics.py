"""Classification metrics: accuracy, per-class precision/recall/F1, macro-F1, confusion matrix."""

from __future__ import annotations

import math
from typing import Optional, Sequence


def confusion_matrix(true: Sequence[int], pred: Sequence[int], n_classes: int) -> list[list[int]]:
    """matrix[t][p]: how many examples of class t were predicted as p."""
    m = [[0] * n_classes for _ in range(n_classes)]
    for t, p in zip(true, pred):
        m[t][p] += 1
    return m


def _div(a: float, b: float) -> float:
    return a / b if b else 0.0


def classification_report(true: Sequence[int], pred: Sequence[int], names: Sequence[str],
                          probs_true: Optional[Sequence[float]] = None) -> dict:
    """Metrics of one split. `probs_true` (probability given to the true class) adds the mean loss."""
    if len(true) != len(pred):
        raise ValueError("true and pred differ in length")
    n_classes = len(names)
    m = confusion_matrix(true, pred, n_classes)
    per_class = {}
    for c, name in enumerate(names):
        tp = m[c][c]
        predicted = sum(m[r][c] for r in range(n_classes))
        support = sum(m[c])
        precision, recall = _div(tp, predicted), _div(tp, support)
        per_class[name] = {"precision": precision, "recall": recall,
                           "f1": _div(2 * precision * recall, precision + recall), "support": support}
    n = len(true)
    report = {
        "accuracy": _div(sum(m[c][c] for c in range(n_classes)), n),
        "macro_f1": _div(sum(v["f1"] for v in per_class.values()), n_classes),
        "examples": n,
        "errors": n - sum(m[c][c] for c in range(n_classes)),
    }
    if probs_true is not None and n:
        report["loss"] = -sum(math.log(max(p, 1e-12)) for p in probs_true) / n
    report["per_class"] = per_class
    report["confusion_matrix"] = {"labels": list(names), "rows_true_columns_predicted": m}
    return report
