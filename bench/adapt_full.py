"""Exploratory: adaptation with EVERY layer trainable (backprop through the whole backbone).

The shipped adapters keep the stem and the first 12 MBConv blocks frozen (their outputs are
cached once), which is what makes a 500-photo site fit in seconds on 2 CPU cores. On the blur
site even the label oracle with that part frozen gains nothing (bench/results/adapt.md), so
the open question is whether adapting the early layers' WEIGHTS can recover the blur gap, and
what it costs. Same splits, source models and site photos as bench/adapt.py (photos setting):

    oracle-full  source CE + site CE with the adaptation photos' labels (upper reference)
    mmd-full     source CE + lam(t) * MK-MMD(source, site bottleneck features): the paper's
                 method with nothing frozen

Both use ``models.adapt.base.with_backbone`` (``BACKBONE_STEPS`` Adam steps of ``BACKBONE_BATCH``
source + site photos, the backbone at ``lr * --backbone-lr-mult``); the BN statistics of the
stem and blocks stay the champion's. mmd-full IS the shipped adapter (``backbone_lr_mult``), and
its candidate goes through ``validate_candidate`` on its own activations.

    .venv/bin/python -m bench.adapt_full --seeds 0 --conditions blur night --steps 150
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import (
    E6_CLASSES,
    REPO,
    accuracy,
    add_single_level_flag,
    condition_images,
    emotion6_views,
    face_split,
    gap_recovered,
    log,
    photos_model,
    source_net,
    train_model,
    views_activations,
)
from models.adapt.base import CachedSet, cache_activations, get_adapter
from models.adapt.discrepancy import DiscrepancyConfig, with_backbone
from models.data import read_image_folder, stratified_split
from models.network import EmotionNet, NetConfig
from models.train import TrainConfig
from models.validate.candidate import ValidationConfig, validate_candidate


def oracle_full(model: EmotionNet, src: CachedSet, site_x: torch.Tensor, site_y: torch.Tensor,
                cfg: DiscrepancyConfig) -> EmotionNet:
    """Upper reference: mmd's whole-backbone recipe with the site CE (labels) instead of MMD."""
    m = copy.deepcopy(model)
    for p in m.parameters():
        p.requires_grad_(True)
    head = list(m.bottleneck.parameters()) + list(m.head.parameters())
    backbone = list(m.frozen.parameters()) + list(m.top.parameters())
    opt = torch.optim.Adam([{"params": head, "lr": cfg.lr},
                            {"params": backbone, "lr": cfg.lr * cfg.backbone_lr_mult}],
                           weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed)
    bs = cfg.batch_size
    m.train()  # the stem and early blocks keep the champion's BN statistics (EmotionNet.train)
    for _ in range(cfg.steps):
        i = torch.randint(0, len(src), (bs,), generator=g)
        j = torch.randint(0, len(site_x), (bs,), generator=g)
        xs = src.images[i]
        mirror = torch.rand(bs, generator=g) < 0.5
        xs = torch.where(mirror[:, None, None, None], xs.flip(-1), xs)
        logits = m(torch.cat([xs, site_x[j]]))
        loss = F.cross_entropy(logits[:bs], src.labels[i]) + F.cross_entropy(logits[bs:], site_y[j])
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    for p in m.frozen.parameters():
        p.requires_grad_(False)
    return m


def source_accuracies(m: EmotionNet, gate_x: torch.Tensor, extra_x: torch.Tensor, y_gate: np.ndarray,
                      y_wide: np.ndarray) -> tuple[float, float]:
    """Accuracy on the gate's clean source photos, and on those plus ``extra_x`` (wide set)."""
    ha, hb = cache_activations(m, gate_x), cache_activations(m, extra_x)
    return accuracy(m, ha, y_gate), accuracy(m, torch.cat([ha, hb]), y_wide)


def source_set(records, labels: np.ndarray, views: torch.Tensor, idx: list[int], prep) -> CachedSet:
    """Labelled source photos: cached activations of the image view and the decoded images."""
    return CachedSet(h=views[idx, 0].float(), labels=torch.as_tensor(labels[idx]),
                     images=prep.normalize(condition_images(records, idx, "clean", 0, prep)))


def judge(candidate: EmotionNet, champion: EmotionNet, h_va: torch.Tensor, y_va: torch.Tensor,
          va_x: torch.Tensor, h_site: torch.Tensor, site_x: torch.Tensor):
    """The gates, with the candidate judged on its own activations (its frozen part changed)."""
    return validate_candidate(candidate, champion, (h_va, y_va), h_site, ValidationConfig(),
                              site_candidate=cache_activations(candidate, site_x),
                              source_candidate=(cache_activations(candidate, va_x), y_va))


