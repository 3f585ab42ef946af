"""Small figures for the drift report, the status page and the e-mails (pure: arrays in,
matplotlib Figures out; callers encode or save them)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from models.plots import agg_figure as figure

REF_COLOUR, CUR_COLOUR = "#4c72b0", "#dd8452"


def quality_histograms_figure(ref: Mapping[str, np.ndarray], cur: Mapping[str, np.ndarray],
                              names: Sequence[str] | None = None, site: str = "site"):
    """Reference-vs-site histograms of the image-quality statistics (one small panel each)."""
    names = [n for n in (names or sorted(ref)) if n in ref and n in cur]
    cols = min(4, max(1, len(names)))
    rows = max(1, -(-len(names) // cols))
    fig = figure((2.4 * cols, 1.7 * rows))
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        a, b = np.asarray(ref[name], float), np.asarray(cur[name], float)
        both = np.concatenate([a, b])
        both = both[np.isfinite(both)]
        if both.size == 0:
            continue
        lo, hi = np.percentile(both, [1, 99])
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 21)
        # one filled outline per histogram, not a patch per bar: the figure is drawn for every
        # check (~1 s less per check on 2 cores)
        ax.hist(np.clip(a, lo, hi), bins=bins, density=True, alpha=0.55, color=REF_COLOUR,
                label="training domain", histtype="stepfilled")
        ax.hist(np.clip(b, lo, hi), bins=bins, density=True, alpha=0.55, color=CUR_COLOUR,
                label=site, histtype="stepfilled")
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=6)
        ax.set_yticks([])
    if names:
        fig.axes[0].legend(fontsize=6, loc="upper right")
    # fixed margins: tight_layout measured every label of every panel on each check
    fig.subplots_adjust(left=0.04, right=0.98, bottom=0.12, top=0.88, wspace=0.12,
                        hspace=0.6 if rows > 1 else 0.2)
    return fig


def class_shares_figure(ref_probs: np.ndarray, cur_probs: np.ndarray, classes: Sequence[str],
                        site: str = "site"):
    """Share of each predicted class, training domain vs site (bars side by side)."""
    k = len(classes)
    ref_share = np.bincount(np.argmax(ref_probs, 1), minlength=k) / max(1, len(ref_probs))
    cur_share = np.bincount(np.argmax(cur_probs, 1), minlength=k) / max(1, len(cur_probs))
    fig = figure((max(3.5, 0.7 * k + 1.5), 2.2))
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(k)
    ax.bar(x - 0.2, ref_share, 0.4, color=REF_COLOUR, label="training domain")
    ax.bar(x + 0.2, cur_share, 0.4, color=CUR_COLOUR, label=site)
    ax.set_xticks(x, list(classes), fontsize=7, rotation=30)
    ax.set_ylabel("predicted share", fontsize=7)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def history_figure(p_values: Sequence[float | None], accuracy: Sequence[float | None],
                   low: Sequence[float | None], high: Sequence[float | None],
                   alpha: float = 0.05, labels: Sequence[str] | None = None):
    """A site's checks oldest first: drift p-value (log scale, alpha line) and the estimated
    accuracy with its interval."""
    n = len(p_values)
    x = np.arange(n)
    fig = figure((6.0, 2.6))
    ax1 = fig.add_subplot(1, 2, 1)
    p = np.array([np.nan if v is None else max(float(v), 1e-12) for v in p_values])
    ax1.plot(x, p, "o-", ms=3, color=REF_COLOUR)
    ax1.axhline(alpha, color="crimson", lw=0.8, ls="--", label=f"alpha {alpha:g}")
    ax1.set_yscale("log")
    ax1.set_title("drift p-value", fontsize=8)
    ax1.legend(fontsize=6)
    ax2 = fig.add_subplot(1, 2, 2)
    a = np.array([np.nan if v is None else float(v) for v in accuracy])
    lo = np.array([np.nan if v is None else float(v) for v in low])
    hi = np.array([np.nan if v is None else float(v) for v in high])
    ax2.fill_between(x, lo, hi, color=CUR_COLOUR, alpha=0.25, label="90% interval")
    ax2.plot(x, a, "o-", ms=3, color=CUR_COLOUR, label="estimated accuracy")
    ax2.set_ylim(0, 1)
    ax2.set_title("estimated accuracy (no labels)", fontsize=8)
    ax2.legend(fontsize=6)
    for ax in (ax1, ax2):
        ax.tick_params(labelsize=6)
        if labels is not None and n:
            step = max(1, n // 6)
            ax.set_xticks(x[::step], [labels[i] for i in range(0, n, step)], fontsize=5,
                          rotation=30)
    fig.tight_layout()
    return fig


__all__ = ["class_shares_figure", "history_figure", "quality_histograms_figure"]
