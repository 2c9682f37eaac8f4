"""Evaluation metrics: mAP, ROC AUC and d-prime for multi-label tasks, accuracy for single-label ones.

Written with torch only (no scikit-learn): average precision is the area under the step-wise
precision-recall curve, as ``sklearn.metrics.average_precision_score`` computes it.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch


def _ranked(scores: torch.Tensor, labels: torch.Tensor):
    order = torch.argsort(scores, descending=True, stable=True)
    return scores[order], labels[order]


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """AP of one class; NaN when the class has no positive example. Tied scores are grouped."""
    s, y = _ranked(scores.double(), labels.double())
    npos = y.sum()
    if npos == 0:
        return float("nan")
    tp = torch.cumsum(y, 0)
    fp = torch.cumsum(1 - y, 0)
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]  # end of each group of equal scores
    tp, fp = tp[last], fp[last]
    precision = tp / (tp + fp)
    recall = tp / npos
    prev = torch.cat([recall.new_zeros(1), recall[:-1]])
    return float(((recall - prev) * precision).sum())


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC of one class by the rank statistic (ties count one half); NaN without both classes."""
    y = labels.double()
    npos, nneg = float(y.sum()), float((1 - y).sum())
    if npos == 0 or nneg == 0:
        return float("nan")
    # average ranks with ties
    s = scores.double()
    order = torch.argsort(s, stable=True)
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.float64)
    uniq, inverse = torch.unique(s, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
    ranks = (sums / counts)[inverse]
    return float((ranks[y == 1].sum() - npos * (npos + 1) / 2) / (npos * nneg))


def d_prime(auc: float) -> float:
    """``sqrt(2) * Phi^-1(AUC)``, as AudioSet papers report it."""
    if not 0.0 < auc < 1.0:
        return float("nan") if math.isnan(auc) else math.copysign(float("inf"), auc - 0.5)
    return math.sqrt(2.0) * float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(auc, dtype=torch.float64)))


def _nanmean(values: List[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def multilabel_metrics(scores: torch.Tensor, targets: torch.Tensor, class_names: Optional[List[str]] = None) -> Dict:
    """``scores``/``targets`` [N, C] -> mAP, mean AUC, d-prime and a per-class table.

    Classes without positives in ``targets`` are left out of the means (their AP is undefined), as
    are classes without negatives from the AUC's; ``ap_classes`` and ``auc_classes`` count the
    classes each mean is over (the release averages over all classes, which fails or counts such
    classes as 0 where an evaluation set lacks some)."""
    targets = (targets > 0.5).double()
    aps = [average_precision(scores[:, c], targets[:, c]) for c in range(scores.shape[1])]
    aucs = [roc_auc(scores[:, c], targets[:, c]) for c in range(scores.shape[1])]
    mauc = _nanmean(aucs)
    names = class_names or [str(c) for c in range(scores.shape[1])]
    per_class = [{"class": i, "name": names[i], "ap": aps[i], "auc": aucs[i], "positives": int(targets[:, i].sum())}
                 for i in range(scores.shape[1])]
    return {"mAP": _nanmean(aps), "AUC": mauc, "d_prime": d_prime(mauc), "classes": len(aps),
            "ap_classes": sum(not math.isnan(a) for a in aps), "auc_classes": sum(not math.isnan(a) for a in aucs),
            "per_class": per_class}


def coverage_note(metrics: Dict) -> str:
    """``" (mAP over 2 of 3 classes: 1 has no positive clip here)"``, or "" when every class counts."""
    if "ap_classes" not in metrics:
        return ""
    C, ap, auc = metrics["classes"], metrics["ap_classes"], metrics["auc_classes"]
    parts = []
    if ap < C:
        parts.append(f"mAP over {ap} of {C} classes: {C - ap} {'has' if C - ap == 1 else 'have'} no positive clip here")
    if auc < ap:
        parts.append(f"AUC over {auc}: {ap - auc} {'has' if ap - auc == 1 else 'have'} no negative clip")
    return f" ({'; '.join(parts)})" if parts else ""


def singlelabel_metrics(scores: torch.Tensor, targets: torch.Tensor, class_names: Optional[List[str]] = None) -> Dict:
    """Top-1 accuracy (and per-class accuracy) for one-hot or soft targets [N, C]."""
    pred = scores.argmax(1)
    true = targets.argmax(1)
    C = scores.shape[1]
    names = class_names or [str(c) for c in range(C)]
    per_class = []
    for c in range(C):
        sel = true == c
        acc = float((pred[sel] == c).double().mean()) if sel.any() else float("nan")
        per_class.append({"class": c, "name": names[c], "accuracy": acc, "count": int(sel.sum())})
    return {"accuracy": float((pred == true).double().mean()), "per_class": per_class}
