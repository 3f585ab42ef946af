"""Supervised training of EmotionNet on the source (training) domain.

Fast path: the frozen part of the backbone never changes, so its output ``h`` is computed
once per image *view* (the image, its mirror image and a few random crops) and kept in
memory (float16). Epochs then run only the top blocks, the bottleneck and the head on
``h`` (``EmotionNet.forward_cached``): each epoch draws one cached view per image, which
is the data augmentation. On 2 CPU cores caching costs one frozen forward per view; an
epoch over ~1000 images costs seconds.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from models.data import ImageRecord, split_records, stratified_split
from models.evaluate import EvalResult, metrics_from_predictions
from models.network import Checkpoint, EmotionNet, NetConfig, preprocessing_for
from models.progress import Progress, ProgressBars, progress_fn
from models.views import as_source, cache_activations


@dataclass
class TrainConfig:
    # Early stopping on the validation split usually ends Emotion6 runs at 10-20 epochs;
    # 40 is the ceiling, and the cosine schedule is laid out over it.
    epochs: int = 40
    batch_size: int = 32
    # New layers (bottleneck, head) start from random weights and need a larger step than
    # the ImageNet-pretrained top blocks, which should move only a little (~10x smaller).
    lr_head: float = 1e-3
    lr_top: float = 1e-4
    # AdamW decoupled decay; ~1000 training photos overfit a 3M-parameter top quickly.
    weight_decay: float = 0.05
    # Folder labels of Emotion6 agree with the annotators' majority for only about half
    # of the photos: do not push the softmax to one-hot.
    label_smoothing: float = 0.1
    warmup_epochs: int = 1
    # LP-FT (Kumar et al., ICLR 2022): train only the new layers for this many epochs before
    # the top blocks move, so that a random head does not send large gradients into the
    # pre-trained features. These epochs run on cached pooled outputs (seconds each). Skipped
    # for a backbone without pre-trained weights (the tiny test CNN).
    # Emotion6 seeds 0/1: 0.571/0.515 test accuracy with 5 (bench/results/train.md).
    head_epochs: int = 5
    # Mixup on the cached activations (manifold mixup at the frozen/trainable boundary):
    # lambda ~ Beta(a, a) per batch; 0 turns it off.
    mixup_alpha: float = 0.0
    # Exponential moving average of the weights (per step); validation, early stopping and the
    # returned model use the average. 0 turns it off.
    ema_decay: float = 0.0
    # Stop a phase when the validation loss has not improved for this many epochs; the weights
    # of the epoch with the lowest validation loss (over both phases) are kept.
    patience: int = 8
    # Used only when no validation set is passed: this fraction of the training data,
    # split by subject when file names carry one (CK+), stratified otherwise.
    val_frac: float = 0.15
    seed: int = 0
    # Cached views per training image: the image, its mirror image (facial and scene
    # emotions are left-right symmetric) and `crops` random crops (each mirrored with p=0.5).
    flip: bool = True
    crops: int = 2
    # Area fraction of a random crop: large crops keep the face or scene content.
    crop_scale: tuple[float, float] = (0.5, 1.0)
    # Images per frozen forward while caching (memory, not results, depends on it).
    cache_batch: int = 32
    num_threads: int | None = None  # torch threads; None: leave torch's setting

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["crop_scale"] = list(self.crop_scale)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "crop_scale" in kw:
            kw["crop_scale"] = tuple(kw["crop_scale"])
        return cls(**kw)

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError("epochs must be >= 1 and batch_size >= 2")
        if min(self.lr_head, self.lr_top) < 0 or self.weight_decay < 0:
            raise ValueError("learning rates and weight decay must be >= 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.mixup_alpha < 0 or not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("mixup_alpha must be >= 0 and ema_decay in [0, 1)")
        if self.crops < 0:
            raise ValueError(f"crops must be >= 0, got {self.crops}")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")


@dataclass
class TrainResult:
    checkpoint: Checkpoint
    history: list[dict[str, float]]  # one row per epoch
    val_metrics: EvalResult  # of the kept (best) epoch
    best_epoch: int
    cache_seconds: float  # frozen forwards of every view (incl. decoding)
    train_seconds: float  # the epochs
    n_train: int
    n_val: int
    # Indices into the passed training data when the validation split was made here.
    split: dict[str, list[int]] = field(default_factory=dict)

    @property
    def total_seconds(self) -> float:
        return self.cache_seconds + self.train_seconds


# --- training --------------------------------------------------------------------------------
def _param_groups(model: EmotionNet, cfg: TrainConfig, with_top: bool = True) -> list[dict[str, Any]]:
    top = [p for p in model.top.parameters() if p.requires_grad] if with_top else []
    new = list(model.bottleneck.parameters()) + list(model.head.parameters())
    # No weight decay on norms and biases (1-D): decaying BN scales only hurts.
    groups = []
    for params, lr, is_top in ((top, cfg.lr_top, True), (new, cfg.lr_head, False)):
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        for ps, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)):
            groups.append({"params": ps, "lr": lr, "base_lr": lr, "weight_decay": wd, "top": is_top})
    return [g for g in groups if g["params"]]


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


@torch.no_grad()
def eval_cached(model: EmotionNet, h: torch.Tensor, y: torch.Tensor, bs: int = 256,
                 head_only: bool = False) -> tuple[float, np.ndarray]:
    """Mean cross-entropy and predictions on cached (N, 1, ...) activations (or pooled
    top outputs (N, 1, P) when ``head_only``)."""
    model.eval()
    losses, preds = [], []
    run = _head if head_only else cached_logits
    for s in range(0, h.shape[0], bs):
        logits = run(model, h[s:s + bs, 0].float())
        losses.append(nn.functional.cross_entropy(logits, y[s:s + bs], reduction="sum").item())
        preds.append(logits.argmax(1).numpy())
    return sum(losses) / h.shape[0], np.concatenate(preds)


def train_source(
    train: Any,
    classes: Sequence[str] | None = None,
    net_config: NetConfig | None = None,
    config: TrainConfig | None = None,
    *,
    val: Any = None,
    labels: Any = None,
    progress: Progress | bool | None = None,
) -> TrainResult:
    """Fine-tune EmotionNet's top blocks, bottleneck and head on labelled source images.

    train / val: a LabelledSet, a list of ImageRecord, an object with ``.images``/``.labels``
        (e.g. SyntheticFaces) or a tuple (uint8 images (N,H,W,3), labels). Without ``val`` a
        validation split is cut from ``train`` (by subject for CK+-style names).
    classes: class names in label order; default: those of ``train``.
    progress: True for tqdm bars on stderr, a callable receiving event dicts
        ({"stage": "cache"|"cache-val"|"epoch", ...}), or None for silence.
    """
    cfg = config or TrainConfig()
    cfg.validate()
    src, found_classes = as_source(train, labels)
    classes = list(classes or found_classes or [])
    if not classes:
        raise ValueError("class names are required (pass classes=[...])")
    k = len(classes)
    if len(src) == 0:
        raise ValueError("no training images")
    if src.labels.min() < 0 or src.labels.max() >= k:
        raise ValueError(f"labels must be in [0, {k}) for classes {classes}")
    present = np.bincount(src.labels, minlength=k)
    if (present > 0).sum() < 2:
        raise ValueError(f"training data has fewer than two classes present: {dict(zip(classes, present.tolist(), strict=True))}")

    split: dict[str, list[int]] = {}
    if val is None:
        if src.records is not None:
            tr_idx, va_idx = split_records(src.records, cfg.val_frac, cfg.seed)
        else:
            recs = [ImageRecord(path=None, label=int(y), group=str(i))  # type: ignore[arg-type]
                    for i, y in enumerate(src.labels)]
            tr_idx, va_idx = stratified_split(recs, cfg.val_frac, cfg.seed)
        split = {"train": tr_idx, "val": va_idx}
        src_tr, src_va = src.subset(tr_idx), src.subset(va_idx)
    else:
        src_tr = src
        src_va, _ = as_source(val)
    if len(src_va) == 0:
        raise ValueError("validation set is empty")
    if src_va.labels.min() < 0 or src_va.labels.max() >= k:
        raise ValueError(f"validation labels must be in [0, {k})")

    ncfg = dataclasses.replace(net_config or NetConfig(), num_classes=k)
    prep = preprocessing_for(ncfg)
    report = progress_fn(progress)
    old_threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = EmotionNet(ncfg)
            t0 = time.perf_counter()
            h_tr = cache_activations(model, src_tr, prep, cfg, True, cfg.seed, report, "cache")
            h_va = cache_activations(model, src_va, prep, cfg, False, cfg.seed, report, "cache-val")
            cache_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            history, best_state, best_epoch = fit_cached(model, h_tr, src_tr.labels, h_va,
                                                   src_va.labels, cfg, report)
            train_s = time.perf_counter() - t1
    finally:
        torch.set_num_threads(old_threads)
        if isinstance(report, ProgressBars):
            report.close()

    model.load_state_dict(best_state)
    model.eval()
    _, pred = eval_cached(model, h_va, torch.as_tensor(src_va.labels))
    val_metrics = metrics_from_predictions(src_va.labels, pred, classes)
    ckpt = Checkpoint(
        model=model,
        classes=classes,
        preprocessing=prep,
        config={
            "train": cfg.to_dict(),
            "net": ncfg.to_dict(),
            "best_epoch": best_epoch,
            "val_accuracy": val_metrics.accuracy,
            "val_macro_f1": val_metrics.macro_f1,
            "n_train": len(src_tr),
            "n_val": len(src_va),
        },
    )
    return TrainResult(
        checkpoint=ckpt,
        history=history,
        val_metrics=val_metrics,
        best_epoch=best_epoch,
        cache_seconds=cache_s,
        train_seconds=train_s,
        n_train=len(src_tr),
        n_val=len(src_va),
        split=split,
    )


def fit_cached(
    model: EmotionNet,
    h_tr: torch.Tensor,
    y_tr_np: np.ndarray,
    h_va: torch.Tensor,
    y_va_np: np.ndarray,
    cfg: TrainConfig,
    report: Progress | None,
    soft_tr: np.ndarray | None = None,
    soft_weight: float = 0.0,
) -> tuple[list[dict[str, float]], dict[str, torch.Tensor], int]:
    """Two phases on cached activations; returns (history, best state_dict, best epoch).

    1. ``head_epochs`` epochs of the new layers only. The top blocks are frozen (eval mode)
       then, so their pooled output is itself cached once per view and these epochs cost
       next to nothing.
    2. ``epochs - head_epochs`` epochs that also fine-tune the top blocks.

    The kept weights are those of the epoch with the lowest validation loss over both phases:
    fine-tuning is kept only if the validation split says it helps.

    ``soft_tr`` (N, K): per-image label distributions (e.g. Emotion6's annotator votes); the
    training target is then ``(1 - soft_weight) * one_hot + soft_weight * soft``. Validation
    always scores the hard labels. Only bench/train_sweep.py uses it: on Emotion6 the votes
    made the model worse (bench/results/train.md), so training does not expose it.
    """
    rng = np.random.default_rng(cfg.seed + 1)
    y_tr, y_va = torch.as_tensor(y_tr_np), torch.as_tensor(y_va_np)
    t_tr = soft_targets(y_tr, soft_tr, soft_weight, model.config.num_classes)
    n, v = h_tr.shape[:2]
    bs = min(cfg.batch_size, n)
    spe = max(1, n // bs)  # steps per epoch: the ragged last batch is dropped (BatchNorm)
    freeze_bn = _top_is_pretrained(model)
    # LP-FT protects PRE-TRAINED features; a randomly initialised top has none to protect.
    n_head = min(cfg.head_epochs, cfg.epochs) if freeze_bn else 0
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    ema = copy.deepcopy(model) if cfg.ema_decay > 0 else None
    judged = ema if ema is not None else model
    history: list[dict[str, float]] = []
    best_loss = math.inf
    best_state: dict[str, torch.Tensor] = copy.deepcopy(model.state_dict())
    best_epoch, since_best = 0, 0

    p_tr = p_va = None
    if n_head > 0:
        p_tr, p_va = _pooled(model, h_tr), _pooled(model, h_va)  # (N, V, P), (M, 1, P)

    epoch = 0
    for phase, length in (("head", n_head), ("finetune", cfg.epochs - n_head)):
        if length <= 0:
            continue
        head_only = phase == "head"
        if not head_only and n_head > 0:  # fine-tune from the best head
            model.load_state_dict(best_state)
            if ema is not None:
                ema.load_state_dict(best_state)
        opt = torch.optim.AdamW(_param_groups(model, cfg, with_top=not head_only))
        total, warm = spe * length, spe * min(cfg.warmup_epochs, length - 1)
        step, since_best = 0, 0
        for _ in range(length):
            epoch += 1
            t = time.perf_counter()
            model.train()
            if head_only or freeze_bn:
                model.top.eval()  # pre-trained BN statistics stay put (small batches)
            order = rng.permutation(n)
            view = rng.integers(0, v, size=n)
            run = _head if head_only else cached_logits
            tot_loss, correct, seen = 0.0, 0, 0
            for b in range(spe):
                idx = order[b * bs:(b + 1) * bs]
                xb = (p_tr if head_only else h_tr)[idx, view[idx]].float()
                yb, tb = y_tr[idx], t_tr[idx]
                f = _lr_factor(step, total, warm)
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * f
                if cfg.mixup_alpha > 0:
                    lam = float(rng.beta(cfg.mixup_alpha, cfg.mixup_alpha))
                    perm = torch.as_tensor(rng.permutation(len(idx)))
                    logits = run(model, lam * xb + (1.0 - lam) * xb[perm])
                    loss = lam * loss_fn(logits, tb) + (1.0 - lam) * loss_fn(logits, tb[perm])
                else:
                    logits = run(model, xb)
                    loss = loss_fn(logits, tb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if ema is not None:
                    _ema_update(ema, model, cfg.ema_decay)
                step += 1
                tot_loss += loss.item() * len(idx)
                correct += int((logits.argmax(1) == yb).sum())
                seen += len(idx)
            val_loss, pred = eval_cached(judged, p_va if head_only else h_va, y_va,
                                          head_only=head_only)
            row = {
                "epoch": epoch,
                "phase": phase,
                "train_loss": tot_loss / seen,
                "train_acc": correct / seen,
                "val_loss": val_loss,
                "val_acc": float((pred == y_va_np).mean()),
                "lr_factor": _lr_factor(step - 1, total, warm),
                "seconds": time.perf_counter() - t,
            }
            history.append(row)
            if val_loss < best_loss:
                best_loss, best_epoch, since_best = val_loss, epoch, 0
                best_state = copy.deepcopy(judged.state_dict())
            else:
                since_best += 1
            if report:
                report({"stage": "epoch", **row, "best_epoch": best_epoch, "total": cfg.epochs})
            if since_best >= cfg.patience:
                break
    return history, best_state, best_epoch


def soft_targets(y: torch.Tensor, soft: np.ndarray | None, weight: float, k: int) -> torch.Tensor:
    """Class indices, or (N, K) probabilities when soft labels take part."""
    if soft is None or weight <= 0:
        return y
    s = torch.as_tensor(np.asarray(soft, dtype=np.float32))
    if s.shape != (len(y), k):
        raise ValueError(f"soft labels must have shape ({len(y)}, {k}), got {tuple(s.shape)}")
    hard = nn.functional.one_hot(y, k).float()
    tot = s.sum(1, keepdim=True)
    s = torch.where(tot > 0, s / tot.clamp_min(1e-12), hard)  # no votes: the folder label
    return (1.0 - weight) * hard + weight * s


def _top_is_pretrained(model: EmotionNet) -> bool:
    return model.config.backbone != "tiny" and model.config.pretrained


def _head(model: EmotionNet, pooled: torch.Tensor) -> torch.Tensor:
    return model.head(model.bottleneck(pooled))


def cached_logits(model: EmotionNet, h: torch.Tensor) -> torch.Tensor:
    return model.forward_cached(h)[1]


@torch.no_grad()
def _pooled(model: EmotionNet, h: torch.Tensor, bs: int = 256) -> torch.Tensor:
    """Output of the (eval-mode) top blocks for cached (N, V, ...) activations: (N, V, P)."""
    was = model.top.training
    model.top.eval()
    flat = h.reshape(-1, *h.shape[2:])
    out = torch.cat([model.top(flat[s:s + bs].float()) for s in range(0, flat.shape[0], bs)])
    model.top.train(was)
    return out.view(h.shape[0], h.shape[1], -1)


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for pe, p in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(p.detach(), 1.0 - decay)
    for be, b in zip(ema.buffers(), model.buffers(), strict=True):
        be.copy_(b)  # BatchNorm statistics: the live ones
