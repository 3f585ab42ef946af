"""Benchmark: unsupervised re-adaptation + label-free validation on real data.

Settings (each over several seeds; a seed draws the splits and the source training):

* photos -> photos under a site condition: a model trained on Emotion6 photos (train split);
  the site is OTHER Emotion6 photos under ``night``, ``blur``, ... Half of the site photos are
  the unlabelled adaptation set, the other half (labelled) measures site accuracy.
* faces -> photos (the paper's setting): trained on CK+48 faces (6 shared classes, happy ->
  joy); the site is Emotion6 photos. A change of concept: the verdict must never be "pass".

Per method: site accuracy on held-out site images, source-only / clean / oracle references,
the share of the gap recovered, source validation accuracy drop, gates, verdict, seconds.

    gap recovered (clean)  = (acc_method - acc_source_only) / (acc_clean - acc_source_only)
        acc_clean: the source model on the SAME site test photos without the condition; this is
        "the share of the accuracy lost to the condition that adaptation wins back".
    gap recovered (oracle) = (acc_method - acc_source_only) / (acc_oracle - acc_source_only)
        acc_oracle: the source model fine-tuned with the site adaptation images' LABELS
        (source CE + site CE, same steps and optimiser as mmd).

Frozen activations (the same for every model: the frozen part is the ImageNet backbone) are
cached under --cache-dir, so a rerun skips the slow part.

    .venv/bin/python -m bench.adapt --data-dir /work/shared/data
    .venv/bin/python -m bench.adapt --data-dir ... --seeds 0 --conditions night --methods mmd
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import (
    CONDITION_IDS,
    E6_CLASSES,
    REPO,
    accuracy,
    add_single_level_flag,
    condition_activations,
    condition_array,
    condition_images,
    face_split,
    gap_recovered,
    log,
    oracle,
    photos_model,
    site_ce,
    source_net,
    train_model,
    views_activations,
)
from models.adapt.base import CachedSet, available_adapters, cache_activations, get_adapter
from models.adapt.discrepancy import DiscrepancyConfig, with_backbone
from models.data import read_image_folder, stratified_split
from models.network import EmotionNet, NetConfig, preprocessing_for
from models.train import TrainConfig
from models.validate.candidate import ValidationConfig, validate_candidate


# --- one setting, one seed ----------------------------------------------------------------------
def run_site(setting, seed, model, src_views, y_src, h_va, y_va, h_adapt, h_test, y_test,
             h_test_clean, y_adapt, methods, acfg, vcfg, rows, overrides=None) -> None:
    h_src = src_views[:, :2].flatten(0, 1).float()  # image + mirror: (2N, C, s, s)
    ys = torch.as_tensor(np.repeat(np.asarray(y_src), 2))
    h_adapt, h_test, h_va = h_adapt.float(), h_test.float(), h_va.float()
    y_test_t = torch.as_tensor(y_test)
    base = {"setting": setting, "seed": seed}
    acc_src_only = accuracy(model, h_test, y_test)
    acc_clean = accuracy(model, h_test_clean.float(), y_test) if h_test_clean is not None else float("nan")
    src_acc0 = accuracy(model, h_va, y_va)
    # The gate's 126 photos resolve 0.8 points; the clean versions of the site test photos
    # (never trained or adapted on) triple the held-out source sample for the REPORTED drop.
    h_wide = torch.cat([h_va, h_test_clean.float()]) if h_test_clean is not None else h_va
    y_wide = np.concatenate([np.asarray(y_va), np.asarray(y_test)]) if h_test_clean is not None else np.asarray(y_va)
    wide0 = accuracy(model, h_wide, y_wide)
    t = time.perf_counter()
    orc = oracle(model, h_src, ys, h_adapt, torch.as_tensor(y_adapt), acfg)
    acc_oracle = accuracy(orc, h_test, y_test)
    log(f"{setting} seed {seed}: source-only {acc_src_only:.3f} clean {acc_clean:.3f} "
        f"oracle {acc_oracle:.3f} ({time.perf_counter() - t:.0f} s)")
    ref = {"acc_source_only": acc_src_only, "acc_clean": acc_clean, "acc_oracle": acc_oracle,
           "source_acc_before": src_acc0, "site_ce_champion": site_ce(model, h_test, y_test)}
    rows.append({**base, **ref, "method": "source-only", "acc": acc_src_only, "source_drop": 0.0,
                 "source_drop_wide": 0.0, "n_wide": len(y_wide), "verdict": "-", "seconds": 0.0})
    for name in methods:
        ad = get_adapter(name)
        # each method's own defaults (e.g. coral's weight), then the command-line overrides
        cfg = ad.default_config()
        for k, v in (overrides or {}).items():
            if hasattr(cfg, k):
                setattr(cfg, k, v)
        cfg.seed = seed
        res = ad.adapt(model, (h_src, ys) if ad.needs_source else None, h_adapt, cfg)
        rep = validate_candidate(res.model, model, (h_va, torch.as_tensor(y_va)), h_adapt, vcfg)
        acc = accuracy(res.model, h_test, y_test_t)
        row = {**base, **ref, "method": name, "acc": acc,
               "source_drop": rep.champion_source_acc - rep.source_acc,
               "source_drop_wide": wide0 - accuracy(res.model, h_wide, y_wide), "n_wide": len(y_wide),
               "verdict": rep.verdict, "seconds": res.seconds,
               "dev_risk": rep.dev.risk, "dev_champion": rep.champion_dev.risk,
               "site_ce": site_ce(res.model, h_test, y_test),
               "dev_auc": rep.dev.domain_auc, "dev_auc_champion": rep.champion_dev.domain_auc,
               "dev_ess": rep.dev.ess_fraction, "dev_unverifiable": rep.dev.unverifiable,
               "champion_unverifiable": rep.champion_dev.unverifiable,
               "mmd2_before": rep.mmd2_before, "mmd2_after": rep.mmd2_after,
               **{f"gate_{k}": g["passed"] for k, g in rep.gates.items()},
               **{f"gv_{k}": g["value"] for k, g in rep.gates.items()}}
        rows.append(row)
        log(f"  {name:8s} acc {acc:.3f} src-drop {row['source_drop']:+.3f} "
            f"(on {len(y_wide)}: {row['source_drop_wide']:+.3f}) {rep.verdict} "
            f"auc {rep.dev.domain_auc:.3f}/{rep.champion_dev.domain_auc:.3f} "
            f"ess {rep.dev.ess_fraction:.2f} dev {rep.dev.risk:.3f}/{rep.champion_dev.risk:.3f} "
            f"mmd2 {rep.mmd2_before:.4f}->{rep.mmd2_after:.4f} "
            f"gates {[k for k, g in rep.gates.items() if not g['passed']]} {res.seconds:.0f} s")


# --- tables ---------------------------------------------------------------------------------------
def _ms(v: list[float], pct: bool = True) -> str:
    a = np.asarray([x for x in v if x == x], dtype=float)
    if a.size == 0:
        return "n/a"
    k = 100.0 if pct else 1.0
    return f"{k * a.mean():.1f} ± {k * a.std(ddof=1) if a.size > 1 else 0.0:.1f}"


def _gap(r: dict) -> float:
    return gap_recovered(r["acc"], r["acc_source_only"], r["acc_clean"])


def by_setting_and_method(rows: list[dict]):
    """(setting, method, rows of every seed) in the order they first appear."""
    for s in dict.fromkeys(r["setting"] for r in rows):
        rs = [r for r in rows if r["setting"] == s]
        for m in dict.fromkeys(r["method"] for r in rs):
            yield s, m, [r for r in rs if r["method"] == m]


def print_tables(rows: list[dict]) -> None:
    print("| setting | seed | method | site acc | gap recovered (clean) | source drop, gate split "
          "| source drop, wide | verdict | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["method"] == "source-only":
            continue
        print(f"| {r['setting']} | {r['seed']} | {r['method']} | {r['acc']:.3f} | {_gap(r):+.2f} "
              f"| {100 * r['source_drop']:+.1f} pts | {100 * r['source_drop_wide']:+.1f} pts "
              f"(n={r['n_wide']}) | {r['verdict']} | {r['seconds']:.0f} |")
    print("\n| setting | method | site acc % | clean % | oracle % | gap rec. vs clean % "
          "| gap rec. vs oracle % | source drop pts (gate) | source drop pts (wide) | verdicts | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s, m, g in by_setting_and_method(rows):
        rec_c = [_gap(r) for r in g]
        rec_o = [(r["acc"] - r["acc_source_only"]) / (r["acc_oracle"] - r["acc_source_only"])
                 if abs(r["acc_oracle"] - r["acc_source_only"]) > 1e-9 else float("nan") for r in g]
        verd = ",".join(sorted({str(r["verdict"]) for r in g}))
        counts = {v: sum(r["verdict"] == v for r in g) for v in ("pass", "fail", "unverifiable")}
        vtxt = verd if m == "source-only" else " ".join(f"{k}:{n}" for k, n in counts.items() if n)
        print(f"| {s} | {m} | {_ms([r['acc'] for r in g])} | {_ms([r['acc_clean'] for r in g])} "
              f"| {_ms([r['acc_oracle'] for r in g])} | {_ms(rec_c)} | {_ms(rec_o)} "
              f"| {_ms([r['source_drop'] for r in g])} | {_ms([r['source_drop_wide'] for r in g])} | {vtxt} "
              f"| {_ms([r['seconds'] for r in g], pct=False)} |")
    gated = [r for r in rows if r["method"] != "source-only"]
    if gated:
        print("\n| setting | method | gates failed (count over seeds) | DEV AUC cand/champ | ESS frac "
              "| DEV risk cand/champ | true site CE cand/champ | MMD² before→after |")
        print("|---|---|---|---|---|---|---|---|")
        for s, m, g in by_setting_and_method(gated):
            fails = {k[5:]: sum(not r[k] for r in g) for k in g[0] if k.startswith("gate_")}
            ftxt = ", ".join(f"{k}:{n}" for k, n in fails.items() if n) or "-"
            print(f"| {s} | {m} | {ftxt} | {np.mean([r['dev_auc'] for r in g]):.3f}/"
                  f"{np.mean([r['dev_auc_champion'] for r in g]):.3f} "
                  f"| {np.mean([r['dev_ess'] for r in g]):.2f} "
                  f"| {np.mean([r['dev_risk'] for r in g]):.3f}/{np.mean([r['dev_champion'] for r in g]):.3f} "
                  f"| {np.mean([r['site_ce'] for r in g]):.3f}/{np.mean([r['site_ce_champion'] for r in g]):.3f} "
                  f"| {np.mean([r['mmd2_before'] for r in g]):.4f}→{np.mean([r['mmd2_after'] for r in g]):.4f} |")


# --- end-to-end timing of one site ------------------------------------------------------------------
def time_one_site(args, acfg, vcfg, e6, e6_views, y6, n_site: int = 500,
                  backbone: bool = False) -> None:
    """Wall-clock of what the pipeline does for one site of ``n_site`` photos: decode + apply
    the condition + frozen forward (no disk cache), adapt (default method), validate.
    ``backbone``: mmd through the whole backbone (``with_backbone``), which also decodes the
    source training photos and validates on the candidate's own activations."""
    (tr, es, va, _, _), model = photos_model(e6, e6_views, 0, args.cache_dir, args.epochs,
                                             ncfg=source_net(args.single_level))
    used = set(tr) | set(es) | set(va)
    site = [r for i, r in enumerate(e6.records) if i not in used]
    site = (site * (n_site // len(site) + 1))[:n_site]  # reuse photos if the site pool is smaller
    prep = preprocessing_for(model.config)
    t0 = time.perf_counter()
    hs, xs = [], []
    with torch.no_grad():
        for s in range(0, n_site, 32):
            arrs = [condition_array(r.path, prep, "night", args.severity, s + j,
                                    np.random.default_rng([9, s + j]))
                    for j, r in enumerate(site[s:s + 32])]
            x = prep.normalize(np.stack(arrs))
            hs.append(model.frozen_forward(x))
            if backbone:
                xs.append(x)
    h_site = torch.cat(hs)
    t_cache = time.perf_counter() - t0
    rows = [(f"decode + condition + frozen forward ({n_site} site photos)", t_cache)]
    h_va, y_va = e6_views[va, 0].float(), torch.as_tensor(y6[va])
    own: dict = {}
    t1 = time.perf_counter()
    if backbone:
        source = CachedSet(h=e6_views[tr, 0].float(), labels=torch.as_tensor(y6[tr]),
                           images=prep.normalize(condition_images(e6.records, tr, "clean", 0, prep)))
        va_x = prep.normalize(condition_images(e6.records, va, "clean", 0, prep))
        rows.append((f"decode {len(tr)} source training + {len(va)} validation photos",
                     time.perf_counter() - t1))
        cfg = with_backbone(acfg)
        target = CachedSet(h=h_site, images=torch.cat(xs))
    else:
        source = (e6_views[tr][:, :2].flatten(0, 1).float(), torch.as_tensor(np.repeat(y6[tr], 2)))
        cfg, target = acfg, h_site
    t1 = time.perf_counter()
    res = get_adapter("mmd").adapt(model, source, target, cfg)
    rows.append((f"adapt (mmd{' through the whole backbone' if backbone else ''}, "
                 f"{res.steps_done} steps)", time.perf_counter() - t1))
    t2 = time.perf_counter()
    with torch.no_grad():
        if backbone:  # the candidate's own activations (its frozen part changed)
            own = {"site_candidate": cache_activations(res.model, target.images),
                   "source_candidate": (cache_activations(res.model, va_x), y_va)}
    rep = validate_candidate(res.model, model, (h_va, y_va), h_site, vcfg, **own)
    rows.append((f"validate (DEV x2 + gates) -> {rep.verdict}", time.perf_counter() - t2))
    print(f"\n| one site, {n_site} photos (night{args.severity}), threads {torch.get_num_threads()} "
          "| seconds |\n|---|---|")
    for name, secs in rows:
        print(f"| {name} | {secs:.0f} |")
    print(f"| total | {sum(secs for _, secs in rows):.0f} |")


# --- main -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--cache-dir", type=Path, default=REPO / ".emowatch" / "cache" / "bench")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--conditions", nargs="+", default=["night", "blur"],
                    choices=[c for c in CONDITION_IDS if c != "clean"])
    ap.add_argument("--severity", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=available_adapters(),
                    choices=available_adapters())
    ap.add_argument("--settings", nargs="+", default=["photos", "faces"], choices=["photos", "faces"])
    ap.add_argument("--steps", type=int, default=None, help="override the methods' steps")
    ap.add_argument("--top-lr-mult", type=float, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--mmd-weight", type=float, default=None)
    ap.add_argument("--final-bn", choices=["keep", "target"], default=None)
    ap.add_argument("--site-bn-weight", type=float, default=None,
                    help="site_bn_weight of adabn/shot-im/tent (final BN statistics)")
    ap.add_argument("--epochs", type=int, default=40, help="source training epochs (max)")
    ap.add_argument("--cache-only", action="store_true")
    ap.add_argument("--time-site", type=int, default=0, metavar="N",
                    help="only time one site of N photos end to end (no disk cache), then exit")
    ap.add_argument("--backbone", action="store_true",
                    help="with --time-site: mmd through the whole backbone (with_backbone)")
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=None)
    add_single_level_flag(ap)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # what the command line set: applied to every method's defaults where the method has the
    # option (and to the oracle's)
    overrides = {f: getattr(args, f) for f in ("steps", "top_lr_mult", "lr", "mmd_weight",
                                               "final_bn", "site_bn_weight")
                 if getattr(args, f) is not None}
    acfg = DiscrepancyConfig(**{k: v for k, v in overrides.items()
                                if hasattr(DiscrepancyConfig, k)})
    vcfg = ValidationConfig()
    log(f"oracle / mmd config {acfg.to_dict()}")

    e6 = read_image_folder(args.data_dir / "emotion6", classes=E6_CLASSES)
    ck = read_image_folder(args.data_dir / "ckplus48", classes=E6_CLASSES, aliases={"happy": "joy"})
    fmodel = EmotionNet(NetConfig(num_classes=len(E6_CLASSES)))  # frozen part only is used
    fmodel.eval()
    tcfg = TrainConfig()
    cache = args.cache_dir
    with torch.no_grad():
        e6_views = views_activations(fmodel, e6.records, cache, "e6-views", tcfg)
        cond_h = {c: condition_activations(fmodel, e6.records, cache, "e6", c, args.severity)
                  for c in args.conditions} if "photos" in args.settings else {}
        ck_views = views_activations(fmodel, ck.records, cache, "ck-views", tcfg) if "faces" in args.settings else None
    if args.cache_only:
        return
    if args.time_site:
        time_one_site(args, acfg, vcfg, e6, e6_views, e6.labels, args.time_site, args.backbone)
        return
    y6 = e6.labels
    rows: list[dict] = []
    for seed in args.seeds:
        if "photos" in args.settings:
            (tr, es, va, ad, te), model = photos_model(e6, e6_views, seed, cache, args.epochs,
                                                       ncfg=source_net(args.single_level))
            log(f"photos seed {seed}: train {len(tr)} early-stop {len(es)} gate-val {len(va)} "
                f"site adapt {len(ad)} test {len(te)}; "
                f"gate-val acc {accuracy(model, e6_views[va, 0].float(), y6[va]):.3f}")
            for c in args.conditions:
                run_site(f"photos→{c}{args.severity}", seed, model, e6_views[tr], y6[tr],
                         e6_views[va, 0], y6[va], cond_h[c][ad], cond_h[c][te], y6[te],
                         e6_views[te, 0], y6[ad], args.methods, acfg, vcfg, rows, overrides)
        if "faces" in args.settings:
            yc = ck.labels
            tr, es, va = face_split(ck.records, seed)
            ad, te = stratified_split(e6.records, 0.5, seed + 300)
            model = train_model(ck_views[tr], yc[tr], ck_views[es, 0], yc[es], seed, args.epochs,
                                cache, "model-faces", source_net(args.single_level))
            log(f"faces seed {seed}: CK+ train {len(tr)} early-stop {len(es)} gate-val {len(va)} "
                f"(gate-val acc {accuracy(model, ck_views[va, 0].float(), yc[va]):.3f}); "
                f"photos adapt {len(ad)} test {len(te)}")
            run_site("faces→photos", seed, model, ck_views[tr], yc[tr], ck_views[va, 0], yc[va],
                     e6_views[ad, 0], e6_views[te, 0], y6[te], None, y6[ad], args.methods,
                     acfg, vcfg, rows, overrides)
        if args.json_out:
            args.json_out.write_text(json.dumps(rows, indent=1, default=float))
    print_tables(rows)


if __name__ == "__main__":
    main()
