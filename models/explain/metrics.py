"""Scores for explanations: faithfulness, localisation, stability, champion-vs-challenger gate.

* Faithfulness -- deletion / insertion AUC: remove (insert) regions or pixels in decreasing
  order of attribution and record the target probability; the area under that curve (x in
  [0, 1]) should be low for deletion and high for insertion when the map is faithful.
* Localisation on images with a ground-truth mask (``models.sim.synthetic``): pointing game and
  mask energy (share of the positive attribution inside the mask).
* Stability: Spearman rank correlation and top-k overlap between two maps / region vectors,
  under input perturbations (``perturbation_stability``) or across models (``model_agreement``).
* ``explanation_gate``: does a challenger still look where the champion looks, and are its
  explanations as faithful? Returns ``{name: {"passed", "value", "threshold"}}``.

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot state, no backend switch,
nothing saved here): call ``fig.savefig`` where file I/O is allowed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy.stats import rankdata

from models.catalog import DEFAULT_EXPLAINER
from models.explain.base import (
    Attribution,
    BaselineSpec,
    Explainer,
    eval_mode,
    make_baseline,
    make_explainer,
)

Model = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------
# Faithfulness
# --------------------------------------------------------------------------------------------
@dataclass
class Faithfulness:
    deletion_auc: np.ndarray  # (N,) lower is better
    insertion_auc: np.ndarray  # (N,) higher is better
    deletion_curves: np.ndarray  # (N, T+1) p_target after removing 0..T units
    insertion_curves: np.ndarray  # (N, T+1)
    model_calls: int

    @property
    def score(self) -> float:
        """Mean insertion AUC - mean deletion AUC (higher is more faithful)."""
        return float(self.insertion_auc.mean() - self.deletion_auc.mean())


def deletion_insertion(
    model: Model,
    images: torch.Tensor,
    attribution: Attribution,
    baseline: BaselineSpec = "blur",
    unit: Literal["regions", "pixels"] = "regions",
    steps: int = 32,
    batch_size: int = 64,
    blur_sigma: float = 0.1,
) -> Faithfulness:
    """Deletion and insertion curves of ``model`` for the ranking given by ``attribution``.

    ``unit="regions"`` removes whole regions of the attribution (R steps; the same granularity
    for every method, so methods are compared fairly); ``"pixels"`` ranks pixels by the map and
    removes ``H*W/steps`` of them per step. The probability is that of ``attribution.targets``.
    AUC by the trapezoid rule with x in [0, 1].
    """
    x = _check_images(images)
    n, _, h, w = x.shape
    if attribution.maps.shape != (n, h, w):
        raise ValueError(f"attribution maps {attribution.maps.shape} do not match images "
                         f"{(n, h, w)}")
    if unit not in ("regions", "pixels"):
        raise ValueError(f"unit must be 'regions' or 'pixels', got {unit!r}")
    base = make_baseline(x, baseline, blur_sigma)
    if unit == "regions":
        lm = attribution.leaf_map  # (H, W)
        order = np.argsort(-attribution.region_values, axis=1, kind="stable")  # (N, R)
        n_units = attribution.region_values.shape[1]
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(n_units)[None].repeat(n, 0), axis=1)
        pix_rank = np.stack([rank[i][lm] for i in range(n)])  # (N, H, W) rank of the pixel's region
        cut = np.arange(n_units + 1)  # remove units with rank < cut
    else:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        flat = attribution.maps.reshape(n, -1)
        order = np.argsort(-flat, axis=1, kind="stable")
        pix_rank = np.empty_like(order)
        np.put_along_axis(pix_rank, order, np.arange(h * w)[None].repeat(n, 0), axis=1)
        pix_rank = pix_rank.reshape(n, h, w)
        cut = np.round(np.linspace(0, h * w, steps + 1)).astype(np.int64)
    targets = attribution.targets
    dele = np.zeros((n, len(cut)))
    ins = np.zeros((n, len(cut)))
    with eval_mode(model):
        from models.engine import TORCH_BATCH, logits_runner

        run = logits_runner(model, "fp32", min(batch_size, TORCH_BATCH["fp32"]))
        for i in range(n):
            removed = torch.as_tensor(pix_rank[i][None] < cut[:, None, None])  # (T+1, H, W)
            m = removed.unsqueeze(1).to(x.dtype)
            dele[i] = _probs(run, x[i] + m * (base[i] - x[i]), int(targets[i]))
            ins[i] = _probs(run, base[i] + m * (x[i] - base[i]), int(targets[i]))
    xs = cut / cut[-1]
    return Faithfulness(np.trapezoid(dele, xs, axis=1), np.trapezoid(ins, xs, axis=1), dele, ins,
                        int(2 * n * len(cut)))


# --------------------------------------------------------------------------------------------
# Localisation against ground-truth masks
# --------------------------------------------------------------------------------------------
def pointing_game(maps: np.ndarray, masks: np.ndarray, tolerance: int = 0) -> np.ndarray:
    """(N,) bool: is the maximum of each map inside the mask?

    The maximum of a region-level map is a whole region, so a hit needs at least half of the
    pixels at the maximum to lie in the mask (dilated by ``tolerance`` pixels); for a
    pixel-level map that is the usual "top pixel in the mask".
    """
    maps, masks = _check_maps_masks(maps, masks)
    if tolerance > 0:
        masks = _dilate(masks, tolerance)
    hits = np.zeros(maps.shape[0], bool)
    for i in range(maps.shape[0]):
        m = maps[i]
        top = m >= m.max() - 1e-12 * max(1.0, abs(float(m.max())))
        hits[i] = masks[i][top].mean() >= 0.5
    return hits


def mask_energy(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(N,) share of the positive attribution that falls inside the mask (0 if none positive)."""
    maps, masks = _check_maps_masks(maps, masks)
    pos = np.clip(maps.astype(np.float64), 0, None)
    tot = pos.sum(axis=(1, 2))
    inside = (pos * masks).sum(axis=(1, 2))
    return np.divide(inside, tot, out=np.zeros_like(tot), where=tot > 0)