def faces_to_photos(args, acfg: DiscrepancyConfig, e6, prep, e6_views) -> None:
    """mmd-full from a CK+48 model to Emotion6 photos: the gates must not call it good."""
    ck = read_image_folder(args.data_dir / "ckplus48", classes=E6_CLASSES, aliases={"happy": "joy"})
    with torch.no_grad():
        ck_views = views_activations(EmotionNet(NetConfig(num_classes=len(E6_CLASSES))).eval(),
                                     ck.records, args.cache_dir, "ck-views", TrainConfig())
    yc, y6 = ck.labels, e6.labels
    print("| setting | seed | source-only | mmd-full | source drop, gate (pts) | verdict | failed gates "
          "| DEV AUC | ESS frac | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for seed in args.seeds:
        tr, es, va = face_split(ck.records, seed)
        ad, te = stratified_split(e6.records, 0.5, seed + 300)  # as bench/adapt.py
        model = train_model(ck_views[tr], yc[tr], ck_views[es, 0], yc[es], seed, 40, args.cache_dir,
                            "model-faces", source_net(args.single_level))
        cfg = copy.deepcopy(acfg)
        cfg.seed = seed
        src = source_set(ck.records, yc, ck_views, tr, prep)
        va_x = prep.normalize(condition_images(ck.records, va, "clean", 0, prep))
        ad_x = prep.normalize(condition_images(e6.records, ad, "clean", 0, prep))
        y_va = torch.as_tensor(yc[va])
        so = accuracy(model, e6_views[te, 0].float(), y6[te])
        t = time.perf_counter()
        res = get_adapter("mmd").adapt(model, src, CachedSet(h=e6_views[ad, 0].float(), images=ad_x), cfg)
        m = res.model
        rep = judge(m, model, ck_views[va, 0].float(), y_va, va_x, e6_views[ad, 0].float(), ad_x)
        secs = time.perf_counter() - t
        te_x = prep.normalize(condition_images(e6.records, te, "clean", 0, prep))
        a = accuracy(m, cache_activations(m, te_x), y6[te])
        failed = [k for k, g in rep.gates.items() if not g["passed"]]
        print(f"| faces→photos | {seed} | {so:.3f} | {a:.3f} | "
              f"{100 * (rep.champion_source_acc - rep.source_acc):+.1f} | {rep.verdict} | {failed} | "
              f"{rep.dev.domain_auc:.3f} | {rep.dev.ess_fraction:.2f} | {secs:.0f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--cache-dir", type=Path, default=REPO / ".emowatch" / "cache" / "bench")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--conditions", nargs="+", default=["blur", "night"])
    ap.add_argument("--methods", nargs="+", default=["oracle-full", "mmd-full"],
                    choices=["oracle-full", "mmd-full"])
    ap.add_argument("--severity", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="default: models.adapt.base.BACKBONE_STEPS")
    ap.add_argument("--mmd-weight", type=float, default=None)
    ap.add_argument("--backbone-lr-mult", type=float, default=1.0)
    ap.add_argument("--faces", action="store_true",
                    help="the paper's setting instead: trained on CK+48 faces, site = Emotion6 photos")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="time_budget_s (default: the shipped 600 s); a run that hits "
                         "it stops early and is logged")
    add_single_level_flag(ap)
    args = ap.parse_args()
    torch.set_num_threads(2)
    acfg = with_backbone(DiscrepancyConfig(), args.backbone_lr_mult)
    if args.steps is not None:
        acfg.steps = args.steps
    if args.mmd_weight is not None:
        acfg.mmd_weight = args.mmd_weight
    if args.time_budget is not None:
        acfg.time_budget_s = args.time_budget
    log(f"config {acfg.to_dict()}")
    e6, prep, views = emotion6_views(args.data_dir, args.cache_dir)
    if args.faces:
        faces_to_photos(args, acfg, e6, prep, views)
        return
    y6 = e6.labels
    print("| site | seed | method | source-only | clean | site acc | gap recovered | "
          "source drop, gate (pts) | source drop, wide (pts) | verdict | failed gates | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for seed in args.seeds:
        (tr, es, va, ad, te), model = photos_model(e6, views, seed, args.cache_dir,
                                                   ncfg=source_net(args.single_level))
        cfg = copy.deepcopy(acfg)
        cfg.seed = seed
        src = source_set(e6.records, y6, views, tr, prep)
        va_x = prep.normalize(condition_images(e6.records, va, "clean", 0, prep))
        te_clean_x = prep.normalize(condition_images(e6.records, te, "clean", 0, prep))
        y_va = torch.as_tensor(y6[va])
        h_va = views[va, 0].float()
        # the gate's 126 photos plus the clean site-test photos, as in bench/adapt.py
        y_wide = np.concatenate([y6[va], y6[te]])
        gate0, wide0 = source_accuracies(model, va_x, te_clean_x, y6[va], y_wide)
        clean = accuracy(model, views[te, 0].float(), y6[te])
        log(f"seed {seed}: {len(tr)} source photos decoded")
        for c in args.conditions:
            ad_x = prep.normalize(condition_images(e6.records, ad, c, args.severity, prep))
            te_x = prep.normalize(condition_images(e6.records, te, c, args.severity, prep))
            h_ad = cache_activations(model, ad_x)
            so = accuracy(model, cache_activations(model, te_x), y6[te])
            for meth in args.methods:
                t = time.perf_counter()
                verdict, failed = "-", "-"
                if meth == "oracle-full":
                    m = oracle_full(model, src, ad_x, torch.as_tensor(y6[ad]), cfg)
                else:
                    res = get_adapter("mmd").adapt(model, src, CachedSet(h=h_ad, images=ad_x), cfg)
                    m = res.model
                    if res.stopped_early:
                        log(f"{c} seed {seed}: time budget hit after {res.steps_done} of {cfg.steps} steps")
                    rep = judge(m, model, h_va, y_va, va_x, h_ad, ad_x)
                    verdict = rep.verdict
                    failed = str([k for k, g in rep.gates.items() if not g["passed"]])
                secs = time.perf_counter() - t
                a = accuracy(m, cache_activations(m, te_x), y6[te])
                gate1, wide1 = source_accuracies(m, va_x, te_clean_x, y6[va], y_wide)
                print(f"| {c}{args.severity} | {seed} | {meth} | {so:.3f} | {clean:.3f} | {a:.3f} | "
                      f"{gap_recovered(a, so, clean):+.2f} | {100 * (gate0 - gate1):+.1f} | "
                      f"{100 * (wide0 - wide1):+.1f} | {verdict} | {failed} | {secs:.0f} |",
                      flush=True)


if __name__ == "__main__":
    main()
