"""The drift benchmark's data: a model trained on Emotion6 photos and the features of every
reference, test, condition and CK+48 batch, computed once and cached as .npz files."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.quality import STAT_NAMES, image_stats
from models.sim.conditions import CONDITIONS, apply_condition

ALPHA = 0.05
SIZES = (20, 50, 100, 200)
# Evidently's embeddings method costs ~1-2 s a call (100 sklearn ROC AUCs of random guesses when
# the reference has < 1000 rows), so it runs at two sizes and on fewer trials.
EMB_SIZES = (50, 200)
SPLIT_SEED = 0
REF_FRAC, TEST_FRAC = 0.25, 0.35
N_FACES = 300
PRIOR_CLASSES = ("joy", "sadness")  # the prior-shift site sees mostly these two classes
PRIOR_SHARE = 0.7


@dataclass
class Feats:
    z: np.ndarray  # (N, D) float32 bottleneck features
    probs: np.ndarray  # (N, K) float32 softmax
    q: np.ndarray  # (N, len(STAT_NAMES)) quality statistics of the image as stored
    labels: np.ndarray  # (N,) int, -1 when unknown

    def take(self, idx: np.ndarray) -> Feats:
        return Feats(self.z[idx], self.probs[idx], self.q[idx], self.labels[idx])

    def quality(self) -> dict[str, np.ndarray]:
        return {k: self.q[:, i] for i, k in enumerate(STAT_NAMES)}

    def save(self, path: Path) -> None:
        np.savez(path, z=self.z, probs=self.probs, q=self.q, labels=self.labels)

    @classmethod
    def load(cls, path: Path) -> Feats:
        with np.load(path) as f:
            return cls(f["z"], f["probs"], f["q"], f["labels"])


def concat(parts: Sequence[Feats]) -> Feats:
    return Feats(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("z", "probs", "q", "labels")))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def extract(ckpt, paths: Sequence[Path], labels: np.ndarray,
             transform: Callable | None = None, chunk: int = 64) -> Feats:
    """Decode, optionally transform, then quality statistics + model features, in chunks."""
    from models.evaluate import extract_features
    from models.images import load_rgb

    zs, ps, qs = [], [], []
    for s in range(0, len(paths), chunk):
        imgs = [load_rgb(p) for p in paths[s:s + chunk]]
        if transform is not None:
            imgs = [transform(im, s + i) for i, im in enumerate(imgs)]
        qs.append(np.asarray([[image_stats(im)[k] for k in STAT_NAMES] for im in imgs]))
        z, p = extract_features(ckpt, imgs, batch_size=32)
        zs.append(z)
        ps.append(p)
    return Feats(np.concatenate(zs), np.concatenate(ps), np.concatenate(qs), np.asarray(labels))


class FeatureStore:
    """Everything the benchmark needs, computed once and cached as .npz files."""

    def __init__(self, data_dir: Path, cache_root: Path, train_crops: int) -> None:
        from models.data import read_image_folder, three_way_split

        self.data_dir = data_dir
        self.e6 = read_image_folder(data_dir / "emotion6")
        self.classes = list(self.e6.classes)
        tr, ref, te = three_way_split(self.e6.records, REF_FRAC, TEST_FRAC, SPLIT_SEED)
        self.split = {"train": tr, "reference": ref, "test": te}
        key = hashlib.sha1(json.dumps(
            {"split": [SPLIT_SEED, REF_FRAC, TEST_FRAC], "n": len(self.e6), "crops": train_crops,
             "v": 1}).encode()).hexdigest()[:10]
        self.dir = cache_root / f"e6-{key}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.train_crops = train_crops
        self._ckpt = None
        self.train_info: dict = {}

    def checkpoint(self):
        from models.network import load_checkpoint, save_checkpoint

        if self._ckpt is not None:
            return self._ckpt
        path, info = self.dir / "model.pt", self.dir / "train.json"
        if path.exists():
            self._ckpt = load_checkpoint(path)
            self.train_info = json.loads(info.read_text())
            return self._ckpt
        from models.train import TrainConfig, train_source

        log(f"training on {len(self.split['train'])} Emotion6 photos (cached afterwards) ...")
        res = train_source(self.e6.subset(self.split["train"]), config=TrainConfig(crops=self.train_crops))
        save_checkpoint(res.checkpoint, path)
        self.train_info = {"val_accuracy": res.val_metrics.accuracy, "best_epoch": res.best_epoch,
                           "n_train": res.n_train, "n_val": res.n_val,
                           "seconds": round(res.total_seconds, 1)}
        info.write_text(json.dumps(self.train_info))
        self._ckpt = res.checkpoint
        return self._ckpt

    def _cached(self, name: str, make: Callable[[], Feats]) -> Feats:
        path = self.dir / f"{name}.npz"
        if path.exists():
            return Feats.load(path)
        t = time.perf_counter()
        f = make()
        f.save(path)
        log(f"features {name}: {len(f.z)} images in {time.perf_counter() - t:.0f} s")
        return f

    def _records(self, part: str):
        recs = [self.e6.records[i] for i in self.split[part]]
        return [r.path for r in recs], np.asarray([r.label for r in recs])

    def clean(self, part: str) -> Feats:
        return self._cached(part, lambda: extract(self.checkpoint(), *self._records(part)))

    def condition(self, name: str, severity: int) -> Feats:
        """The TEST part with a condition applied to every image (aligned with clean('test'))."""
        ci = list(CONDITIONS).index(name)

        def tf(im, i):
            return apply_condition(im, name, severity, np.random.default_rng([SPLIT_SEED, ci, severity, i]))

        return self._cached(f"test-{name}-{severity}",
                            lambda: extract(self.checkpoint(), *self._records("test"), transform=tf))

    def faces(self) -> Feats:
        from models.data import read_image_folder

        def make() -> Feats:
            ck = read_image_folder(self.data_dir / "ckplus48")
            idx = np.sort(np.random.default_rng(SPLIT_SEED).choice(len(ck), N_FACES, replace=False))
            paths = [ck.records[i].path for i in idx]
            return extract(self.checkpoint(), paths, np.full(len(paths), -1))

        return self._cached("faces-ckplus48", make)




__all__ = ["Feats", "FeatureStore", "concat", "extract", "log"]
