"""Accuracy, macro-F1, per-class figures and batched inference for a trained checkpoint.

``predict_arrays`` and ``extract_features`` are the one way downstream code (drift profiles,
site featurizing, adaptation checks) runs a model on images: batched, under ``no_grad``,
in eval mode, with the checkpoint's own preprocessing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from models.engine import onnx_pass
from models.engine import resolve as resolve_engine
from models.network import Checkpoint, EmotionNet, Preprocessing


@dataclass
class EvalResult:
    accuracy: float
    macro_f1: float
    n: int
    # {class name: {"recall": float, "precision": float, "n": int (true count)}}
    per_class: dict[str, dict[str, float]]
    confusion: list[list[int]]  # [true][predicted]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def metrics_from_predictions(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, classes: Sequence[str]
) -> EvalResult:
    """Accuracy, macro-F1 (mean over classes, F1 = 0 where undefined) and the confusion matrix."""
    yt = np.asarray(y_true, dtype=np.int64).ravel()
    yp = np.asarray(y_pred, dtype=np.int64).ravel()
    k = len(classes)
    if yt.shape != yp.shape:
        raise ValueError(f"y_true and y_pred differ in length: {yt.shape[0]} vs {yp.shape[0]}")
    if yt.size == 0:
        raise ValueError("cannot evaluate on zero images")
    for name, y in (("y_true", yt), ("y_pred", yp)):
        if y.min() < 0 or y.max() >= k:
            raise ValueError(f"{name} has labels outside [0, {k}) for classes {list(classes)}")
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (yt, yp), 1)
    tp = np.diag(cm).astype(float)
    true_n = cm.sum(1).astype(float)
    pred_n = cm.sum(0).astype(float)
    recall = np.divide(tp, true_n, out=np.zeros(k), where=true_n > 0)
    precision = np.divide(tp, pred_n, out=np.zeros(k), where=pred_n > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    present = true_n > 0  # classes absent from y_true do not drag macro-F1 to zero
    return EvalResult(
        accuracy=float(tp.sum() / yt.size),
        macro_f1=float(f1[present].mean()) if present.any() else 0.0,
        n=int(yt.size),
        per_class={
            c: {"recall": float(recall[i]), "precision": float(precision[i]), "n": int(true_n[i])}
            for i, c in enumerate(classes)
        },
        confusion=cm.tolist(),
    )


def evaluate(
    predict: Checkpoint | Callable[[Any], np.ndarray],
    images: Any,
    labels: Sequence[int] | np.ndarray,
    classes: Sequence[str] | None = None,
    batch_size: int = 32,
) -> EvalResult:
    """Evaluate a checkpoint (or any ``images -> probs (N,K)`` function) on labelled images.

    images: whatever ``predict`` takes; for a checkpoint see :func:`predict_arrays`.
    """
    if isinstance(predict, Checkpoint):
        classes = classes or predict.classes
        probs = predict_arrays(predict, images, batch_size=batch_size)
    else:
        if classes is None:
            raise ValueError("classes are required when evaluating a prediction function")
        probs = np.asarray(predict(images))
    if probs.ndim != 2 or probs.shape[1] != len(classes):
        raise ValueError(f"predictions have shape {probs.shape}, expected (N, {len(classes)})")
    return metrics_from_predictions(labels, probs.argmax(1), classes)


# --- batched inference -----------------------------------------------------------------------
def _to_uint8_grid(img: Any, prep: Preprocessing) -> np.ndarray:
    """One image (PIL, uint8 (H,W,3)/(H,W) array, or path) -> uint8 (S,S,3) at the model's size."""
    if isinstance(img, Image.Image):
        return prep.to_array(img)
    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8 (H,W,3), got dtype {img.dtype}")
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"image arrays must be (H,W,3), got shape {img.shape}")
        if img.shape[:2] == (prep.img_size, prep.img_size):
            return img
        return prep.to_array(Image.fromarray(img))
    from models.data import ImageRecord  # paths: decode here
    from models.images import load_rgb

    path = img.path if isinstance(img, ImageRecord) else img
    return prep.to_array(load_rgb(path))


