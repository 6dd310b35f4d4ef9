"""Task metrics (GLUE's): accuracy, F1 (binary, positive class 1), macro F1, Matthews correlation,
Pearson and Spearman correlation, exact match. Computed with scikit-learn and SciPy."""

from __future__ import annotations

from collections.abc import Callable, Sequence


def _acc(y, p):
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(y, p))


def _f1(y, p):
    from sklearn.metrics import f1_score

    return float(f1_score(y, p, average="binary" if len(set(y) | set(p)) <= 2 else "macro", zero_division=0))


def _macro_f1(y, p):
    from sklearn.metrics import f1_score

    return float(f1_score(y, p, average="macro", zero_division=0))


def _mcc(y, p):
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(y, p))


def _pearson(y, p):
    from scipy.stats import pearsonr

    return float(pearsonr(y, p)[0])


def _spearman(y, p):
    from scipy.stats import spearmanr

    return float(spearmanr(y, p)[0])


def _exact(y, p):
    return sum(str(a).strip() == str(b).strip() for a, b in zip(y, p)) / max(len(y), 1)


METRICS: dict[str, Callable[[Sequence, Sequence], float]] = {
    "accuracy": _acc,
    "f1": _f1,
    "macro_f1": _macro_f1,
    "mcc": _mcc,
    "pearson": _pearson,
    "spearman": _spearman,
    "exact_match": _exact,
}


def compute(metric: str, labels: Sequence, preds: Sequence) -> float:
    """metric(labels, predictions) for one task."""
    if not labels:
        return float("nan")
    return METRICS[metric](list(labels), list(preds))
