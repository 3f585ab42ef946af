"""Is a site like anything the estimator was fitted on? (``verifiable`` of an estimate.)

Two checks, each calibrated on the bank's own meta-sets:

1. descriptor novelty: the distance of the site's robustly standardised descriptor vector
   (quality means, model outputs, feature shifts) to its k-th nearest bank meta-set, against
   the same distance for bank meta-sets measured leave-one-bank-entry-out (quantile ``q``,
   per site-size bucket, times ``margin``);
2. unexplained feature shift: the feature/output shift predicted from the image-statistics
   shift by a ridge regression fitted on the bank; a residual beyond the bank's own
   cross-validated residuals means the content changed, not the camera (faces -> photos).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from models.estimate.describe import group_names, n_bucket, sqdist

EXPLAINED = ("f_mean2", "f_mmd2", "f_frechet", "f_nn_ratio", "o_dconf", "o_dent")
RIDGE_ALPHA = 10.0


def _ridge(X: np.ndarray, Y: np.ndarray, alpha: float = RIDGE_ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression with an unpenalised intercept: (coef (d, m), intercept (m,))."""
    xm, ym = X.mean(0), Y.mean(0)
    Xc, Yc = X - xm, Y - ym
    coef = np.linalg.solve(Xc.T @ Xc + alpha * np.eye(X.shape[1]), Xc.T @ Yc)
    return coef, ym - xm @ coef


def _fill(thr: np.ndarray) -> np.ndarray:
    """A size bucket without meta-sets takes the threshold of the nearest bucket that has some."""
    ok = np.flatnonzero(np.isfinite(thr))
    if not len(ok):
        return thr
    return np.array([thr[ok[np.argmin(np.abs(ok - b))]] for b in range(len(thr))])


def _scale(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = np.median(X, 0)
    iqr = np.subtract(*np.quantile(X, [0.75, 0.25], axis=0))
    return mu, np.where(iqr > 1e-9, iqr / 1.349, np.maximum(X.std(0), 1e-6))


class Novelty:
    def __init__(self, k: int = 5, q: float = 0.995, margin: float = 1.25) -> None:
        self.k, self.q, self.margin = k, q, margin

    def fit(self, meta: Any) -> Novelty:
        names = list(meta.names)
        self.cols = meta.cols(group_names(names, "qOF"))
        self.mu, self.sd = _scale(meta.X[:, self.cols])
        Z = self._z(meta.X)
        self.Z = Z.astype(np.float32)
        self.bucket = np.array([n_bucket(int(n)) for n in meta.n], dtype=np.int64)
        d = np.sqrt(sqdist(Z, Z))
        d[meta.spec[:, None] == meta.spec[None]] = np.inf  # leave the own bank entry out
        kth = np.sort(d, 1)[:, min(self.k, d.shape[1]) - 1]
        kth = np.where(np.isfinite(kth), kth, np.nan)
        self.thr = np.array([np.nanquantile(kth[self.bucket == b], self.q) * self.margin
                             if np.isfinite(kth[self.bucket == b]).any() else np.inf
                             for b in range(3)])
        self.thr = _fill(self.thr)
        self.q_cols = meta.cols(group_names(names, "QN"))
        self.f_cols = meta.cols([n for n in names if n in EXPLAINED])
        Xq, Xf = meta.X[:, self.q_cols], meta.X[:, self.f_cols]
        self.q_mu, self.q_sd = Xq.mean(0), Xq.std(0) + 1e-9
        self.f_mu, self.f_sd = Xf.mean(0), Xf.std(0) + 1e-9
        Zq, Zf = (Xq - self.q_mu) / self.q_sd, (Xf - self.f_mu) / self.f_sd
        self.coef, self.icpt = _ridge(Zq, Zf)
        rng = np.random.default_rng(1)  # grouped 5-fold CV residuals of the explained shift
        specs = np.unique(meta.spec)
        fold_of = dict(zip(specs.tolist(), (rng.permutation(len(specs)) % 5).tolist(), strict=True))
        f = np.array([fold_of[s] for s in meta.spec.tolist()])
        rn = np.full(len(f), np.nan)
        for i in range(5):
            if (f == i).any() and (f != i).sum() > Zq.shape[1]:
                c, b0 = _ridge(Zq[f != i], Zf[f != i])
                rn[f == i] = np.linalg.norm(Zf[f == i] - (Zq[f == i] @ c + b0), axis=1)
        self.res_thr = np.array([np.nanquantile(rn[self.bucket == b], self.q) * self.margin
                                 if np.isfinite(rn[self.bucket == b]).any() else np.inf
                                 for b in range(3)])
        self.res_thr = _fill(self.res_thr)
        return self

    def _z(self, X: np.ndarray) -> np.ndarray:
        return np.clip((X[:, self.cols] - self.mu) / self.sd, -1e3, 1e3)

    def scores(self, X: np.ndarray) -> tuple[float, float]:
        d = np.sqrt(sqdist(self._z(X), self.Z.astype(np.float64)))
        kth = float(np.mean(np.sort(d, 1)[:, min(self.k, d.shape[1]) - 1]))
        Zq = (X[:, self.q_cols] - self.q_mu) / self.q_sd
        Zf = (X[:, self.f_cols] - self.f_mu) / self.f_sd
        r = float(np.mean(np.linalg.norm(Zf - (Zq @ self.coef + self.icpt), axis=1)))
        return kth, r

    def check(self, X: np.ndarray, n: int) -> tuple[bool, str]:
        b = n_bucket(n)
        kth, r = self.scores(X)
        reasons = []
        if kth > self.thr[b]:
            reasons.append(f"the site is unlike every simulated shift (distance {kth:.1f} > "
                           f"{self.thr[b]:.1f})")
        if r > self.res_thr[b]:
            reasons.append(f"the feature/output shift is not explained by the image statistics "
                           f"(residual {r:.1f} > {self.res_thr[b]:.1f}): the content changed, "
                           "not only the camera")
        return not reasons, "; ".join(reasons)

    _ARRAYS = ("cols", "mu", "sd", "Z", "bucket", "thr", "q_cols", "f_cols", "q_mu", "q_sd",
               "f_mu", "f_sd", "coef", "icpt", "res_thr")

    def state(self) -> dict[str, np.ndarray]:
        return {**{k: np.asarray(getattr(self, k)) for k in self._ARRAYS},
                "params": np.asarray([self.k, self.q, self.margin], np.float64)}

    @classmethod
    def from_state(cls, s: Mapping[str, np.ndarray]) -> Novelty:
        k, q, margin = (float(v) for v in s["params"])
        nov = cls(int(k), q, margin)
        for name in cls._ARRAYS:
            setattr(nov, name, np.asarray(s[name]))
        return nov


__all__ = ["Novelty"]
