"""The meta-sets an accuracy estimator is fitted on: the labelled held-out set under many
random shifts (``models.sim.shifts``), cut into site-sized samples and described label-free
(``models.estimate.describe``), each with its target: the spec's paired population drop.

The held-out set is split into two stratified halves A/B; a meta-set drawn from the shifted
images of half A is described against the clean half B and vice versa (never against its own
clean images: that would make clean sites look tighter than they can be). Class-prior-shifted
draws teach the regression what a changed mix of emotions does. Pure numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.estimate.describe import Batch, RefView, describe, pca_basis


@dataclass
class MetaBank:
    """Meta-sets drawn from a bank of shifted calibration sets, with descriptors and targets.

    ref: clean calibration Batch; labels (N,); bank: list of Batches (each (N, ...), paired
    with ref image by image); spec_groups: one label per bank entry (e.g. its primitive set,
    for grouped cross-validation); spec_prims: set of primitive names per bank entry.
    """

    names: list[str]
    X: np.ndarray            # (M, d) descriptors (each meta-set described against the other half)
    D: np.ndarray            # (M,) target drop (paired population drop of the spec / prior)
    spec: np.ndarray         # (M,) bank entry index
    n: np.ndarray            # (M,) meta-set size
    prior_shift: np.ndarray  # (M,) bool
    half: np.ndarray         # (M,) 0/1: drawn from half A (described vs B) or B (vs A)
    refs: list[RefView]      # [view of half A, view of half B]
    acc_ref: float
    n_ref: int
    spec_prims: list[frozenset[str]]
    spec_drop: np.ndarray    # (K,) uniform-prior population drop of each bank entry
    full: RefView | None = None  # the whole calibration set (baselines use it at check time)
    info: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def build(ref: Batch, labels: np.ndarray, bank: list[Batch], spec_prims: list[frozenset[str]],
              seed: int = 0, sizes: Sequence[int | None] = (50, 100, None),
              draws: Sequence[int] = (3, 2, 1), prior_draws: int = 3,
              keep: np.ndarray | None = None) -> MetaBank:
        """sizes: meta-set sizes (None = the whole half); draws: uniform draws per size and half;
        prior_draws: class-prior-shifted draws (random size, Dirichlet prior) per half.
        keep: optional bool mask over bank entries (leave-one-primitive-out fits)."""
        rng = np.random.default_rng(seed)
        labels = np.asarray(labels)
        N = len(labels)
        # stratified halves
        if N < 8:
            raise ValueError(f"an accuracy estimator needs at least 8 labelled held-out images, "
                             f"got {N}")
        if not bank:
            raise ValueError("the shift bank is empty")
        split: list[list[int]] = [[], []]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            split[0] += idx[::2].tolist()
            split[1] += idx[1::2].tolist()
        halves = [np.sort(np.asarray(h)) for h in split]
        basis = pca_basis(ref.z.astype(np.float64))
        refs = [RefView(ref.take(h), labels[h], basis) for h in halves]
        correct_ref = ref.probs.argmax(1) == labels
        acc_ref = float(correct_ref.mean())
        k = ref.probs.shape[1]
        rows: list[dict[str, float]] = []
        D: list[float] = []
        spec: list[int] = []
        nn: list[int] = []
        ps: list[bool] = []
        hv: list[int] = []
        spec_drop = np.zeros(len(bank))
        for j, b in enumerate(bank):
            corr = b.probs.argmax(1) == labels
            spec_drop[j] = acc_ref - corr.mean()
            if keep is not None and not keep[j]:
                continue
            acc_c = np.array([corr[labels == c].mean() if (labels == c).any() else corr.mean()
                              for c in range(k)])
            for h in (0, 1):
                own, other = halves[h], refs[1 - h]
                for size, nd in zip(sizes, draws, strict=True):
                    m = len(own) if size is None else min(size, len(own))
                    for _ in range(nd if size is not None else 1):
                        idx = own if size is None else rng.choice(own, size=m, replace=False)
                        rows.append(describe(other, b.take(idx)))
                        D.append(spec_drop[j])
                        spec.append(j)
                        nn.append(m)
                        ps.append(False)
                        hv.append(h)
                for _ in range(prior_draws):
                    pi = _sample_prior(k, rng)
                    m = int(rng.choice([min(50, len(own)), min(100, len(own)), len(own)]))
                    idx = own[_reweight(labels[own], m, pi, rng)]
                    rows.append(describe(other, b.take(idx)))
                    D.append(acc_ref - float(pi @ acc_c))
                    spec.append(j)
                    nn.append(m)
                    ps.append(True)
                    hv.append(h)
        names = list(rows[0])
        X = np.array([[r[nm] for nm in names] for r in rows])
        return MetaBank(names, X, np.array(D), np.array(spec), np.array(nn), np.array(ps),
                        np.array(hv), refs, acc_ref, N, list(spec_prims), spec_drop,
                        full=RefView(ref, labels, basis))

    def cols(self, names: list[str]) -> np.ndarray:
        return np.array([self.names.index(nm) for nm in names], dtype=np.int64)


def _sample_prior(k: int, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.5:  # one class up-weighted by a random factor
        pi = np.ones(k)
        pi[rng.integers(k)] = math.exp(rng.uniform(math.log(1.5), math.log(5.0)))
        return pi / pi.sum()
    alpha = math.exp(rng.uniform(math.log(0.7), math.log(10.0)))
    return rng.dirichlet(np.full(k, alpha))


def _reweight(labels: np.ndarray, n: int, pi: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    counts = np.bincount(labels, minlength=len(pi)).astype(float)
    w = pi[labels] / np.maximum(counts[labels], 1.0)
    return rng.choice(len(labels), size=n, replace=True, p=w / w.sum())


__all__ = ["MetaBank"]
