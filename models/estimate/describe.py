"""Dataset-level descriptors of a batch of site images relative to a labelled reference,
for the accuracy estimators (``models.estimate.base``). Pure numpy, label-free at check time.

A :class:`RefView` holds what the descriptors need from one clean labelled reference set
(accuracy, confidence and ATC thresholds, soft confusion for BBSE, quality-statistic
quantiles, a whitened PCA of the features); :func:`describe` turns a :class:`Batch` into
about 66 numbers in four groups: ``q_`` image statistics (shift of mean / q10 / q50 / q90 in
reference-sd units, log sd ratio), ``o_`` model outputs (confidence, entropy, ATC, predicted
histogram, soft BBSE), ``f_`` feature space (de-biased mean shift, trace ratio, Frechet, MMD^2,
nearest-neighbour ratio, norm ratio, first principal components) and ``inv_n``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Per-image statistics the descriptors use: name -> scale ("log": described in log units).
STAT_SCALE = {
    "brightness": "lin", "contrast": "lin", "sharpness": "log", "colourfulness": "lin",
    "warmth": "log", "illuminant_rg": "lin", "illuminant_bg": "lin", "blockiness": "log",
    "noise": "log",
}
# Floors for a reference standard deviation (a grey training domain has colourfulness sd 0).
STAT_SD_FLOOR = {"brightness": 0.02, "contrast": 0.01, "sharpness": 0.1, "colourfulness": 2.0,
                 "warmth": 0.02, "illuminant_rg": 0.02, "illuminant_bg": 0.02, "blockiness": 0.01,
                 "noise": 0.05}
N_PCA = 16
NBUCKETS = (75, 140)  # n < 75 -> bucket 0, < 140 -> 1, else 2


def n_bucket(n: int) -> int:
    return int(sum(n >= b for b in NBUCKETS))


@dataclass
class Batch:
    """What a check sees of n images, label-free: bottleneck features, softmax outputs and
    the quality statistics of STAT_SCALE (columns in that order)."""

    z: np.ndarray        # (n, D)
    probs: np.ndarray    # (n, K)
    stats: np.ndarray    # (n, len(STAT_SCALE))

    def __post_init__(self) -> None:
        if not (len(self.z) == len(self.probs) == len(self.stats)):
            raise ValueError(f"z, probs and stats have {len(self.z)}, {len(self.probs)} and "
                             f"{len(self.stats)} rows")
        if self.stats.ndim != 2 or self.stats.shape[1] != len(STAT_SCALE):
            raise ValueError(f"stats must be (n, {len(STAT_SCALE)}) in STAT_SCALE order")

    @classmethod
    def from_quality(cls, z: np.ndarray, probs: np.ndarray,
                     quality: Mapping[str, np.ndarray]) -> Batch:
        """From a quality mapping (``models.quality.batch_stats``); a missing statistic is a
        ValueError (the estimator cannot describe what it was not fitted with)."""
        missing = [k for k in STAT_SCALE if k not in quality]
        if missing:
            raise ValueError(f"quality statistics {missing} are missing")
        stats = np.stack([np.asarray(quality[k], np.float64) for k in STAT_SCALE], 1)
        return cls(np.asarray(z), np.asarray(probs), stats)

    def take(self, idx: Any) -> Batch:
        return Batch(self.z[idx], self.probs[idx], self.stats[idx])

    def __len__(self) -> int:
        return len(self.probs)


def _tstats(stats: np.ndarray, names: Sequence[str]) -> np.ndarray:
    cols = []
    for i, n in enumerate(STAT_SCALE):
        if n not in names:
            continue
        v = stats[:, i].astype(np.float64)
        cols.append(np.log(np.maximum(v, 1e-4)) if STAT_SCALE[n] == "log" else v)
    return np.stack(cols, 1)


def _entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.clip(p, 1e-12, 1))).sum(1) / math.log(p.shape[1])


def sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T, 0.0)


class RefView:
    """Everything a descriptor needs from one clean labelled reference set."""

    def __init__(self, batch: Batch, labels: np.ndarray,
                 basis: tuple[np.ndarray, np.ndarray, np.ndarray],
                 stat_names: Sequence[str] = tuple(STAT_SCALE)) -> None:
        self.stat_names = tuple(stat_names)
        p, y = batch.probs.astype(np.float64), np.asarray(labels)
        k = p.shape[1]
        self.k = k
        pred = p.argmax(1)
        correct = pred == y
        self.acc = float(correct.mean())
        self.acc_c = np.array([correct[y == c].mean() if (y == c).any() else self.acc for c in range(k)])
        self.prior = np.bincount(y, minlength=k) / len(y)
        conf = p.max(1)
        self.conf = float(conf.mean())
        self.ent = float(_entropy(p).mean())
        self.conf_q = np.quantile(conf, [0.25, 0.5, 0.75])
        # ATC thresholds: fraction of the reference above t equals its accuracy
        self.t_mc = float(np.quantile(conf, 1 - self.acc))
        self.t_ne = float(np.quantile(-_entropy(p), 1 - self.acc))
        self.pred_hist = np.bincount(pred, minlength=k) / len(y)
        # soft confusion C[i, j] = E[p_i(x) | y = j] (BBSE with soft outputs)
        self.C = np.stack([p[y == j].mean(0) if (y == j).any() else np.full(k, 1 / k) for j in range(k)], 1)
        # quality statistics
        q = _tstats(batch.stats, self.stat_names)
        self.q_mean = q.mean(0)
        self.q_sd = np.maximum(q.std(0), [STAT_SD_FLOOR[n] for n in self.stat_names])
        self.q_quant = np.quantile(q, [0.1, 0.5, 0.9], axis=0)
        # feature space: shared PCA basis (mean, components, scales) -> whitened coordinates
        self.mu0, self.comp, self.scale = basis
        w = self.whiten(batch.z)
        self.w = w
        self.w_mean = w.mean(0)
        self.w_cov = np.cov(w, rowvar=False)
        self.znorm = float(np.linalg.norm(batch.z, axis=1).mean())
        d2 = sqdist(w, w)
        self.bw = float(np.median(d2[np.triu_indices(len(w), 1)]))
        kxx = np.exp(-d2 / self.bw)
        n = len(w)
        self.kxx_mean = float((kxx.sum() - np.trace(kxx)) / (n * (n - 1)))
        np.fill_diagonal(d2, np.inf)
        self.nn_self = float(np.sqrt(d2.min(1)).mean())
        # Cholesky-free Frechet pieces
        ev, evec = np.linalg.eigh(self.w_cov)
        self.cov_sqrt = (evec * np.sqrt(np.maximum(ev, 0))) @ evec.T

    def whiten(self, z: np.ndarray) -> np.ndarray:
        return ((z - self.mu0) @ self.comp.T) / self.scale

    # --- plain arrays (saved with the model; no pickle) -------------------------------------
    _FLOATS = ("acc", "conf", "ent", "t_mc", "t_ne", "znorm", "bw", "kxx_mean", "nn_self")
    _ARRAYS = ("acc_c", "prior", "conf_q", "pred_hist", "C", "q_mean", "q_sd", "q_quant", "mu0",
               "comp", "scale", "w", "w_mean", "w_cov", "cov_sqrt")

    def state(self) -> dict[str, np.ndarray]:
        out = {f: np.asarray(getattr(self, f), np.float64) for f in self._FLOATS + self._ARRAYS}
        out["stat_names"] = np.asarray(list(self.stat_names))
        return out

    @classmethod
    def from_state(cls, s: Mapping[str, np.ndarray]) -> RefView:
        r = cls.__new__(cls)
        r.stat_names = tuple(str(x) for x in s["stat_names"])
        for f in cls._FLOATS:
            setattr(r, f, float(s[f]))
        for f in cls._ARRAYS:
            setattr(r, f, np.asarray(s[f], np.float64))
        r.k = len(r.prior)
        return r


def pca_basis(z: np.ndarray, d: int = N_PCA) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mu = z.mean(0)
    u, s, vt = np.linalg.svd(z - mu, full_matrices=False)
    sd = s[:d] / math.sqrt(len(z) - 1)
    return mu, vt[:d], np.maximum(sd, 1e-6)


def describe(ref: RefView, b: Batch) -> dict[str, float]:
    """Dataset-level descriptors of a batch relative to one reference (all label-free)."""
    out: dict[str, float] = {}
    n = len(b)
    out["inv_n"] = 1.0 / n
    # quality statistics: shifts in reference-sd units
    q = _tstats(b.stats, ref.stat_names)
    qm = q.mean(0)
    qq = np.quantile(q, [0.1, 0.5, 0.9], axis=0)
    qsd = q.std(0)
    for i, name in enumerate(ref.stat_names):
        s = ref.q_sd[i]
        out[f"q_{name}_mean"] = (qm[i] - ref.q_mean[i]) / s
        out[f"q_{name}_q10"] = (qq[0, i] - ref.q_quant[0, i]) / s
        out[f"q_{name}_q50"] = (qq[1, i] - ref.q_quant[1, i]) / s
        out[f"q_{name}_q90"] = (qq[2, i] - ref.q_quant[2, i]) / s
        out[f"q_{name}_lsd"] = math.log(max(qsd[i], 1e-3 * s) / s)
    # model outputs
    p = b.probs.astype(np.float64)
    conf = p.max(1)
    ent = _entropy(p)
    out["o_conf"] = float(conf.mean())  # absolute (average-confidence baseline)
    out["o_dconf"] = float(conf.mean()) - ref.conf
    out["o_dent"] = float(ent.mean()) - ref.ent
    cq = np.quantile(conf, [0.25, 0.5, 0.75])
    for j, nm in enumerate(("q25", "q50", "q75")):
        out[f"o_dconf_{nm}"] = float(cq[j] - ref.conf_q[j])
    out["o_atc_mc"] = float((conf > ref.t_mc).mean()) - ref.acc
    out["o_atc_ne"] = float((-ent > ref.t_ne).mean()) - ref.acc
    hist = np.bincount(p.argmax(1), minlength=ref.k) / n
    out["o_pred_tv"] = 0.5 * float(np.abs(hist - ref.pred_hist).sum())
    # BBSE (soft): C pi = mean prob  ->  accuracy under the estimated prior
    qbar = p.mean(0)
    try:
        pi = np.linalg.lstsq(ref.C, qbar, rcond=None)[0]
    except np.linalg.LinAlgError:
        pi = ref.prior.copy()
    pi = np.clip(pi, 0, None)
    pi = pi / pi.sum() if pi.sum() > 0 else ref.prior.copy()
    out["o_bbse_drop"] = float(ref.acc - pi @ ref.acc_c)
    out["o_bbse_tv"] = 0.5 * float(np.abs(pi - ref.prior).sum())
    # feature space (whitened PCA of the reference z)
    w = ref.whiten(b.z)
    wm = w.mean(0)
    dm = wm - ref.w_mean
    out["f_mean2"] = float(dm @ dm) - ref.w.shape[1] * (1.0 / n + 1.0 / len(ref.w))  # de-biased
    cov = np.cov(w, rowvar=False)
    out["f_var_ratio"] = math.log(max(np.trace(cov), 1e-9) / max(np.trace(ref.w_cov), 1e-9))
    m = ref.cov_sqrt @ cov @ ref.cov_sqrt
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    fr = float(dm @ dm + np.trace(cov) + np.trace(ref.w_cov) - 2 * np.sqrt(np.maximum(ev, 0)).sum())
    out["f_frechet"] = math.log1p(max(fr, 0.0))
    d2 = sqdist(w, ref.w)
    kyy_d2 = sqdist(w, w)
    kyy = np.exp(-kyy_d2 / ref.bw)
    kyy_mean = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    kxy_mean = float(np.exp(-d2 / ref.bw).mean())
    out["f_mmd2"] = float(ref.kxx_mean + kyy_mean - 2 * kxy_mean)
    out["f_nn_ratio"] = math.log(float(np.sqrt(d2.min(1)).mean()) / ref.nn_self)
    out["f_znorm"] = math.log(float(np.linalg.norm(b.z, axis=1).mean()) / ref.znorm)
    for j in range(3):
        out[f"f_pc{j}"] = float(dm[j])
    return out


# Descriptor groups (names are prefixes / exact keys of describe()).
def group_names(names: list[str], groups: str) -> list[str]:
    """groups: any of 'Q' (quality), 'O' (outputs), 'F' (features), 'N' (1/n); e.g. 'QOFN'.
    'q' = quality means only (9 values)."""
    keep = []
    for nm in names:
        if nm == "inv_n" and "N" in groups:
            keep.append(nm)
        elif nm.startswith("q_") and ("Q" in groups or ("q" in groups and nm.endswith("_mean"))):
            keep.append(nm)
        elif nm.startswith("o_") and "O" in groups and nm != "o_conf":
            keep.append(nm)
        elif nm.startswith("f_") and "F" in groups:
            keep.append(nm)
    return keep


__all__ = ["N_PCA", "NBUCKETS", "STAT_SCALE", "Batch", "RefView", "describe", "group_names",
           "n_bucket", "pca_basis", "sqdist"]
