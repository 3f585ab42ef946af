"""On-disk cache of frozen-backbone activations (``EmotionNet.frozen_forward``).

The frozen part of every model in a lineage is the same (adaptation never changes it, except
AdaBN with scope "all", which the caller handles), so activations are keyed by a hash of the
frozen weights + preprocessing, and by the image's sha256. Re-adapting a site a second time, or
another site from the same source model, decodes and forwards no source image again.
Stored as float16 ``.npy`` (half the disk; activations are post-ReLU6/BN values where fp16's
3 significant digits are far below the noise of training).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.engine import frozen_runner
from tasks.ingest.storage import file_sha256


def frozen_key(ckpt: Any) -> str:
    """Identity of a checkpoint's frozen part + input pipeline (16 hex chars)."""
    h = hashlib.sha256()
    h.update(repr(sorted(ckpt.preprocessing.to_dict().items())).encode())
    cfg = ckpt.model.config
    h.update(f"{cfg.backbone}|{cfg.img_size}|{cfg.trainable_blocks}".encode())
    for name, t in sorted(ckpt.model.frozen.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_activations(ckpt: Any, items: Sequence[tuple[str, str | Path]], cache_dir: Path,
                       batch_size: int = 32, progress: Any = None) -> torch.Tensor:
    """Frozen activations (N, C, s, s) float32 of ``(sha256, path)`` images, computing and
    storing only the missing ones. Unreadable images raise (callers pass validated images)."""
    from models.images import load_rgb

    root = Path(cache_dir) / "frozen" / frozen_key(ckpt)
    paths = [root / sha[:2] / f"{sha}.npy" for sha, _ in items]
    out: list[np.ndarray | None] = [None] * len(items)
    missing = []
    for i, p in enumerate(paths):
        if p.is_file():
            try:
                out[i] = np.load(p)
                continue
            except (OSError, ValueError):  # a torn file from a killed run: recompute
                pass
        missing.append(i)
    model, prep = ckpt.model, ckpt.preprocessing
    model.eval()
    done = 0
    run = frozen_runner(model, prep.img_size, ckpt.engine, Path(cache_dir) / "onnx",
                        n_images=len(missing))
    for s in range(0, len(missing), batch_size):
        idx = missing[s:s + batch_size]
        grid = np.stack([prep.to_array(load_rgb(items[i][1])) for i in idx])
        h = run(prep.normalize(grid)).numpy().astype(np.float16)
        for j, i in enumerate(idx):
            out[i] = h[j]
            _atomic_save(paths[i], h[j])
        done += len(idx)
        if progress is not None:
            progress(done, len(missing))
    if not out:
        raise ValueError("no images to compute activations for")
    return torch.from_numpy(np.stack(out).astype(np.float32))


def record_items(records: Sequence[Any]) -> list[tuple[str, str]]:
    """``(sha256, path)`` for labelled records (hashing is ~1 ms per photo)."""
    return [(file_sha256(r.path), str(r.path)) for r in records]
