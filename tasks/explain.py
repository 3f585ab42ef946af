"""``emowatch explain``: one prediction explained with DnCShap, as JSON and an overlay PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tasks.context import Runtime


def overlay_path(output: str, image: str) -> Path:
    """Where the overlay goes: ``output`` itself when it names a file (``map.png``), else
    ``output/<image stem>.png``: an existing folder, a name ending with a separator, or a name
    without a suffix (a folder to create)."""
    import os

    out = Path(output)
    if out.is_dir() or output.endswith((os.sep, "/")) or not out.suffix:
        return out / f"{Path(image).stem}.png"
    return out


def explain_image(rt: Runtime, site: str, image: str, output: str,
                  version: str | None = None, depth: int = 6, baseline: str = "blur") -> dict[str, Any]:
    """Region attributions of the predicted class; writes an overlay PNG to ``output`` (a
    file, or a folder: ``<folder>/<image stem>.png``, see :func:`overlay_path`).

    Region values are in probability units and sum to p(image) - p(baseline)
    (``efficiency_gap`` is the float error of that sum)."""
    from models.explain.base import DnCShap
    from models.explain.plots import overlay_figure
    from models.images import load_rgb
    from tasks.predict import site_checkpoint

    ckpt, key = site_checkpoint(rt, site, version)
    prep = ckpt.preprocessing
    original = load_rgb(image, max_pixels=rt.settings.max_image_pixels)
    grid = prep.to_array(original)  # (S, S, 3) uint8: the pixels the model sees
    x = prep.normalize(grid).unsqueeze(0)
    att = DnCShap(ckpt.model, depth=depth).attribute(x, baseline=baseline)
    target = int(att.targets[0])
    import torch

    with torch.no_grad():
        probs = torch.softmax(ckpt.model.eval()(x), 1)[0].numpy()
    label = ckpt.classes[target]
    out = overlay_path(output, image)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Boxes and overlay in the original image's pixels ("squash" preprocessing maps the model
    # grid linearly onto the whole image); other preprocessing: the model's grid.
    w, h = original.size
    s = prep.img_size
    if prep.resize == "squash":
        sx, sy = w / s, h / s
        boxes = np.rint(att.boxes * np.array([sx, sy, sx, sy])).astype(int)
        iy = np.minimum((np.arange(h) / sy).astype(int), s - 1)
        ix = np.minimum((np.arange(w) / sx).astype(int), s - 1)
        shown, amap = np.asarray(original), att.maps[0][np.ix_(iy, ix)]
    else:
        boxes, shown, amap = att.boxes, grid, att.maps[0]
    fig = overlay_figure(shown, amap, boxes,
                         title=f"{label} ({probs[target]:.0%}) - DnCShap depth {depth}, {key}")
    fig.savefig(out, dpi=120, bbox_inches="tight")
    order = np.argsort(-att.region_values[0])
    return {
        "label": label,
        "probs": {c: round(float(p), 6) for c, p in zip(ckpt.classes, probs, strict=True)},
        "regions": [{"box": [int(v) for v in boxes[r]], "value": float(att.region_values[0, r]),
                     "box_model": [int(v) for v in att.boxes[r]]} for r in order],
        "efficiency_gap": float(att.efficiency_gap[0]),
        "model_calls": int(att.model_calls[0]),
        "p_image": float(att.f_image[0]),
        "p_baseline": float(att.f_baseline[0]),
        "baseline": baseline,
        "depth": depth,
        "seconds": round(float(att.seconds), 3),
        "model": key,
        "image": image,
        "output": str(out.resolve()),
        "image_size": [w, h],
        "model_input_size": [s, s],
    }
