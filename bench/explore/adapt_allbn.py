"""Exploratory: AdaBN over the WHOLE network (adabn_scope "all") on Emotion6 night/blur sites.

Same splits, source models and site conditions as bench/adapt.py (photos setting). For each
site_bn_weight w, the frozen part's BN statistics are re-estimated on the site's adaptation
photos (raw images), mixed with the champion's, then the top and bottleneck's likewise; the
candidate is scored on the held-out site photos and on the gate's clean source split.

    .venv/bin/python -m bench.explore.adapt_allbn --seeds 0 1 2 --weights 1 0.5
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import (
    REPO,
    accuracy,
    add_single_level_flag,
    condition_images,
    emotion6_views,
    gap_recovered,
    log,
    photos_model,
    source_net,
)
from models.adapt.base import batches, cache_activations
from models.adapt.bn import adapt_top_bn, bn_modules, bn_stats, mix_bn_stats, reestimate_bn
from models.network import EmotionNet


@torch.no_grad()
def adapt_all(model: EmotionNet, site_u8: np.ndarray, w: float, prep) -> EmotionNet:
    m = copy.deepcopy(model).eval()
    fbns = bn_modules(m.frozen)
    before = bn_stats(fbns)
    x = prep.normalize(site_u8)
    reestimate_bn(fbns, m.frozen_forward, batches(x, 64))
    for b in fbns:
        b.eval()
    if w < 1:
        mix_bn_stats(fbns, before, w)
    h = cache_activations(m, x, 64)
    adapt_top_bn(m, h, 128, include_top=True, site_weight=w)
    return m.eval()


@torch.no_grad()
def acc_raw(model, u8, y, prep) -> float:
    h = cache_activations(model, prep.normalize(u8), 64)
    return accuracy(model, h, y)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--cache-dir", type=Path, default=REPO / ".emowatch" / "cache" / "bench")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--conditions", nargs="+", default=["night", "blur"])
    ap.add_argument("--weights", type=float, nargs="+", default=[1.0, 0.5])
    ap.add_argument("--severity", type=int, default=2)
    add_single_level_flag(ap)
    args = ap.parse_args()
    torch.set_num_threads(2)
    e6, prep, views = emotion6_views(args.data_dir, args.cache_dir)
    y6 = e6.labels
    print("| site | seed | w | source-only | clean | site acc | gap recovered | source acc | "
          "source drop (pts) | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for seed in args.seeds:
        (tr, es, va, ad, te), model = photos_model(e6, views, seed, args.cache_dir,
                                                   ncfg=source_net(args.single_level))
        va_u8 = condition_images(e6.records, va, "clean", 0, prep)
        src0 = accuracy(model, views[va, 0].float(), y6[va])
        clean = accuracy(model, views[te, 0].float(), y6[te])
        for c in args.conditions:
            ad_u8 = condition_images(e6.records, ad, c, args.severity, prep)
            te_u8 = condition_images(e6.records, te, c, args.severity, prep)
            so = acc_raw(model, te_u8, y6[te], prep)
            for w in args.weights:
                t = time.perf_counter()
                m = adapt_all(model, ad_u8, w, prep)
                secs = time.perf_counter() - t
                a = acc_raw(m, te_u8, y6[te], prep)
                s = acc_raw(m, va_u8, y6[va], prep)
                gap = gap_recovered(a, so, clean)
                print(f"| {c}{args.severity} | {seed} | {w} | {so:.3f} | {clean:.3f} | {a:.3f} | "
                      f"{gap:+.2f} | {s:.3f} | {100 * (src0 - s):+.1f} | {secs:.0f} |", flush=True)
            log(f"seed {seed} {c} done")


if __name__ == "__main__":
    main()
