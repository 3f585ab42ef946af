"""Training-recipe sweep on Emotion6 over several seeds, from cached frozen activations.

``bench/train.py`` measures the shipped recipe end to end (decode, cache, train, evaluate).
This script answers "would another setting do better?" cheaply: the frozen views of every
Emotion6 photo (image, mirror, 2 crops; the same cache as ``bench/adapt.py``) are computed
once, then ``models.train._fit`` runs each variant on each seed's 70/15/15 split
(``three_way_split``, as in bench/train.py). Per seed it reports the kept epoch, the
validation and test accuracy there, and both with flip test-time augmentation (softmax of the
image and its mirror averaged; not what ``emowatch predict`` does: over seeds 0-4 it added 0.4
points on validation and 0.2 on test, bench/results/train.md). ``--probe`` adds the data README's baseline: logistic regression on the unmodified
ImageNet network's pooled features, C chosen on val.

Choose a variant by its VALIDATION accuracy; the test column is there to report, not to pick.

    .venv/bin/python -m bench.train_sweep --probe
    .venv/bin/python -m bench.train_sweep --variant 'lowtop={"lr_top": 3e-5}' --seeds 0 1 2
    .venv/bin/python -m bench.train_sweep --variant 'soft={"soft_label_weight": 0.5}'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import E6_CLASSES, REPO, views_activations  # the same cache as bench.adapt
from bench.emotion6 import label_distributions, read_emotion6_ground_truth
from bench.train import fit_probe
from models.data import read_image_folder, three_way_split
from models.network import EmotionNet, NetConfig
from models.train import TrainConfig, cached_logits, eval_cached, fit_cached


def run_variant(h: torch.Tensor, y: np.ndarray, records, seed: int, overrides: dict,
                soft: np.ndarray | None = None, ncfg: NetConfig | None = None) -> dict:
    tr, va, te = three_way_split(records, 0.15, 0.15, seed)
    overrides = dict(overrides)
    soft_weight = float(overrides.pop("soft_label_weight", 0.0))  # not a TrainConfig field
    cfg = TrainConfig(seed=seed, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = EmotionNet(ncfg or NetConfig(num_classes=len(E6_CLASSES)))
        t = time.perf_counter()
        hist, best, best_epoch = fit_cached(model, h[tr], y[tr], h[va, :1], y[va], cfg, None,
                                      soft[tr] if soft is not None else None, soft_weight)
        secs = time.perf_counter() - t
    model.load_state_dict(best)
    model.eval()
    _, pred = eval_cached(model, h[te, :1], torch.as_tensor(y[te]))
    kept = next(r for r in hist if r["epoch"] == best_epoch)
    return {"seed": seed, "best_epoch": best_epoch, "epochs_run": len(hist),
            "phase": kept["phase"], "val_acc": kept["val_acc"],
            "test_acc": float((pred == y[te]).mean()),
            "val_acc_flip_tta": flip_tta_accuracy(model, h[va], y[va]),
            "test_acc_flip_tta": flip_tta_accuracy(model, h[te], y[te]), "seconds": secs}


def flip_tta_accuracy(model: EmotionNet, h: torch.Tensor, y: np.ndarray) -> float:
    """Accuracy of the softmax averaged over view 0 (the image) and view 1 (its mirror)."""
    with torch.no_grad():
        p = cached_logits(model, h[:, 0].float()).softmax(1) + cached_logits(model, h[:, 1].float()).softmax(1)
    return float((p.argmax(1).numpy() == y).mean())


def probe_features(h: torch.Tensor, ncfg: NetConfig) -> np.ndarray:
    """Pooled ImageNet features of every photo (the unmodified pre-trained top, 1280-d, as the
    data README's baseline; seed-free)."""
    net = EmotionNet(dataclasses.replace(ncfg, multilevel=False)).eval()
    with torch.no_grad():
        return torch.cat([net.top(h[s:s + 128, 0].float()) for s in range(0, len(h), 128)]).numpy()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path,
                    default=Path(os.environ.get("EMOWATCH_DATA_DIR") or REPO.parent / "shared" / "data"))
    ap.add_argument("--cache-dir", type=Path, default=REPO / ".emowatch" / "cache" / "bench")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                    help="TrainConfig overrides, e.g. 'lowtop={\"lr_top\": 3e-5}'; "
                         "'default' is always run first")
    ap.add_argument("--probe", action="store_true")
    ap.add_argument("--skip-default", action="store_true",
                    help="do not run the shipped recipe (e.g. when its rows are already known)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backbone", default="efficientnet-lite0",
                    choices=["efficientnet-lite0"])
    ap.add_argument("--single-level", action="store_true",
                    help="NetConfig.multilevel = False (the recipe before 2026-11-27 session 6)")
    ap.add_argument("--img-size", type=int, default=224,
                    help="input resolution (NetConfig.img_size); its own activation cache")
    args = ap.parse_args(argv)
    if not args.data_dir.is_dir():
        ap.error(f"data not found at {args.data_dir} (set --data-dir or EMOWATCH_DATA_DIR)")
    torch.set_num_threads(args.threads)
    variants = {} if args.skip_default else {"default": {}}
    for spec in args.variant:
        name, _, js = spec.partition("=")
        variants[name] = json.loads(js) if js else {}

    e6 = read_image_folder(args.data_dir / "emotion6", classes=E6_CLASSES)
    ncfg = NetConfig(num_classes=len(E6_CLASSES), img_size=args.img_size, backbone=args.backbone,
                     multilevel=not args.single_level)
    fmodel = EmotionNet(ncfg).eval()
    with torch.no_grad():
        h = views_activations(fmodel, e6.records, args.cache_dir, "e6-views", TrainConfig())
    y = e6.labels
    # Annotator votes, for variants with "soft_label_weight" > 0: the training target is
    # (1 - w) one-hot(folder) + w votes (over the 6 classes; neutral dropped). Test accuracy
    # stays on the folder labels.
    soft = label_distributions(e6.records, E6_CLASSES,
                               read_emotion6_ground_truth(args.data_dir / "emotion6"))

    print("| variant | seed | kept epoch (phase) | val acc | val acc, flip TTA | test acc | "
          "test acc, flip TTA | fit s |")
    print("|---|---|---|---|---|---|---|---|")
    summary = []
    for name, ov in variants.items():
        rows = [run_variant(h, y, e6.records, s, ov, soft, ncfg) for s in args.seeds]
        for r in rows:
            print(f"| {name} | {r['seed']} | {r['best_epoch']}/{r['epochs_run']} ({r['phase']}) | "
                  f"{r['val_acc']:.3f} | {r['val_acc_flip_tta']:.3f} | {r['test_acc']:.3f} | {r['test_acc_flip_tta']:.3f} | "
                  f"{r['seconds']:.0f} |", flush=True)
        summary.append((name, *(float(np.mean([r[k] for r in rows]))
                                for k in ("val_acc", "val_acc_flip_tta", "test_acc",
                                          "test_acc_flip_tta"))))
    if args.probe:
        f = probe_features(h, ncfg)
        pr = [fit_probe(f, y, three_way_split(e6.records, 0.15, 0.15, s)) for s in args.seeds]
        summary.append(("linear probe", float("nan"), float("nan"), float(np.mean(pr)), float("nan")))
        print(f"\nlinear probe test accuracy per seed: {', '.join(f'{p:.3f}' for p in pr)}")
    print(f"\n| variant | mean val acc | mean val acc, flip TTA | mean test acc | "
          f"mean test acc, flip TTA |  (seeds {args.seeds})")
    print("|---|---|---|---|---|")
    for name, v, vf, t, f in summary:
        print(f"| {name} | {v:.3f} | {vf:.3f} | {t:.3f} | {f:.3f} |".replace("nan", "–"))


if __name__ == "__main__":
    main()
