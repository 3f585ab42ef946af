"""Attribution methods behind one protocol: ``Explainer(model).attribute(images) -> Attribution``.

``model`` is any callable mapping normalised images (B,3,H,W) to logits (B,K), e.g.
``EmotionNet``; the explained score is the softmax probability of the target class (default: the
class the model predicts on the unmasked image). All three methods report values on the same
rectangular regions (a recursive partition of the image), so their maps can be compared.

DnCShap -- divide-and-conquer hierarchical Shapley
==================================================
The image is cut recursively into a tree of regions (``partition="binary"``: halve the longer
side at each level, depth 6 = 64 regions; ``"quad"``: quarter at each level, depth 3 = 64); the
regions are the players of ``v(S) = p_target(image with the regions in S kept, the rest at the
baseline)``, and their values come from the hierarchical Shapley core in :mod:`models.explain.shapley`
(its docstring holds the algorithm and the proofs of its properties). Every masked image is
known in advance and evaluated in batches: ``4 * 2^D - 4`` model calls for a binary tree of
depth D (252 for 64 regions).

Occlusion and IntegratedGradients
=================================
``Occlusion``: region value = f(image) - f(image with that region at the baseline), R + 2
evaluations (image, baseline, R occlusions), not efficient (the gap is reported). ``IntegratedGradients``: Riemann midpoint sum
of the gradient of the target probability along the straight path baseline -> image, ``steps``
forward+backward passes; per-pixel map = sum over channels of (x - x') * mean gradient, region
value = sum of the map over the region (the efficiency gap is the quadrature error).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from models.explain.shapley import (
    Contexts,
    PartitionTree,
    check_contexts,
    dnc_coalitions,
    dnc_shapley,
)

BaselineSpec = str | torch.Tensor | np.ndarray

BASELINES = ("blur", "mean", "zeros")


# --------------------------------------------------------------------------------------------
# Image regions and baselines
# --------------------------------------------------------------------------------------------
@dataclass
class ImagePartition:
    tree: PartitionTree
    boxes: np.ndarray  # (R, 4) int [x0, y0, x1, y1] (x1, y1 exclusive), leaf order
    leaf_map: np.ndarray  # (H, W) int64: region id of every pixel


def image_partition(height: int, width: int, depth: int,
                    partition: Literal["binary", "quad"] = "binary") -> ImagePartition:
    """Recursive partition of an H x W grid into rectangles (leaves in depth-first order)."""
    if partition not in ("binary", "quad"):
        raise ValueError(f"partition must be 'binary' or 'quad', got {partition!r}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    per_side = 2 ** (depth if partition == "quad" else math.ceil(depth / 2))
    if min(height, width) < per_side:
        raise ValueError(f"{height}x{width} image too small for {partition} depth {depth}")
    boxes: list[tuple[int, int, int, int]] = []

    def split(x0: int, y0: int, x1: int, y1: int, d: int) -> int | list:
        if d == 0:
            boxes.append((x0, y0, x1, y1))
            return len(boxes) - 1
        if partition == "quad":
            xm, ym = (x0 + x1) // 2, (y0 + y1) // 2
            return [split(x0, y0, xm, ym, d - 1), split(xm, y0, x1, ym, d - 1),
                    split(x0, ym, xm, y1, d - 1), split(xm, ym, x1, y1, d - 1)]
        if x1 - x0 >= y1 - y0:
            xm = (x0 + x1) // 2
            return [split(x0, y0, xm, y1, d - 1), split(xm, y0, x1, y1, d - 1)]
        ym = (y0 + y1) // 2
        return [split(x0, y0, x1, ym, d - 1), split(x0, ym, x1, y1, d - 1)]

    tree = PartitionTree.from_nested(split(0, 0, width, height, depth))
    b = np.asarray(boxes, np.int64)
    leaf_map = np.empty((height, width), np.int64)
    for r, (x0, y0, x1, y1) in enumerate(b):
        leaf_map[y0:y1, x0:x1] = r
    return ImagePartition(tree, b, leaf_map)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B,C,H,W) with reflect padding (sigma in pixels)."""
    if sigma <= 0:
        return x.clone()
    radius = max(1, min(int(math.ceil(3 * sigma)), min(x.shape[-2:]) - 1))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    y = torch.nn.functional.pad(x, (radius, radius, 0, 0), mode="reflect")
    y = torch.nn.functional.conv2d(y, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    y = torch.nn.functional.pad(y, (0, 0, radius, radius), mode="reflect")
    return torch.nn.functional.conv2d(y, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def make_baseline(x: torch.Tensor, kind: BaselineSpec = "blur",
                  blur_sigma: float = 0.1) -> torch.Tensor:
    """Reference images (N,3,H,W) for normalised images ``x``.

    ``blur``: Gaussian blur with sigma = ``blur_sigma`` * max(H, W) (0.1: removes detail at the
    scale of facial parts but keeps the coarse colour layout, so masked images stay closer to
    natural ones than grey patches); ``mean``: per-image mean colour; ``zeros``: 0 in normalised
    space (mid grey for the [-1, 1] scaling of EfficientNet-Lite); or an explicit tensor/array
    broadcastable to ``x``.
    """
    if isinstance(kind, str):
        if kind == "blur":
            return gaussian_blur(x, blur_sigma * max(x.shape[-2:]))
        if kind == "mean":
            return x.mean(dim=(-2, -1), keepdim=True).expand_as(x).clone()
        if kind == "zeros":
            return torch.zeros_like(x)
        raise ValueError(f"baseline must be one of {BASELINES} or a tensor, got {kind!r}")
    b = torch.as_tensor(np.asarray(kind) if isinstance(kind, np.ndarray) else kind)
    try:
        return b.to(x.dtype).expand_as(x).clone()
    except RuntimeError as e:
        raise ValueError(f"baseline of shape {tuple(b.shape)} does not broadcast to "
                         f"{tuple(x.shape)}") from e


# --------------------------------------------------------------------------------------------
# The explainer protocol
# --------------------------------------------------------------------------------------------
@dataclass
class Attribution:
    """Fixed-shape record of one ``attribute`` call on N images of H x W with R regions."""

    method: str
    maps: np.ndarray  # (N, H, W) float32: per-pixel attribution (sums to the region values)
    region_values: np.ndarray  # (N, R) float64
    boxes: np.ndarray  # (R, 4) int [x0, y0, x1, y1], x1/y1 exclusive
    targets: np.ndarray  # (N,) int64: explained class
    f_image: np.ndarray  # (N,) float64: p_target(image)
    f_baseline: np.ndarray  # (N,) float64: p_target(baseline)
    efficiency_gap: np.ndarray  # (N,) float64: sum(region_values) - (f_image - f_baseline)
    model_calls: np.ndarray  # (N,) int64: images passed through the model (fwd+bwd for IG)
    seconds: float = 0.0
    params: dict[str, float | int | str] = field(default_factory=dict)

    PER_IMAGE = ("maps", "region_values", "targets", "f_image", "f_baseline", "efficiency_gap",
                 "model_calls")

    def take(self, idx: int | Sequence[int] | np.ndarray) -> Attribution:
        """The record restricted to the images ``idx`` (an int keeps a batch of one)."""
        sel = [idx] if isinstance(idx, (int, np.integer)) else np.asarray(idx)
        out = dataclasses.replace(self)
        for f in self.PER_IMAGE:
            setattr(out, f, getattr(self, f)[sel])
        return out

    @property
    def leaf_map(self) -> np.ndarray:
        """(H, W) region id of every pixel."""
        h, w = self.maps.shape[1:]
        m = np.full((h, w), -1, np.int64)
        for r, (x0, y0, x1, y1) in enumerate(self.boxes):
            m[y0:y1, x0:x1] = r
        return m


Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")


def resolve_precision(precision: str) -> str:
    """"auto" -> "bf16" where the CPU computes bfloat16 natively (AVX512-BF16 / AMX: ~2.5x
    the fp32 throughput of EfficientNet-Lite0 on 2 cores, probabilities within ~1e-3), else
    "fp32" (emulated bf16 would be slower). Forward passes only; gradients stay fp32."""
    if precision != "auto":
        return precision
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return "bf16" if native else "fp32"


class Explainer:
    """Base class: ``attribute`` validates; subclasses implement ``_attribute``.

    Masked images are evaluated ``batch_size`` at a time in channels-last layout: on 2 CPU
    cores small batches are FASTER per image (they stay in cache; EfficientNet-Lite0 at 224 px:
    ~110 img/s fp32 at 4 vs ~40 at 32, bench/explain.py)."""

    name = "explainer"

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], depth: int = 6,
                 partition: Literal["binary", "quad"] = "binary", batch_size: int = 4,
                 blur_sigma: float = 0.1, precision: Precision = "auto") -> None:
        if not callable(model):
            raise ValueError("model must be callable: (B,3,H,W) normalised images -> logits")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if partition not in ("binary", "quad"):
            raise ValueError(f"partition must be 'binary' or 'quad', got {partition!r}")
        max_depth = 10 if partition == "binary" else 5  # 1024 regions
        if not 1 <= depth <= max_depth:
            raise ValueError(f"depth must be in [1, {max_depth}] for a {partition} partition, "
                             f"got {depth}")
        self.model = model
        self.depth = int(depth)
        self.partition = partition
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.batch_size = int(batch_size)
        self.blur_sigma = float(blur_sigma)
        self.precision = resolve_precision(precision)

    def attribute(self, images: torch.Tensor | np.ndarray, target: int | Sequence[int] | None = None,
                  baseline: BaselineSpec = "blur") -> Attribution:
        x = torch.as_tensor(images)
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be normalised (N,3,H,W) floats, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError("images must be normalised floats (use Preprocessing.normalize)")
        if x.shape[0] < 1:
            raise ValueError("no images to explain")
        x = x.float()
        parts = image_partition(x.shape[2], x.shape[3], self.depth, self.partition)
        base = make_baseline(x, baseline, self.blur_sigma)
        with eval_mode(self.model):
            self._run = self._runner()  # once per call: the weights do not change within it
            try:
                logits = self._forward(x)  # (N, K)
                k = logits.shape[1]
                if target is None:
                    targets = logits.argmax(1).numpy().astype(np.int64)
                else:
                    targets = np.asarray(target, np.int64).reshape(-1)
                    if targets.size == 1:
                        targets = np.repeat(targets, x.shape[0])
                    if targets.shape[0] != x.shape[0]:
                        raise ValueError(f"target: one class or one per image ({x.shape[0]}), "
                                         f"got {targets.shape[0]}")
                    if ((targets < 0) | (targets >= k)).any():
                        raise ValueError(f"target must be in [0, {k}), got {np.unique(targets)}")
                p_img = torch.softmax(logits.double(), 1)[torch.arange(x.shape[0]), targets].numpy()
                t0 = time.perf_counter()
                att = self._attribute(x, torch.as_tensor(targets), base, parts, p_img)
                att.seconds = time.perf_counter() - t0
            finally:
                self._run = None
        return att

    # --- helpers for subclasses -------------------------------------------------------------
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every image, in batches. EVERY score of an explanation (image, baseline,
        masked images) comes through here, so they share one precision and efficiency holds
        exactly for the scores reported."""
        bf16 = self.precision == "bf16"
        run = getattr(self, "_run", None) or self._runner()  # set per ``attribute`` call
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return run(x)

    def _runner(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The logits of the model in its fastest engine (``models.engine.logits_runner``)."""
        from models.engine import TORCH_BATCH, logits_runner

        return logits_runner(self.model, self.precision,
                             min(self.batch_size, TORCH_BATCH[self.precision]))

    def _probs(self, x: torch.Tensor, target: int) -> np.ndarray:
        logits = self._forward(x)
        return torch.softmax(logits.double(), 1)[:, target].numpy()

    def _masked_probs(self, x1: torch.Tensor, b1: torch.Tensor, present: np.ndarray,
                      leaf_map: np.ndarray, target: int) -> np.ndarray:
        """p_target of x1 with the regions in ``present`` (M, R) kept, others at baseline."""
        lm = torch.as_tensor(leaf_map)
        pres = torch.as_tensor(present)
        diff = x1 - b1  # (3, H, W)
        out = []
        for i in range(0, pres.shape[0], self.batch_size):
            m = pres[i:i + self.batch_size][:, lm].unsqueeze(1).to(x1.dtype)  # (B, 1, H, W)
            out.append(self._probs(b1 + m * diff, target))
        return np.concatenate(out) if out else np.zeros(0)

    def _record(self, maps: np.ndarray, regions: np.ndarray, parts: ImagePartition,
                targets: torch.Tensor, f_img: np.ndarray, f_base: np.ndarray,
                calls: np.ndarray, **params: float | int | str) -> Attribution:
        gap = regions.sum(1) - (f_img - f_base)
        return Attribution(self.name, maps.astype(np.float32), regions.astype(np.float64),
                           parts.boxes.copy(), targets.numpy().astype(np.int64),
                           f_img.astype(np.float64), f_base.astype(np.float64), gap,
                           calls.astype(np.int64),
                           params={"depth": self.depth, "partition": self.partition,
                                   "blur_sigma": self.blur_sigma, "precision": self.precision,
                                   **params})

    def _attribute(self, x: torch.Tensor, targets: torch.Tensor, base: torch.Tensor,
                   parts: ImagePartition, p_img: np.ndarray) -> Attribution:
        raise NotImplementedError


