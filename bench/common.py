"""What the benchmarks share: Emotion6 / CK+48 splits, cached frozen activations of every
view and condition, the source model trained on them (cached), the label oracle, accuracy.

Run the benchmarks from the repository root as modules (``python -m bench.adapt``); their
caches go under ``.emowatch/cache/bench``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.adapt.base import cached_outputs
from models.adapt.discrepancy import DiscrepancyConfig, frozen_top_outputs
from models.data import read_image_folder, split_records, stratified_split
from models.images import load_rgb
from models.network import EmotionNet, NetConfig, preprocessing_for
from models.sim.conditions import apply_condition
from models.train import TrainConfig, fit_cached
from models.views import ImageSource, cache_activations

REPO = Path(__file__).resolve().parents[1]
E6_CLASSES = ["anger", "disgust", "fear", "joy", "sadness", "surprise"]


def default_data_dir() -> Path:
    """The real data: ``EMOWATCH_DATA_DIR``, else ``../shared/data`` beside the checkout."""
    return Path(os.environ.get("EMOWATCH_DATA_DIR", REPO.parent / "shared" / "data"))
CONDITION_IDS = {"clean": 0, "night": 1, "blur": 2, "jpeg": 3, "colour_cast": 4, "greyscale": 5}


# --- cached frozen activations ------------------------------------------------------------------
def cache_key(paths: list[Path], *parts: object) -> str:
    """Cache key of the images (by absolute path: ../shared and /work/shared are one cache)
    and the settings that change their activations."""
    h = hashlib.sha1()
    for p in paths:
        h.update(os.path.abspath(p).encode())
    for x in parts:
        h.update(repr(x).encode())
    return h.hexdigest()[:16]


def cached_tensor(cache_dir: Path, name: str, key: str, compute) -> torch.Tensor:
    path = cache_dir / f"{name}-{key}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    t = time.perf_counter()
    h = compute()
    secs = time.perf_counter() - t
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save(h, path)
    log(f"cached {name}: {tuple(h.shape)} in {secs:.0f} s ({h.shape[0] / secs:.1f} img/s)")
    (cache_dir / f"{name}-{key}.json").write_text(json.dumps(
        {"seconds": secs, "n": int(h.shape[0])}))
    return h


def views_activations(model, records, cache_dir, name, cfg_train) -> torch.Tensor:
    """(N, V, C, s, s) float16: the image, its mirror and random crops (train.py's views)."""
    prep = preprocessing_for(model.config)
    paths = [r.path for r in records]
    key = cache_key(paths, "views", cfg_train.flip, cfg_train.crops, cfg_train.crop_scale,
               model.config.backbone, model.config.img_size, model.config.trainable_blocks)

    def compute():
        src = ImageSource(labels=np.array([r.label for r in records]), records=list(records))
        return cache_activations(model, src, prep, cfg_train, True, 0)

    return cached_tensor(cache_dir, name, key, compute)


def condition_array(path, prep, condition: str, severity: int, index: int,
                    rng: np.random.Generator | None = None) -> np.ndarray:
    """One photo under ``condition`` (applied at full resolution, before resizing) as the
    (S, S, 3) uint8 grid. The noise is seeded by (condition, ``index`` in the record list)
    unless ``rng`` is given: the same site photo always gets the same noise."""
    img = load_rgb(path)
    if condition != "clean":
        rng = rng if rng is not None else np.random.default_rng([CONDITION_IDS[condition], index])
        img = apply_condition(img, condition, severity, rng)
    return prep.to_array(img)


def condition_images(records, idx, condition: str, severity: int, prep) -> np.ndarray:
    """(n, S, S, 3) uint8 of ``records[idx]`` under ``condition``, with the same per-photo
    noise seeds as the cached activations (:func:`condition_array`)."""
    return np.stack([condition_array(records[i].path, prep, condition, severity, i) for i in idx])


def condition_activations(model, records, cache_dir, name, condition, severity) -> torch.Tensor:
    """(N, C, s, s) float16 of each image under ``condition`` (applied at full resolution,
    before resizing, with a per-image seed: the same site photo always gets the same noise)."""
    prep = preprocessing_for(model.config)
    paths = [r.path for r in records]
    key = cache_key(paths, condition, severity, model.config.backbone, model.config.img_size,
               model.config.trainable_blocks)

    @torch.no_grad()
    def compute():
        out = []
        for s in range(0, len(paths), 32):
            arrs = [condition_array(paths[i], prep, condition, severity, i)
                    for i in range(s, min(len(paths), s + 32))]
            out.append(model.frozen_forward(prep.normalize(np.stack(arrs))).to(torch.float16))
        return torch.cat(out)

    return cached_tensor(cache_dir, f"{name}-{condition}{severity if condition != 'clean' else ''}",
                   key, compute)


# --- training / references ----------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def source_net(single_level: bool = False) -> NetConfig:
    """The source models' network: the shipped NetConfig, or (``--single-level``) the one
    without pooled mid-level features that the tables before 2026-11-27 session 6 used."""
    return NetConfig(num_classes=len(E6_CLASSES), multilevel=not single_level)


def add_single_level_flag(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--single-level", action="store_true",
                    help="source models without pooled mid-level features (NetConfig.multilevel "
                         "= False), as in the tables before 2026-11-27 session 6")


def train_model(h_tr_views, y_tr, h_va, y_va, seed, epochs, cache_dir: Path | None = None,
                name: str = "model", ncfg: NetConfig | None = None) -> EmotionNet:
    """Source training on cached views with models.train's loop (same recipe as train_source);
    the weights are cached too (keyed by the data, the seed and the network config)."""
    ncfg = ncfg or source_net()
    cfg = TrainConfig(seed=seed, epochs=epochs)
    key = hashlib.sha1(np.asarray(y_tr).tobytes() + np.asarray(y_va).tobytes()
                       + h_tr_views[:, 0].contiguous().numpy().tobytes()
                       + repr((seed, epochs, tuple(h_tr_views.shape), cfg.to_dict(),
                               ncfg.to_dict())).encode()
                       ).hexdigest()[:16]
    path = cache_dir / f"{name}-{key}.pt" if cache_dir is not None else None
    if path is not None and path.is_file():
        model = EmotionNet(ncfg)
        model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
        return model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = EmotionNet(ncfg)
        _, best_state, best_epoch = fit_cached(model, h_tr_views, np.asarray(y_tr),
                                         h_va[:, None], np.asarray(y_va), cfg, None)
    model.load_state_dict(best_state)
    model.eval()
    log(f"trained source model (seed {seed}), best epoch {best_epoch}")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model


def oracle(model, h_src, y_src, h_site, y_site, cfg: DiscrepancyConfig) -> EmotionNet:
    """Upper reference: fine-tune WITH the site labels (source CE + site CE), mmd's budget."""
    m = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        g = torch.Generator().manual_seed(cfg.seed)
        m.train()
        groups = [{"params": list(m.bottleneck.parameters()) + list(m.head.parameters()),
                   "lr": cfg.lr}]
        if cfg.top_lr_mult > 0:
            groups.append({"params": list(m.top.parameters()), "lr": cfg.lr * cfg.top_lr_mult})
            encode = m.forward_cached
        else:  # same frozen-top treatment as the adapters (top BN stats, cached top outputs)
            h_src, h_site = frozen_top_outputs(m, h_src, h_site, cfg, g)

            def encode(x):
                z = m.bottleneck(x)
                return z, m.head(z)
        opt = torch.optim.Adam(groups, weight_decay=cfg.weight_decay)
        bs = cfg.batch_size
        for _ in range(cfg.steps):
            i = torch.randint(0, len(h_src), (bs,), generator=g)
            j = torch.randint(0, len(h_site), (bs,), generator=g)
            _, logits = encode(torch.cat([h_src[i], h_site[j]]))
            loss = F.cross_entropy(logits[:bs], y_src[i]) + F.cross_entropy(logits[bs:], y_site[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
    m.eval()
    return m


def accuracy(model, h, y) -> float:
    return float((cached_outputs(model, h)[1].argmax(1) == np.asarray(y)).mean())


def site_ce(model, h, y) -> float:
    """True mean cross-entropy on labelled site images (what DEV estimates without labels)."""
    p = cached_outputs(model, h)[1]
    return float(-np.log(np.clip(p[np.arange(len(y)), np.asarray(y)], 1e-12, None)).mean())


# --- splits ----------------------------------------------------------------------------------------
def sub_index(idx: list[int], rel: list[int]) -> list[int]:
    return [idx[i] for i in rel]


def photo_split(records, seed: int):
    """Emotion6 indices (train, early-stop, gate-val, site-adapt, site-test).

    35% of the photos are the site (half unlabelled adaptation set, half labelled test); the
    source 65% is split 70/15/15 into training, early stopping (model selection) and the
    validation set the gates use. The gate set must not be the model-selection set: the
    champion's accuracy on that set is optimistically biased, and every candidate would look
    like a 'drop' of a few points."""
    src, site = stratified_split(records, 0.35, seed)
    rest, va = stratified_split([records[i] for i in src], 0.15, seed + 100)
    rest, va = sub_index(src, rest), sub_index(src, va)
    tr, es = stratified_split([records[i] for i in rest], 0.15 / 0.85, seed + 150)
    tr, es = sub_index(rest, tr), sub_index(rest, es)
    ad, te = stratified_split([records[i] for i in site], 0.5, seed + 200)
    return tr, es, va, sub_index(site, ad), sub_index(site, te)


def face_split(records, seed: int):
    """CK+48 indices (train, early-stop, gate-val) = 70/15/15, by subject (no subject on two
    sides)."""
    tr, rest = split_records(records, 0.3, seed)
    es, va = split_records([records[i] for i in rest], 0.5, seed + 1)
    return tr, sub_index(rest, es), sub_index(rest, va)


def emotion6_views(data_dir: Path, cache_dir: Path):
    """(Emotion6 records, the pre-trained network's preprocessing, the cached 4-view frozen
    activations) - what every photos-setting script starts from."""
    e6 = read_image_folder(data_dir / "emotion6", classes=E6_CLASSES)
    fmodel = EmotionNet(NetConfig(num_classes=len(E6_CLASSES))).eval()  # frozen part only is used
    with torch.no_grad():
        views = views_activations(fmodel, e6.records, cache_dir, "e6-views", TrainConfig())
    return e6, preprocessing_for(fmodel.config), views


def photos_model(e6, views, seed: int, cache_dir: Path | None, epochs: int = 40,
                 ncfg: NetConfig | None = None):
    """One seed's photo split (train, early-stop, gate-val, site-adapt, site-test) and its
    source model (cached)."""
    split = photo_split(e6.records, seed)
    tr, es = split[0], split[1]
    y = e6.labels
    return split, train_model(views[tr], y[tr], views[es, 0], y[es], seed, epochs, cache_dir,
                              "model-photos", ncfg)


def gap_recovered(acc: float, source_only: float, clean: float) -> float:
    """Share of the accuracy lost to the condition that ``acc`` wins back (nan without a gap)."""
    d = clean - source_only
    return (acc - source_only) / d if d == d and abs(d) > 1e-9 else float("nan")


