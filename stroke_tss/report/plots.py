"""PNG figures: ROC per task (all models, AUC in the legend), learning curves per phase, reliability + Brier."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from stroke_tss.tasks import get_task  # noqa: E402

# What a learning curve shows: losses and ranking/threshold metrics. log.jsonl also holds bookkeeping
# (steps, best_epoch, train_seconds, ...) that would only crowd the figure.
_METRICS = {"auc", "accuracy", "sensitivity", "specificity", "f1", "ap", "brier", "ppv", "npv"}


def _is_curve(name: str) -> bool:
    return name.endswith("loss") or name.rsplit("_", 1)[-1] in _METRICS


def _models(test: pd.DataFrame):
    """(legend label, rows) per model with both classes; the run name only when several runs are compared."""
    single_run = test["run"].nunique() == 1
    for (run, variant, phase), g in test.groupby(["run", "variant", "phase"], sort=True):
        if g["label"].nunique() == 2:
            yield (f"{variant} · {phase}" if single_run else f"{run}/{variant} · {phase}"), g


def roc_plot(test: pd.DataFrame, path: str | Path, *, task: str) -> Path:
    """ROC curves of every model on one task's pooled test predictions."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for label, g in _models(test[test["task"] == task]):
        fpr, tpr, _ = roc_curve(g["label"], g["probability"])
        ax.plot(fpr, tpr, label=f"{label} (AUC {roc_auc_score(g['label'], g['probability']):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC: {get_task(task).display}", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=7)
    return _save(fig, path)


def reliability_plot(test: pd.DataFrame, path: str | Path, *, task: str, num_bins: int = 10) -> Path:
    """Observed share of positives against mean predicted probability per bin; Brier score in the legend."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for label, g in _models(test[test["task"] == task]):
        observed, predicted = calibration_curve(g["label"], g["probability"], n_bins=num_bins)
        brier = float(np.mean((g["probability"] - g["label"]) ** 2))
        ax.plot(predicted, observed, marker="o", ms=3, label=f"{label} (Brier {brier:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="predicted probability", ylabel="observed share positive", title=f"Calibration: {get_task(task).display}",
           xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=7)
    return _save(fig, path)


def learning_curves(logs: pd.DataFrame, path: str | Path, *, phase: str) -> Path | None:
    """One panel per logged quantity (losses, AUCs, ...) over epochs, a line per run/variant/fold."""
    g = logs[logs["phase"] == phase]
    x = "epoch" if "epoch" in g.columns else "step"
    if g.empty or x not in g.columns:
        return None
    curves = [c for c in g.columns if _is_curve(c) and pd.api.types.is_numeric_dtype(g[c]) and g[c].notna().any()]
    if not curves:
        return None
    multi = g["run"].nunique() > 1
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.5), squeeze=False)
    for ax, name in zip(axes[0], curves):
        for (run, variant, fold), line in g.groupby(["run", "variant", "fold"], sort=True):
            line = line.dropna(subset=[name])
            # markers: a run stopped after one epoch still shows its point
            ax.plot(line[x], line[name], lw=1, marker="o", ms=2.5,
                    label=f"{run + '/' if multi else ''}{variant} fold {fold}")
        ax.set(xlabel=x, title=name)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"Learning curves: {phase}")
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