def _density(regions: np.ndarray, parts: ImagePartition) -> np.ndarray:
    """(N, R) region values -> (N, H, W) per-pixel maps (value / area: sums are preserved)."""
    area = np.bincount(parts.leaf_map.ravel(), minlength=parts.boxes.shape[0]).astype(np.float64)
    return (regions / area)[:, parts.leaf_map]


class DnCShap(Explainer):
    """Divide-and-conquer hierarchical Shapley over a recursive image partition (module doc).

    ``contexts``: "both" (default; exact Owen value at binary depth 2, 4 * 2^D - 4 model calls)
    or one context only, "present" / "absent" (2 * 2^D calls: half the cost, see module doc).
    """

    name = "dncshap"

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], depth: int = 6,
                 partition: Literal["binary", "quad"] = "binary", batch_size: int = 4,
                 blur_sigma: float = 0.1, precision: Precision = "auto",
                 contexts: Contexts = "both") -> None:
        super().__init__(model, depth, partition, batch_size, blur_sigma, precision)
        check_contexts(contexts)
        self.contexts = contexts

    def _attribute(self, x, targets, base, parts, p_img):
        coalitions = dnc_coalitions(parts.tree, self.contexts)  # row 0 = image, row 1 = baseline
        n = x.shape[0]
        regions = np.zeros((n, parts.boxes.shape[0]))
        f_base = np.zeros(n)
        calls = np.zeros(n, np.int64)
        for i in range(n):
            t = int(targets[i])
            vals = np.empty(coalitions.shape[0])
            vals[0] = p_img[i]  # already computed while choosing the target
            vals[1:] = self._masked_probs(x[i], base[i], coalitions[1:], parts.leaf_map, t)
            res = dnc_shapley(None, parts.tree, vals, self.contexts)  # type: ignore[arg-type]
            regions[i], f_base[i] = res.leaf_values, res.v_empty
            calls[i] = coalitions.shape[0]
        return self._record(_density(regions, parts), regions, parts, targets, p_img, f_base,
                            calls, contexts=self.contexts)