def iter_input_batches(images: Any, prep: Preprocessing, batch_size: int):
    """Yield normalised (B,3,S,S) tensors from any accepted image collection.

    Accepted: uint8 array (N,H,W,3) (resized to the model's size if needed); float tensor
    (N,3,S,S) already normalised; a sequence of PIL images, uint8 arrays, paths or ImageRecords.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"tensor input must be normalised float (N,3,S,S), got {tuple(images.shape)}"
                             f" {images.dtype}")
        for s in range(0, images.shape[0], batch_size):
            yield images[s:s + batch_size].float()
        return
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"array input must be uint8 (N,H,W,3), got {images.shape} {images.dtype}")
        for s in range(0, images.shape[0], batch_size):
            chunk = images[s:s + batch_size]
            if chunk.shape[1:3] != (prep.img_size, prep.img_size):
                chunk = np.stack([_to_uint8_grid(a, prep) for a in chunk])
            yield prep.normalize(chunk)
        return
    seq = list(images)
    for s in range(0, len(seq), batch_size):
        yield prep.normalize(np.stack([_to_uint8_grid(a, prep) for a in seq[s:s + batch_size]]))


PRECISIONS = ("fp32", "bf16")
# bf16 on CPU: small batches stay in cache (Lite0 at 224 px, 2 threads: 134 img/s at batch 4-8
# against 17 img/s in fp32 at batch 32).
BF16_BATCH = 8


def inference_context(precision: str) -> Any:
    """``torch.autocast`` to bfloat16 for "bf16"; nothing for "fp32"."""
    import contextlib

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def extract_features(
    ckpt: Checkpoint | EmotionNet,
    images: Any,
    batch_size: int = 32,
    prep: Preprocessing | None = None,
    precision: str | None = None,
    engine: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Images -> (bottleneck features z (N, D) float32, softmax probs (N, K) float32).

    ``precision``: default the checkpoint's own (:attr:`Checkpoint.precision`; fp32 for a bare
    network). bf16 runs channels-last under autocast in batches of at most BF16_BATCH.
    ``engine``: default the checkpoint's (:attr:`Checkpoint.engine`, "auto": fp32 runs in ONNX
    Runtime where it is installed, ``models.engine``; "torch" for a bare network)."""
    model, prep = _model_and_prep(ckpt, prep)
    if precision is None:
        precision = ckpt.precision if isinstance(ckpt, Checkpoint) else "fp32"
    if engine is None:
        engine = ckpt.engine if isinstance(ckpt, Checkpoint) else "torch"
    if resolve_engine(engine, precision) == "onnx":
        model.to(memory_format=torch.contiguous_format)  # as the torch fp32 path leaves them
        n = images.shape[0] if isinstance(images, (np.ndarray, torch.Tensor)) else (
            len(images) if hasattr(images, "__len__") else None)
        ort_pass = onnx_pass(model, "full", prep.img_size, n,
                             ckpt.engine_cache if isinstance(ckpt, Checkpoint) else None)
        if ort_pass is not None:
            return _run_onnx(ort_pass, images, prep, batch_size, model)
    bf16 = precision == "bf16"
    if bf16:
        batch_size = min(batch_size, BF16_BATCH)
        model.to(memory_format=torch.channels_last)  # in place, once; same weights
    else:  # fp32 NCHW on channels-last weights takes a slow path (measured: many times slower)
        model.to(memory_format=torch.contiguous_format)
    was_training = model.training
    model.eval()
    zs, ps = [], []
    try:
        with inference_context(precision):
            for x in iter_input_batches(images, prep, batch_size):
                if bf16:
                    x = x.contiguous(memory_format=torch.channels_last)
                z, logits = model.forward_cached(model.frozen_forward(x))
                zs.append(z.float().numpy())
                ps.append(torch.softmax(logits.float(), 1).numpy())
    finally:
        model.train(was_training)
    return _joined(model, zs, ps)


def _joined(model: EmotionNet, zs: list[np.ndarray], ps: list[np.ndarray]
            ) -> tuple[np.ndarray, np.ndarray]:
    """Batches of (z, probs) -> arrays; (0, D) and (0, K) when there were none."""
    if not zs:
        d, k = model.config.bottleneck_dim, model.config.num_classes
        return np.zeros((0, d), np.float32), np.zeros((0, k), np.float32)
    return np.concatenate(zs), np.concatenate(ps)


def _run_onnx(ort_pass: Any, images: Any, prep: Preprocessing, batch_size: int,
              model: EmotionNet) -> tuple[np.ndarray, np.ndarray]:
    zs, ps = [], []
    for x in iter_input_batches(images, prep, batch_size):
        z, logits = ort_pass(x)
        zs.append(z)
        ps.append(torch.softmax(torch.from_numpy(logits), 1).numpy())
    return _joined(model, zs, ps)


def extract_features_overlapped(
    ckpt: Checkpoint,
    items: Sequence[Any],
    load: Callable[[Any], np.ndarray | None],
    batch_size: int = 32,
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """:func:`extract_features` of ``load(item)`` (a uint8 (S,S,3) grid, or None to skip the
    item) for every item, decoding in a background thread while the previous batch runs
    through the network (decoding and both engines release the GIL). Returns the indices of
    the items kept, z and probs aligned with them."""
    from concurrent.futures import ThreadPoolExecutor

    model, prep = ckpt.model, ckpt.preprocessing
    engine = resolve_engine(ckpt.engine, ckpt.precision)
    ort_pass = (onnx_pass(model, "full", prep.img_size, len(items), ckpt.engine_cache)
                if engine == "onnx" else None)
    kept: list[int] = []
    zs, ps = [], []

    def decode(start: int) -> tuple[list[int], list[np.ndarray]]:
        idx, grids = [], []
        for i in range(start, min(len(items), start + batch_size)):
            g = load(items[i])
            if g is not None:
                idx.append(i)
                grids.append(g)
        return idx, grids

    def forward(grids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        x = np.stack(grids)
        if ort_pass is not None:
            return _run_onnx(ort_pass, x, prep, len(x), model)
        return extract_features(ckpt, x, batch_size=batch_size, engine="torch")

    with ThreadPoolExecutor(1) as pool:
        nxt = pool.submit(decode, 0) if items else None
        for start in range(0, len(items), batch_size):
            assert nxt is not None
            idx, grids = nxt.result()
            after = start + batch_size
            nxt = pool.submit(decode, after) if after < len(items) else None
            if grids:
                z, p = forward(grids)
                kept.extend(idx)
                zs.append(z)
                ps.append(p)
    return (kept, *_joined(model, zs, ps))


def predict_arrays(
    ckpt: Checkpoint | EmotionNet,
    images: Any,
    batch_size: int = 32,
    prep: Preprocessing | None = None,
    precision: str | None = None,
) -> np.ndarray:
    """Images -> softmax probs (N, K) float32 (see :func:`iter_input_batches` for inputs)."""
    return extract_features(ckpt, images, batch_size, prep, precision)[1]


def _model_and_prep(
    ckpt: Checkpoint | EmotionNet, prep: Preprocessing | None
) -> tuple[EmotionNet, Preprocessing]:
    if isinstance(ckpt, Checkpoint):
        return ckpt.model, prep or ckpt.preprocessing
    if prep is None:
        raise ValueError("pass prep= when calling with a bare EmotionNet (or pass a Checkpoint)")
    return ckpt, prep
