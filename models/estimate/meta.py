"""The regression estimator: dataset-level descriptors -> accuracy drop, learnt on meta-sets.

``MetaGBM`` is gradient boosting (300 trees of depth 3, Huber loss) on every descriptor group
(image statistics, model outputs, feature space, 1/n), robustly standardised. Fitted with
scikit-learn, stored and evaluated as plain arrays (no pickle): :func:`gbm_to_arrays` /
:func:`gbm_predict_arrays` give the same predictions as the fitted model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from models.estimate.base import Estimator, robust_scale
from models.estimate.describe import group_names


class MetaGBM(Estimator):
    name = "meta-gbm"
    trainable = True
    uses_novelty = True
    GROUPS = "QOFN"

    def __init__(self, interval: str = "knn", n_estimators: int = 300, depth: int = 3,
                 lr: float = 0.05, leaf: int = 10) -> None:
        super().__init__(interval)
        self.params = {"n_estimators": n_estimators, "depth": depth, "lr": lr, "leaf": leaf}

    def _kwargs(self) -> dict[str, Any]:
        return {**super()._kwargs(), **self.params}

    def _fit_point(self, X: np.ndarray, D: np.ndarray) -> None:
        from sklearn.ensemble import GradientBoostingRegressor

        self.cols = np.array([self.names.index(n) for n in group_names(self.names, self.GROUPS)],
                             dtype=np.int64)
        self.mu, self.sd = robust_scale(X[:, self.cols])
        p = self.params
        reg = GradientBoostingRegressor(
            n_estimators=p["n_estimators"], max_depth=p["depth"], learning_rate=p["lr"],
            subsample=0.8, loss="huber", min_samples_leaf=p["leaf"], random_state=0,
        ).fit(self._std(X), D)
        self.trees = gbm_to_arrays(reg)
        self._reg: Any = reg  # only while fitting (out-of-fold predictions); never saved

    def _std(self, X: np.ndarray) -> np.ndarray:
        return np.clip((X[:, self.cols] - self.mu) / self.sd, -50, 50)

    def _point(self, X: np.ndarray) -> np.ndarray:
        reg = getattr(self, "_reg", None)
        if reg is not None and len(X) > 16:
            return reg.predict(self._std(X))
        return gbm_predict_arrays(self.trees, self._std(X))

    def _point_state(self) -> dict[str, np.ndarray]:
        return {"cols": self.cols, "mu": self.mu, "sd": self.sd,
                **{"tree." + k: v for k, v in self.trees.items()}}

    def _load_point(self, s: Mapping[str, np.ndarray]) -> None:
        self.cols, self.mu, self.sd = (np.asarray(s[k]) for k in ("cols", "mu", "sd"))
        self.trees = {k[5:]: np.asarray(v) for k, v in s.items() if k.startswith("tree.")}
        self._reg = None


def gbm_to_arrays(reg: Any) -> dict[str, np.ndarray]:
    """A fitted sklearn GradientBoostingRegressor -> flat arrays: trees concatenated, node ids
    offset so children index the flat arrays; predict(x) = init + lr * sum_t value[leaf_t(x)]."""
    feats, thr, left, right, val, roots = [], [], [], [], [], []
    off = 0
    for est in reg.estimators_[:, 0]:
        t = est.tree_
        roots.append(off)
        feats.append(t.feature)
        thr.append(t.threshold)
        left.append(np.where(t.children_left >= 0, t.children_left + off, -1))
        right.append(np.where(t.children_right >= 0, t.children_right + off, -1))
        val.append(t.value[:, 0, 0])
        off += t.node_count
    init = float(np.ravel(reg.init_.predict(np.zeros((1, reg.n_features_in_))))[0])
    return {"feature": np.concatenate(feats).astype(np.int32), "threshold": np.concatenate(thr),
            "left": np.concatenate(left).astype(np.int32),
            "right": np.concatenate(right).astype(np.int32), "value": np.concatenate(val),
            "roots": np.asarray(roots, np.int32), "init": np.asarray([init]),
            "lr": np.asarray([reg.learning_rate])}


def gbm_predict_arrays(a: Mapping[str, np.ndarray], X: np.ndarray) -> np.ndarray:
    """Predictions of :func:`gbm_to_arrays` trees for rows ``X`` (all trees at once per level)."""
    feature, threshold, left, right = a["feature"], a["threshold"], a["left"], a["right"]
    out = np.empty(len(X))
    for i, x in enumerate(np.asarray(X, np.float64)):
        node = a["roots"].astype(np.int64)
        while True:
            inner = left[node] >= 0
            if not inner.any():
                break
            n = node[inner]
            go_left = x[feature[n]] <= threshold[n]
            node[inner] = np.where(go_left, left[n], right[n])
        out[i] = a["init"][0] + a["lr"][0] * float(a["value"][node].sum())
    return out


__all__ = ["MetaGBM", "gbm_predict_arrays", "gbm_to_arrays"]
