"""Figures for reports: confusion matrix and training curves. Return Figures; callers save them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def agg_figure(figsize: tuple[float, float]):
    # The object-oriented API with an Agg canvas: no pyplot state, no GUI backend, safe in
    # worker threads (Prefect task runners).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def confusion_matrix_figure(
    confusion: Sequence[Sequence[int]], classes: Sequence[str], normalize: bool = True,
    title: str = "Confusion matrix",
):
    """Rows: true class, columns: predicted. Colour = row-normalised rate, text = counts."""
    cm = np.asarray(confusion, dtype=float)
    k = len(classes)
    if cm.shape != (k, k):
        raise ValueError(f"confusion matrix shape {cm.shape} does not match {k} classes")
    rows = cm.sum(1, keepdims=True)
    rate = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0) if normalize else cm
    fig = agg_figure((1.0 + 0.8 * k, 0.8 + 0.7 * k))
    ax = fig.add_subplot()
    im = ax.imshow(rate, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="recall" if normalize else "count")
    ax.set_xticks(range(k), labels=list(classes), rotation=45, ha="right")
    ax.set_yticks(range(k), labels=list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    hi = rate.max() if rate.size else 0.0
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=8,
                    color="white" if rate[i, j] > 0.6 * hi else "black")
    fig.tight_layout()
    return fig


def training_curves_figure(history: Sequence[dict[str, Any]], title: str = "Training"):
    """Loss and accuracy per epoch (train vs validation) from ``TrainResult.history``."""
    if not history:
        raise ValueError("empty training history")
    ep = [h["epoch"] for h in history]
    fig = agg_figure((9.0, 3.5))
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        if key in history[0]:
            ax1.plot(ep, [h[key] for h in history], marker=".", label=label)
    for key, label in (("train_acc", "train"), ("val_acc", "validation")):
        if key in history[0]:
            ax2.plot(ep, [h[key] for h in history], marker=".", label=label)
    ax1.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax2.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def embedding_figure(src_before: np.ndarray, site_before: np.ndarray, src_after: np.ndarray,
                     site_after: np.ndarray, title: str = "Features before / after adaptation"):
    """Source vs site bottleneck features in 2-D (PCA fitted on each model's pooled features),
    before (champion) and after (candidate) adaptation: overlap = aligned domains."""
    fig = agg_figure((9.0, 4.0))
    for i, (a, b, name) in enumerate(((src_before, site_before, "champion"),
                                      (src_after, site_after, "candidate"))):
        x = np.concatenate([a, b]).astype(np.float64)
        x = x - x.mean(0)
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        p = x @ vt[:2].T  # (N, 2)
        ax = fig.add_subplot(1, 2, i + 1)
        ax.scatter(p[: len(a), 0], p[: len(a), 1], s=6, alpha=0.5, label=f"training domain ({len(a)})")
        ax.scatter(p[len(a):, 0], p[len(a):, 1], s=6, alpha=0.5, label=f"site ({len(b)})")
        ax.set(title=name, xlabel="PC 1", ylabel="PC 2")
        ax.legend(fontsize=7, markerscale=2)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def adaptation_curves_figure(history: Sequence[dict[str, Any]], title: str = "Adaptation"):
    """Every numeric series of ``AdaptResult.history`` against the step (one panel each)."""
    if not history:
        raise ValueError("empty adaptation history")
    keys = [k for k in history[0] if k != "step" and isinstance(history[0][k], int | float)]
    steps = [h.get("step", i) for i, h in enumerate(history)]
    fig = agg_figure((3.2 * max(1, len(keys)), 3.0))
    for i, k in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        ax.plot(steps, [h.get(k, np.nan) for h in history], marker=".")
        ax.set(title=k, xlabel="step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
