"""Prediction and evaluation with a site's model (plain functions behind the CLI)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.context import Runtime


def site_checkpoint(rt: Runtime, site: str, version: str | None) -> tuple[Any, str]:
    """(Checkpoint, "name/version"): the site's champion, or a given version of its model;
    a site without a model of its own uses the source champion."""
    from tasks.registry.client import SOURCE_MODEL, site_model_name

    reg = rt.registry
    if version is not None:
        name = site_model_name(site)
        if not reg.list_versions(name):
            name = SOURCE_MODEL
        ckpt, _ = reg.load_model(name, str(version))
        return ckpt, f"{name}/{version}"
    name, v, _ = reg.resolve_site_model(site)
    ckpt, _ = reg.load_model(name, v)
    return ckpt, f"{name}/{v}"


def predict_paths(rt: Runtime, site: str, paths: list[str], version: str | None = None,
                  batch_size: int = 32) -> list[dict[str, Any]]:
    """One ``{"path", "label", "probs": {class: p}}`` per image (unreadable: ``"error"``)."""
    from models.evaluate import predict_arrays
    from models.images import load_rgb

    ckpt, key = site_checkpoint(rt, site, version)
    out: list[dict[str, Any]] = []
    ok_idx, grids = [], []
    for i, p in enumerate(paths):
        try:
            grids.append(ckpt.preprocessing.to_array(
                load_rgb(p, max_pixels=rt.settings.max_image_pixels)))
            ok_idx.append(i)
            out.append({"path": p})
        except Exception as e:  # noqa: BLE001 - report per image, keep going
            out.append({"path": p, "label": None, "probs": None, "error": str(e)})
    if grids:
        import numpy as np

        probs = predict_arrays(ckpt, np.stack(grids), batch_size=batch_size)
        for i, pr in zip(ok_idx, probs, strict=True):
            out[i].update({
                "label": ckpt.classes[int(pr.argmax())],
                "probs": {c: round(float(v), 6) for c, v in zip(ckpt.classes, pr, strict=True)},
                "model": key,
            })
    if not ok_idx:
        raise ValueError("none of the images could be read: " + "; ".join(o["error"] for o in out))
    return out


def evaluate_folder(rt: Runtime, site: str, data: str, version: str | None = None) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class recall on a labelled ``<class>/<image>`` folder.

    Folder class names must be among the model's classes (others are refused, not guessed).
    Images are decoded with the ingestion's limits (``Settings.max_image_pixels``)."""
    import numpy as np

    from models.data import read_image_folder
    from models.evaluate import evaluate
    from models.images import load_rgb

    ckpt, key = site_checkpoint(rt, site, version)
    found = sorted(p.name for p in Path(data).iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [c for c in found if c not in ckpt.classes]
    if unknown:
        raise ValueError(f"{data}: class folders {unknown} are not classes of {key} ({ckpt.classes})")
    ls = read_image_folder(data, classes=[c for c in ckpt.classes if c in found])
    # labels in the folder's subset order -> the model's class indices
    to_model = [ckpt.classes.index(c) for c in ls.classes]
    labels = [to_model[r.label] for r in ls.records]
    limit = rt.settings.max_image_pixels
    grids = np.stack([ckpt.preprocessing.to_array(load_rgb(r.path, max_pixels=limit))
                      for r in ls.records])
    res = evaluate(ckpt, grids, labels, classes=ckpt.classes)
    return {"accuracy": res.accuracy, "macro_f1": res.macro_f1, "n": res.n,
            "per_class": {c: v for c, v in res.per_class.items() if v["n"] > 0},
            "model": key, "confusion": res.confusion, "classes": list(ckpt.classes)}
