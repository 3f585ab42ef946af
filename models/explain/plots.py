"""Figures of attribution maps: one explained image, and champion-vs-challenger galleries."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def gallery_figure(images, champ_maps: np.ndarray, chall_maps: np.ndarray,
                   titles: Sequence[str] | None = None,
                   champ_probs: np.ndarray | None = None, chall_probs: np.ndarray | None = None,
                   classes: Sequence[str] | None = None):
    """Rows of image | champion map | challenger map (maps overlaid on the image).

    Each map is titled with the model's predicted class and probability (when ``*_probs`` and
    ``classes`` are given) and the pair says whether the two models agree. Both maps of a row
    share one diverging colour scale, shown once, with the legend: red raises, blue lowers the
    predicted class's probability. Region boundaries show as the steps of the map."""
    from matplotlib.figure import Figure

    imgs = display_images(images)
    n = imgs.shape[0]
    if champ_maps.shape[0] != n or chall_maps.shape[0] != n:
        raise ValueError("one champion and one challenger map per image")
    fig = Figure(figsize=(8.6, 2.6 * n + 0.5), layout="constrained")
    axes = fig.subplots(n, 3, squeeze=False)
    im = None
    for i in range(n):
        axes[i, 0].imshow(imgs[i])
        axes[i, 0].set_title(titles[i] if titles else f"image {i}", fontsize=9)
        lim = float(max(np.abs(champ_maps[i]).max(), np.abs(chall_maps[i]).max())) or 1.0
        labels = []
        for probs in (champ_probs, chall_probs):
            if probs is not None and classes is not None:
                k = int(np.argmax(probs[i]))
                labels.append((classes[k], float(probs[i, k])))
            else:
                labels.append(None)
        agree = labels[0] is not None and labels[1] is not None and labels[0][0] == labels[1][0]
        for j, (m, name) in enumerate(((champ_maps[i], "champion"), (chall_maps[i], "challenger")),
                                      start=1):
            im = overlay(axes[i, j], imgs[i], m, lim)
            lab = labels[j - 1]
            text = name if lab is None else f"{name}: {lab[0]} {lab[1]:.0%}"
            colour = "black" if lab is None or agree else "crimson"
            axes[i, j].set_title(text, fontsize=9, color=colour)
    for ax in axes.ravel():
        ax.set_axis_off()
    if im is not None:
        bar = fig.colorbar(im, ax=axes[:, 1:].ravel().tolist(), location="bottom", shrink=0.6,
                           aspect=40, ticks=[im.norm.vmin, 0, im.norm.vmax])
        bar.ax.set_xticklabels(["lowers", "0", "raises"], fontsize=8)
        bar.set_label("red raises / blue lowers the predicted class's probability "
                      "(one scale per row)", fontsize=8)
    return fig


def overlay_figure(image, attribution_map: np.ndarray, regions: np.ndarray | None = None,
                   title: str | None = None, top: int = 3):
    """One image with its map (red = for the class, blue = against) and the region grid; the
    ``top`` regions with the largest mean attribution are outlined in yellow."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    img = display_images(image if np.ndim(image) == 4 else np.asarray(image)[None])[0]
    m = np.asarray(attribution_map, dtype=np.float64)
    if m.shape != img.shape[:2]:
        raise ValueError(f"map {m.shape} does not match image {img.shape[:2]}")
    fig = Figure(figsize=(4.5, 4.5), layout="constrained")
    ax = fig.subplots()
    im = overlay(ax, img, m)
    fig.colorbar(im, ax=ax, shrink=0.7, label="attribution / pixel")
    if regions is not None:
        boxes = np.asarray(regions)
        means = np.array([m[y0:y1, x0:x1].mean() for x0, y0, x1, y1 in boxes])
        best = set(np.argsort(-means)[:top].tolist())
        for r, (x0, y0, x1, y1) in enumerate(boxes):
            hi = r in best
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                   lw=2.0 if hi else 0.4, ec="yellow" if hi else "white",
                                   alpha=1.0 if hi else 0.5))
    if title:
        ax.set_title(title, fontsize=10)
    ax.set_axis_off()
    return fig


def overlay(ax, img: np.ndarray, m: np.ndarray, lim: float | None = None):
    lim = lim or float(np.abs(m).max()) or 1.0
    ax.imshow(img)
    return ax.imshow(m, cmap="bwr", vmin=-lim, vmax=lim, alpha=0.55)


def display_images(images) -> np.ndarray:
    """uint8 (N,H,W,3) or normalised float (N,3,H,W) -> float (N,H,W,3) in [0,1]."""
    a = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if a.ndim != 4:
        raise ValueError(f"images must be (N,H,W,3) uint8 or (N,3,H,W) floats, got {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 255.0
    if a.shape[1] == 3:
        a = a.transpose(0, 2, 3, 1)
    lo = a.min(axis=(1, 2, 3), keepdims=True)
    hi = a.max(axis=(1, 2, 3), keepdims=True)
    return (a - lo) / np.maximum(hi - lo, 1e-12)


__all__ = ["display_images", "gallery_figure", "overlay", "overlay_figure"]
