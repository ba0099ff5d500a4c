"""GLUE's metrics per task, in numpy: accuracy, F1, Matthews correlation, Pearson and Spearman correlation.

Wang et al., "GLUE: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding", ICLR 2019
(https://arxiv.org/abs/1804.07461), Table 1: CoLA Matthews corr.; SST-2, MNLI (matched / mismatched: two
validation splits, each scored with accuracy), QNLI, RTE, WNLI accuracy; MRPC, QQP F1 and accuracy; STS-B Pearson
and Spearman correlation. Values are fractions (multiply by 100 for the published percentages); the task's
``score`` is the mean of its metrics as the GLUE leaderboard averages them.
"""
from __future__ import annotations

import numpy as np

__all__ = ["GLUE_TASK_METRICS", "accuracy", "f1_binary", "matthews_corr", "pearson", "spearman", "glue_metrics"]

#: the metrics GLUE reports for each task
GLUE_TASK_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("mcc",), "sst2": ("accuracy",), "mrpc": ("f1", "accuracy"), "stsb": ("pearson", "spearman"),
    "qqp": ("f1", "accuracy"), "mnli": ("accuracy",), "qnli": ("accuracy",), "rte": ("accuracy",),
    "wnli": ("accuracy",)}


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """``mean(pred == labels)``."""
    return float(np.mean(np.asarray(pred) == np.asarray(labels)))


def f1_binary(pred: np.ndarray, labels: np.ndarray) -> float:
    """F1 of the positive class 1: ``2 TP / (2 TP + FP + FN)``; 0 when there is no positive at all."""
    p, y = np.asarray(pred) == 1, np.asarray(labels) == 1
    tp = float(np.sum(p & y))
    denom = 2 * tp + float(np.sum(p & ~y)) + float(np.sum(~p & y))
    return 0.0 if denom == 0 else 2 * tp / denom


def matthews_corr(pred: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation (Matthews 1975), multiclass form of Gorodkin 2004 with the confusion matrix C:
    ``(c s - sum_k p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2))``, c = trace C, s = n; 0 when undefined
    (a constant prediction or constant labels)."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    classes, inv = np.unique(np.concatenate([pred, labels]), return_inverse=True)
    p, t = inv[: len(pred)], inv[len(pred):]
    k = len(classes)
    cm = np.zeros((k, k), dtype=np.float64)
    np.add.at(cm, (t, p), 1.0)
    s, c = cm.sum(), np.trace(cm)
    pk, tk = cm.sum(axis=0), cm.sum(axis=1)
    cov_pt = c * s - pk @ tk
    denom = np.sqrt((s * s - pk @ pk) * (s * s - tk @ tk))
    return 0.0 if denom == 0 else float(cov_pt / denom)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r: ``cov(x, y) / (std x std y)``; NaN when either is constant (as scipy.stats.pearsonr)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    xm, ym = x - x.mean(), y - y.mean()
    denom = np.sqrt((xm @ xm) * (ym @ ym))
    if denom == 0:
        return float("nan")
    return float(np.clip((xm @ ym) / denom, -1.0, 1.0))


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.zeros(len(counts))
    np.add.at(sums, inv, ranks)
    return sums[inv] / counts[inv]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho: Pearson's r of the (tie-averaged) ranks."""
    return pearson(_ranks(np.asarray(x, dtype=np.float64)), _ranks(np.asarray(y, dtype=np.float64)))


def glue_metrics(task: str, outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's metrics from the model's outputs (class logits B x K, or B x 1 / B scores for STS-B) and labels;
    ``score`` is their mean."""
    if task not in GLUE_TASK_METRICS:
        raise ValueError(f"unknown GLUE task {task!r}; tasks: {', '.join(GLUE_TASK_METRICS)}")
    outputs, labels = np.asarray(outputs), np.asarray(labels)
    if task == "stsb":
        pred = outputs.reshape(-1).astype(np.float64)
    else:
        pred = outputs.argmax(axis=-1) if outputs.ndim == 2 else outputs
    fns = {"accuracy": accuracy, "f1": f1_binary, "mcc": matthews_corr, "pearson": pearson, "spearman": spearman}
    res = {m: fns[m](pred, labels) for m in GLUE_TASK_METRICS[task]}
    res["score"] = float(np.mean(list(res.values())))
    return res