# --------------------------------------------------------------------------------------------
# Stability / agreement between two explanations
# --------------------------------------------------------------------------------------------
def rank_correlation(a: np.ndarray | Attribution, b: np.ndarray | Attribution) -> np.ndarray:
    """(N,) Spearman correlation between paired rows (region vectors or flattened maps)."""
    a2, b2 = _pair(a, b)
    ra = rankdata(a2, axis=1)
    rb = rankdata(b2, axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    den = np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    # a constant vector has no ranking: correlation 0 (not NaN), except two constants (1)
    out = np.divide((ra * rb).sum(1), den, out=np.zeros(ra.shape[0]), where=den > 0)
    both_const = ((ra**2).sum(1) == 0) & ((rb**2).sum(1) == 0)
    out[both_const] = 1.0
    return out


def topk_overlap(a: np.ndarray | Attribution, b: np.ndarray | Attribution, k: int) -> np.ndarray:
    """(N,) |top-k(a) & top-k(b)| / k over paired rows (largest values; ties by position)."""
    a2, b2 = _pair(a, b)
    if not 1 <= k <= a2.shape[1]:
        raise ValueError(f"k must be in [1, {a2.shape[1]}], got {k}")
    ta = np.argsort(-a2, axis=1, kind="stable")[:, :k]
    tb = np.argsort(-b2, axis=1, kind="stable")[:, :k]
    return np.array([len(set(x) & set(y)) / k for x, y in zip(ta, tb, strict=True)])


@dataclass
class Agreement:
    rank_correlation: np.ndarray  # (N,)
    topk_overlap: np.ndarray  # (N,)
    k: int
    a: Attribution
    b: Attribution

    @property
    def mean_rank_correlation(self) -> float:
        return float(self.rank_correlation.mean())

    @property
    def mean_topk_overlap(self) -> float:
        return float(self.topk_overlap.mean())


def _default_k(n_regions: int) -> int:
    # top eighth of the regions (2 of 16, 8 of 64): the part of the image a reader looks at;
    # larger k counts more near-zero regions whose order is noise
    return max(1, n_regions // 8)


def perturbation_stability(
    explainer: Explainer,
    images: torch.Tensor,
    perturb: Literal["noise", "brightness", "shift"] = "noise",
    strength: float | None = None,
    target: int | Sequence[int] | None = None,
    baseline: BaselineSpec = "blur",
    k: int | None = None,
    seed: int = 0,
) -> Agreement:
    """Agreement of the explanation of ``images`` with that of a perturbed copy (same target).

    Perturbations act in normalised space (EfficientNet-Lite scaling: 1.0 = half the [0,1]
    range): ``noise`` adds N(0, strength^2) (default 0.05), ``brightness`` adds ``strength``
    (default 0.1 = +5% brightness), ``shift`` moves the content by ``strength`` x side pixels
    (default 0.03, edge-replicated) and the perturbed map is shifted back before comparing
    (regions are re-pooled from the maps, so the image border that left the frame counts 0).
    """
    x = _check_images(images)
    if perturb not in ("noise", "brightness", "shift"):
        raise ValueError(f"perturb must be 'noise', 'brightness' or 'shift', got {perturb!r}")
    a = explainer.attribute(x, target=target, baseline=baseline)
    gen = torch.Generator().manual_seed(seed)
    if perturb == "noise":
        xp = x + (0.05 if strength is None else strength) * torch.randn(x.shape, generator=gen)
    elif perturb == "brightness":
        xp = x + (0.1 if strength is None else strength)
    else:
        d = max(1, round((0.03 if strength is None else strength) * max(x.shape[-2:])))
        xp = _shift(x, d, d)
    b = explainer.attribute(xp, target=a.targets, baseline=baseline)
    if perturb == "shift":
        back = np.roll(b.maps, (-d, -d), axis=(1, 2))
        back[:, -d:, :] = 0
        back[:, :, -d:] = 0
        lm = a.leaf_map.ravel()
        r = a.region_values.shape[1]
        ra = np.stack([np.bincount(lm, weights=m.ravel(), minlength=r) for m in a.maps])
        rb = np.stack([np.bincount(lm, weights=m.ravel(), minlength=r) for m in back])
        b = dataclasses.replace(b, maps=back.astype(np.float32), region_values=rb)
        a = dataclasses.replace(a, region_values=ra)
    k = k or _default_k(a.region_values.shape[1])
    return Agreement(rank_correlation(a, b), topk_overlap(a, b, k), k, a, b)


def model_agreement(
    explainer_a: Explainer,
    explainer_b: Explainer,
    images: torch.Tensor,
    target: int | Sequence[int] | None = None,
    baseline: BaselineSpec = "blur",
    k: int | None = None,
) -> Agreement:
    """Agreement of two explainers (e.g. champion vs challenger) on the same images and target.

    Default target: the class that ``explainer_a``'s model predicts, so both maps answer the
    same question ("what makes this image look like class t?").
    """
    x = _check_images(images)
    a = explainer_a.attribute(x, target=target, baseline=baseline)
    b = explainer_b.attribute(x, target=a.targets, baseline=baseline)
    if a.region_values.shape != b.region_values.shape:
        raise ValueError("explainers use different partitions: give them the same depth")
    k = k or _default_k(a.region_values.shape[1])
    return Agreement(rank_correlation(a, b), topk_overlap(a, b, k), k, a, b)


# --------------------------------------------------------------------------------------------
# The gate
# --------------------------------------------------------------------------------------------
@dataclass
class GateTolerances:
    # Values measured with DnCShap depth 4 on synthetic faces (tests/test_explain.py, tiny CNN):
    # a fine-tuned copy of the champion scores rank 0.78 / top-k 0.85 / cosine 0.94, a model
    # retrained from another seed 0.54 / 0.58 / 0.73, and a challenger that reads the corner
    # marker instead of the face (same accuracy on the probes) 0.12 / 0.27 / 0.08.
    # Spearman over all regions is noisy (most regions are near 0 and rank at random), so its
    # bar is low; cosine of the region values is dominated by the regions that matter.
    min_rank_correlation: float = 0.3
    # Share of the champion's top eighth of regions (2 of 16) kept in the challenger's.
    min_topk_overlap: float = 0.5
    min_cosine: float = 0.5
    # Insertion-minus-deletion AUC (probability units) may drop this much before the
    # challenger's explanations count as less faithful than the champion's.
    max_faithfulness_drop: float = 0.1
    # Depth 4 = 16 regions: 60 model calls per image and model, enough to see where a model
    # looks, cheap enough to run at every promotion.
    depth: int = 4
    explainer: str = DEFAULT_EXPLAINER  # a name of models.catalog.EXPLAINERS
    baseline: str = "blur"

    @classmethod
    def from_dict(cls, d: dict) -> GateTolerances:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown gate tolerances {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)


def cosine_similarity(a: np.ndarray | Attribution, b: np.ndarray | Attribution) -> np.ndarray:
    """(N,) cosine of paired region-value vectors (0 when one of them is all zero)."""
    a2, b2 = _pair(a, b)
    den = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
    return np.divide((a2 * b2).sum(1), den, out=np.zeros(a2.shape[0]), where=den > 0)


def explanation_gate(
    champion_model: Model,
    challenger_model: Model,
    probe_images: torch.Tensor,
    tolerances: GateTolerances | dict | None = None,
    attributions: dict[str, Attribution] | None = None,
) -> dict[str, dict[str, float | bool]]:
    """Champion-vs-challenger explanation checks on probe images (normalised (N,3,H,W)).

    Agreement (challenger explained for the champion's predicted class, so both maps answer
    the same question), means over the probes:

    * ``rank_correlation``: Spearman correlation of the region values >= min;
    * ``topk_overlap``: overlap of the top eighth of the regions >= min;
    * ``cosine``: cosine similarity of the region values >= min;

    Faithfulness (each model explained on its own prediction, scored on its own curves):

    * ``faithfulness_drop``: champion's (insertion - deletion AUC) minus the challenger's <= max.

    ``attributions``: a dict that receives the maps computed on the way ("champion", and
    "challenger" for the champion's classes), e.g. for a gallery, so nobody explains twice.
    """
    tol = (tolerances if isinstance(tolerances, GateTolerances)
           else GateTolerances.from_dict(tolerances or {}))
    x = _check_images(probe_images)
    champ = make_explainer(tol.explainer, champion_model, depth=tol.depth)
    chall = make_explainer(tol.explainer, challenger_model, depth=tol.depth)
    a = champ.attribute(x, baseline=tol.baseline)
    own = chall.attribute(x, baseline=tol.baseline)
    same = own.targets == a.targets
    if same.all():
        b = own
    else:  # re-explain only the probes where the challenger predicts another class
        idx = np.flatnonzero(~same)
        fix = chall.attribute(x[idx], target=a.targets[idx], baseline=tol.baseline)
        b = _merge(own, fix, idx)
    k = _default_k(a.region_values.shape[1])
    rank = float(rank_correlation(a, b).mean())
    top = float(topk_overlap(a, b, k).mean())
    cos = float(cosine_similarity(a, b).mean())
    f_champ = deletion_insertion(champion_model, x, a, baseline=tol.baseline)
    f_chall = deletion_insertion(challenger_model, x, own, baseline=tol.baseline)
    drop = f_champ.score - f_chall.score
    if attributions is not None:
        attributions.update(champion=a, challenger=b)
    return {
        "rank_correlation": {"passed": rank >= tol.min_rank_correlation, "value": rank,
                             "threshold": tol.min_rank_correlation},
        "topk_overlap": {"passed": top >= tol.min_topk_overlap, "value": top,
                         "threshold": tol.min_topk_overlap},
        "cosine": {"passed": cos >= tol.min_cosine, "value": cos, "threshold": tol.min_cosine},
        "faithfulness_drop": {"passed": drop <= tol.max_faithfulness_drop, "value": float(drop),
                              "threshold": tol.max_faithfulness_drop},
    }


def _merge(base: Attribution, fix: Attribution, idx: np.ndarray) -> Attribution:
    """``base`` with the images ``idx`` replaced by the rows of ``fix``."""
    out = dataclasses.replace(base)
    for f in Attribution.PER_IMAGE:
        arr = getattr(base, f).copy()
        arr[idx] = getattr(fix, f)
        setattr(out, f, arr)
    return out


def gate_passed(result: dict[str, dict[str, float | bool]]) -> bool:
    return all(bool(v["passed"]) for v in result.values())


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _probs(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
           target: int) -> np.ndarray:
    """p_target of every image through ``run`` (``models.engine.logits_runner``)."""
    with torch.inference_mode():
        logits = run(x)
    return torch.softmax(logits.double(), 1)[:, target].numpy()


def _check_images(images) -> torch.Tensor:
    x = torch.as_tensor(images)
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise ValueError(f"images must be normalised (N,3,H,W) floats, got {tuple(x.shape)} "
                         f"{x.dtype}")
    return x.float()


def _check_maps_masks(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    maps, masks = np.asarray(maps), np.asarray(masks, dtype=bool)
    if maps.ndim != 3 or maps.shape != masks.shape:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} must both be (N,H,W)")
    if not masks.reshape(masks.shape[0], -1).any(1).all():
        raise ValueError("every mask needs at least one pixel")
    return maps, masks


def _pair(a: np.ndarray | Attribution, b: np.ndarray | Attribution) -> tuple[np.ndarray, np.ndarray]:
    a2 = a.region_values if isinstance(a, Attribution) else np.asarray(a, np.float64)
    b2 = b.region_values if isinstance(b, Attribution) else np.asarray(b, np.float64)
    a2 = a2.reshape(a2.shape[0], -1) if a2.ndim > 1 else a2[None]
    b2 = b2.reshape(b2.shape[0], -1) if b2.ndim > 1 else b2[None]
    if a2.shape != b2.shape:
        raise ValueError(f"cannot compare explanations of shapes {a2.shape} and {b2.shape}")
    return a2, b2


def _dilate(masks: np.ndarray, r: int) -> np.ndarray:
    t = torch.as_tensor(masks, dtype=torch.float32).unsqueeze(1)
    return (torch.nn.functional.max_pool2d(t, 2 * r + 1, 1, r)[:, 0] > 0).numpy()


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Move content down/right by (dy, dx) pixels, replicating the top/left edge."""
    p = torch.nn.functional.pad(x, (dx, 0, dy, 0), mode="replicate")
    return p[..., : x.shape[-2], : x.shape[-1]]


__all__ = [
    "Agreement", "Faithfulness", "cosine_similarity", "GateTolerances", "deletion_insertion",
    "explanation_gate", "gate_passed", "mask_energy", "model_agreement",
    "perturbation_stability", "pointing_game", "rank_correlation",
    "topk_overlap",
]
