"""Benchmark: DnCShap vs occlusion vs integrated gradients (and SHAP's PartitionExplainer when
``shap`` is importable; it is not a dependency, so it is skipped otherwise).

Sections (each prints a markdown table):

* ``synthetic``: a model trained (models.train.train_source) on synthetic faces whose class is
  carried only by the brows and mouth (models.sim.synthetic); pointing game, mask energy,
  deletion/insertion AUC, model calls and seconds per image.
* ``photos``: an EfficientNet-Lite0 model trained on the Emotion6 train split (or
  ``--checkpoint``); deletion/insertion AUC on held-out photos (regions: the same granularity
  for every method; pixels: 32 steps), calls and seconds per image.
* ``timing``: one DnCShap explanation of one photo at the model's resolution: depth, batch size,
  bf16 autocast, and a smaller input resolution for the model (an approximation: it explains the
  model run at that size; its agreement with the full-resolution explanation is reported).

    .venv/bin/python -m bench.explain --data-dir /work/shared/data
    .venv/bin/python -m bench.explain --sections synthetic timing --n-photos 8

Timings are wall-clock on this machine with --threads torch threads; when other jobs share the
cores they are pessimistic.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import REPO
from models.explain.base import DnCShap, Explainer, IntegratedGradients, Occlusion
from models.explain.metrics import (
    cosine_similarity,
    deletion_insertion,
    mask_energy,
    pointing_game,
    rank_correlation,
)
from models.network import NetConfig, Preprocessing, load_checkpoint, save_checkpoint
from models.sim.synthetic import make_faces

E6_CLASSES = ["anger", "disgust", "fear", "joy", "sadness", "surprise"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def explainers(model, depth: int, ig_steps: int) -> dict[str, Explainer]:
    """Default settings (batch 4, bf16 where native). DnCShap with one context and occlusion one
    level deeper make the SAME number of model calls (2^(D+1) vs 2^(D+1) + 2): compare their
    pixel-level AUCs, which do not depend on the region granularity."""
    return {
        f"DnCShap (depth {depth})": DnCShap(model, depth=depth),
        f"DnCShap (depth {depth}, one context)": DnCShap(model, depth=depth, contexts="present"),
        f"Occlusion (depth {depth})": Occlusion(model, depth=depth),
        f"Occlusion (depth {depth + 1})": Occlusion(model, depth=depth + 1),
        f"IntegratedGradients ({ig_steps} steps)": IntegratedGradients(model, steps=ig_steps,
                                                                      depth=depth, batch_size=16),
    }


def shap_note() -> str | None:
    try:
        import shap  # noqa: F401
    except ImportError:
        return "SHAP PartitionExplainer: skipped (`shap` is not installed)."
    return "SHAP PartitionExplainer: `shap` is importable but not wired in yet (skipped)."


def evaluate(model, x: torch.Tensor, exps: dict[str, Explainer], masks: np.ndarray | None,
             baseline: str) -> list[dict]:
    rows = []
    for name, e in exps.items():
        t0 = time.perf_counter()
        a = e.attribute(x, baseline=baseline)
        secs = (time.perf_counter() - t0) / x.shape[0]
        fr = deletion_insertion(model, x, a, baseline=baseline)
        fp = deletion_insertion(model, x, a, baseline=baseline, unit="pixels", steps=32)
        row = {"method": name, "del_r": fr.deletion_auc.mean(), "ins_r": fr.insertion_auc.mean(),
               "del_p": fp.deletion_auc.mean(), "ins_p": fp.insertion_auc.mean(),
               "gap": np.abs(a.efficiency_gap).max(), "calls": a.model_calls.mean(), "s": secs}
        if masks is not None:
            row["pg"] = pointing_game(a.maps, masks).mean()
            row["energy"] = mask_energy(a.maps, masks).mean()
        rows.append(row)
        log(f"{name}: {secs:.2f} s/img")
    return rows


def table(rows: list[dict], with_masks: bool) -> str:
    head = "| method | "
    head += "pointing game | mask energy | " if with_masks else ""
    head += ("deletion AUC (regions) ↓ | insertion AUC (regions) ↑ | deletion AUC (pixels) ↓ | "
             "insertion AUC (pixels) ↑ | max efficiency gap | model calls / img | s / img |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in rows:
        cells = [r["method"]]
        if with_masks:
            cells += [f"{r['pg']:.3f}", f"{r['energy']:.3f}"]
        cells += [f"{r['del_r']:.3f}", f"{r['ins_r']:.3f}", f"{r['del_p']:.3f}",
                  f"{r['ins_p']:.3f}", f"{r['gap']:.1e}", f"{r['calls']:.0f}", f"{r['s']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- sections ---------------------------------------------------------------------------------
def synthetic_section(args) -> None:
    from models.train import TrainConfig, train_source

    size = 64 if args.synthetic_backbone == "tiny" else 224
    train = make_faces(args.synthetic_train, size, seed=0)
    ncfg = NetConfig(backbone=args.synthetic_backbone, img_size=size, pretrained=True,
                     dropout=0.0)
    # The tiny backbone is random-initialised: it trains at the head's learning rate. No
    # flips/crops: the label regions are at known places.
    tcfg = TrainConfig(epochs=args.synthetic_epochs, lr_top=5e-3 if size == 64 else 1e-4,
                       lr_head=5e-3 if size == 64 else 1e-3, flip=False, crops=0,
                       label_smoothing=0.0, patience=args.synthetic_epochs, seed=0)
    t0 = time.perf_counter()
    res = train_source(train, train.classes, ncfg, tcfg)
    log(f"synthetic model: val acc {res.val_metrics.accuracy:.3f} in "
        f"{time.perf_counter() - t0:.0f} s")
    model = res.checkpoint.model.eval()
    test = make_faces(args.n_synthetic, size, seed=99)
    x = Preprocessing(img_size=size).normalize(test.images)
    with torch.no_grad():
        acc = float((model(x).argmax(1).numpy() == test.labels).mean())
    rows = evaluate(model, x, explainers(model, args.depth, args.ig_steps), test.masks,
                    args.baseline)
    print(f"\n### Synthetic faces ({args.synthetic_backbone}, {size} px, {len(test)} test faces, "
          f"model accuracy {acc:.3f}, baseline {args.baseline})\n")
    print(table(rows, with_masks=True))
    print(f"\nmask area: {test.masks.mean():.3f} of the image (chance level of mask energy).")


def photo_model(args):
    from models.data import read_image_folder, three_way_split

    if args.checkpoint:
        ckpt = load_checkpoint(args.checkpoint)
        log(f"loaded {args.checkpoint}")
    else:
        from models.train import TrainConfig, train_source

        data = read_image_folder(args.data_dir / "emotion6", classes=E6_CLASSES)
        tr, va, _ = three_way_split(data.records, 0.15, 0.15, seed=0)
        path = args.cache_dir / f"e6-{args.img_size}-seed0.pt"
        if path.exists():
            ckpt = load_checkpoint(path)
            log(f"loaded cached model {path}")
        else:
            log("training the Emotion6 model (frozen forwards dominate; cached afterwards)")
            # crops=0: two views (image + mirror) halve the caching time of the default recipe
            tcfg = TrainConfig(crops=0, epochs=25, patience=6, seed=0)
            res = train_source(data.subset(tr), E6_CLASSES,
                               NetConfig(img_size=args.img_size), tcfg,
                               val=data.subset(va))
            ckpt = res.checkpoint
            log(f"Emotion6 model: val acc {res.val_metrics.accuracy:.3f}, "
                f"{res.total_seconds:.0f} s")
            path.parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint(ckpt, path)
    return ckpt


def photo_images(args, ckpt) -> tuple[torch.Tensor, np.ndarray]:
    from models.data import load_arrays, read_image_folder, three_way_split

    data = read_image_folder(args.data_dir / "emotion6", classes=E6_CLASSES)
    _, _, te = three_way_split(data.records, 0.15, 0.15, seed=0)
    rng = np.random.default_rng(0)
    pick = rng.choice(te, size=min(args.n_photos, len(te)), replace=False)
    arr = load_arrays([data.records[i] for i in pick], ckpt.preprocessing)
    return ckpt.preprocessing.normalize(arr), data.labels[pick]


def photos_section(args, ckpt, x, y) -> None:
    model = ckpt.model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(1).numpy() == y).mean())
    rows = evaluate(model, x, explainers(model, args.depth, args.ig_steps), None, args.baseline)
    print(f"\n### Emotion6 photos ({x.shape[-1]} px, {x.shape[0]} test photos, model accuracy "
          f"on them {acc:.3f}, baseline {args.baseline})\n")
    print(table(rows, with_masks=False))


class _Resized(torch.nn.Module):
    """The model run on inputs resized to ``size`` (what it explains is THAT function)."""

    def __init__(self, model, size: int) -> None:
        super().__init__()
        self.model, self.size = model, size

    def forward(self, x):
        return self.model(F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                                        antialias=True, align_corners=False))


def timing_section(args, ckpt, x) -> None:
    model = ckpt.model.eval()
    size = x.shape[-1]
    ref = DnCShap(model, depth=6, precision="fp32").attribute(x[:1])
    variants = [  # (name, depth, model, batch, precision, contexts)
        ("fp32, batch 32 (the old default)", 6, model, 32, "fp32", "both"),
        ("fp32, batch 4", 6, model, 4, "fp32", "both"),
        ("bf16, batch 32", 6, model, 32, "bf16", "both"),
        ("bf16, batch 4 (default where the CPU has bf16)", 6, model, 4, "bf16", "both"),
        ("bf16, batch 4, one context (present)", 6, model, 4, "bf16", "present"),
        ("fp32, batch 4, one context (present)", 6, model, 4, "fp32", "present"),
        ("bf16, batch 4 (the promotion gate's depth)", 4, model, 4, "bf16", "both"),
        (f"bf16, batch 4, input resized {size}->112", 6, _Resized(model, 112), 4, "bf16", "both"),
    ]
    n = min(args.timing_images, len(x))
    print(f"\n### One DnCShap explanation, {size} px photo, {torch.get_num_threads()} threads "
          f"(mean of {n} photos; agreement with fp32 'both' at depth 6)\n")
    print("| variant | depth | regions | model calls | seconds | img/s | rank corr. | cosine |")
    print("|---|---|---|---|---|---|---|---|")
    refs = DnCShap(model, depth=6, precision="fp32").attribute(x[:n])
    for name, depth, m, bs, prec, ctx in variants:
        e = DnCShap(m, depth=depth, batch_size=bs, precision=prec, contexts=ctx)
        e.attribute(x[:1], target=ref.targets)  # warm-up (allocator, oneDNN primitives)
        secs, rcs, css = [], [], []
        for i in range(n):
            t0 = time.perf_counter()
            a = e.attribute(x[i:i + 1], target=refs.targets[i:i + 1])
            secs.append(time.perf_counter() - t0)
            if depth == 6:
                r1 = refs.take(i)
                rcs.append(rank_correlation(a, r1)[0])
                css.append(cosine_similarity(a, r1)[0])
        rc = f"{np.mean(rcs):.3f}" if rcs else "n/a"
        cs = f"{np.mean(css):.3f}" if css else "n/a"
        calls = int(a.model_calls[0])
        sec = float(np.mean(secs))
        print(f"| {name} | {depth} | {2 ** depth} | {calls} | {sec:.2f} | {calls / sec:.1f} | "
              f"{rc} | {cs} |", flush=True)
        log(f"timing {name} d{depth}: {sec:.2f} s")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--cache-dir", type=Path, default=REPO / ".emowatch" / "cache" / "bench" / "explain")
    ap.add_argument("--sections", nargs="+", default=["synthetic", "photos", "timing"],
                    choices=["synthetic", "photos", "timing"])
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="an emowatch checkpoint to explain instead of training on Emotion6")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--ig-steps", type=int, default=32)
    ap.add_argument("--baseline", default="blur", choices=["blur", "mean", "zeros"])
    ap.add_argument("--n-photos", type=int, default=16)
    ap.add_argument("--timing-images", type=int, default=4, help="photos timed per variant")
    ap.add_argument("--n-synthetic", type=int, default=100)
    ap.add_argument("--synthetic-train", type=int, default=1000)
    ap.add_argument("--synthetic-epochs", type=int, default=8)
    ap.add_argument("--synthetic-backbone", default="tiny", choices=["tiny", "efficientnet-lite0"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    print(f"# Explanation benchmark (torch {torch.__version__}, {args.threads} threads)")
    note = shap_note()
    if note:
        print(f"\n{note}")
    if "synthetic" in args.sections:
        synthetic_section(args)
    if {"photos", "timing"} & set(args.sections):
        if not (args.data_dir / "emotion6").is_dir():
            print(f"\nEmotion6 not found under {args.data_dir}: photos/timing skipped "
                  "(pass --data-dir).")
            return
        ckpt = photo_model(args)
        x, y = photo_images(args, ckpt)
        if "photos" in args.sections:
            photos_section(args, ckpt, x, y)
        if "timing" in args.sections:
            timing_section(args, ckpt, x)


if __name__ == "__main__":
    main()