class Occlusion(Explainer):
    """Region value = f(image) - f(image with the region at the baseline)."""

    name = "occlusion"

    def _attribute(self, x, targets, base, parts, p_img):
        r = parts.boxes.shape[0]
        present = np.concatenate([np.zeros((1, r), bool), ~np.eye(r, dtype=bool)])  # (1+R, R)
        n = x.shape[0]
        regions = np.zeros((n, r))
        f_base = np.zeros(n)
        for i in range(n):
            v = self._masked_probs(x[i], base[i], present, parts.leaf_map, int(targets[i]))
            f_base[i] = v[0]
            regions[i] = p_img[i] - v[1:]
        calls = np.full(n, r + 2)  # + the unmasked image
        return self._record(_density(regions, parts), regions, parts, targets, p_img, f_base,
                            calls)


class IntegratedGradients(Explainer):
    """Integrated gradients of the target probability (midpoint rule, ``steps`` points)."""

    name = "integrated_gradients"

    def __init__(self, model, steps: int = 32, depth: int = 6,
                 partition: Literal["binary", "quad"] = "binary", batch_size: int = 32,
                 blur_sigma: float = 0.1, precision: Precision = "fp32") -> None:
        # fp32 by default: the gradients are fp32, so f(image) - f(baseline) must be too, or the
        # efficiency gap would mix quadrature error with rounding.
        super().__init__(model, depth, partition, batch_size, blur_sigma, precision)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.steps = int(steps)

    def _attribute(self, x, targets, base, parts, p_img):
        n = x.shape[0]
        alphas = (torch.arange(self.steps, dtype=x.dtype) + 0.5) / self.steps  # (T,)
        maps = np.zeros((n, x.shape[2], x.shape[3]))
        f_base = self._baseline_probs(base, targets)
        for i in range(n):
            t = int(targets[i])
            diff = x[i] - base[i]
            grads = torch.zeros_like(x[i])
            for j in range(0, self.steps, self.batch_size):
                a = alphas[j:j + self.batch_size].view(-1, 1, 1, 1)
                pts = (base[i] + a * diff).requires_grad_(True)  # (B, 3, H, W)
                with torch.enable_grad():
                    p = torch.softmax(self.model(pts), 1)[:, t]
                    (g,) = torch.autograd.grad(p.sum(), pts)
                grads += g.sum(0)
            maps[i] = (diff * grads / self.steps).sum(0).double().numpy()
        lm = parts.leaf_map.ravel()
        regions = np.stack([np.bincount(lm, weights=m.ravel(), minlength=parts.boxes.shape[0])
                            for m in maps])
        calls = np.full(n, self.steps + 2)  # + image and baseline forwards
        return self._record(maps, regions, parts, targets, p_img, f_base, calls,
                            steps=self.steps)

    def _baseline_probs(self, base: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
        logits = self._forward(base)
        return torch.softmax(logits.double(), 1)[torch.arange(base.shape[0]), targets].numpy()


def make_explainer(name: str, model: Callable[[torch.Tensor], torch.Tensor],
                   **kwargs) -> Explainer:
    """The explainer registered as ``name`` in ``models.catalog.EXPLAINERS``, on ``model``."""
    from models.catalog import EXPLAINERS, load

    if name not in EXPLAINERS:
        raise ValueError(f"unknown explainer {name!r}; choose from {sorted(EXPLAINERS)}")
    return load("explainer", name)(model, **kwargs)


class eval_mode:
    """Puts an nn.Module in eval mode, its weights channels-last, for the duration (masked
    batches must not touch BN; every batch runs channels-last, ``models.engine``)."""

    def __init__(self, model: object) -> None:
        self.model = model if isinstance(model, nn.Module) else None
        self.was_training = False
        self.layout = None

    def __enter__(self) -> None:
        from models.engine import channels_last

        if self.model is not None:
            self.was_training = self.model.training
            self.model.eval()
            self.layout = channels_last(self.model).__enter__()

    def __exit__(self, *exc: object) -> None:
        if self.model is not None:
            self.layout.__exit__(*exc)
            if self.was_training:
                self.model.train()
