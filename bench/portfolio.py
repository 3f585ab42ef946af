"""Benchmark of the re-adaptation portfolio (models.adapt.portfolio): does the label-free selection
pick a candidate that helps, and never one that hurts?

Sites (n = 240 unlabelled site photos each, adaptation only):
* photos -> photos under each ``models.sim.conditions`` condition (night, blur, colour_cast,
  greyscale; severities 1 and 2), and harmless changes (JPEG re-encodes, a 2x down/up resize);
* faces -> photos (the paper's setting: a CK+48 model on Emotion6 photos).

Per site the portfolio runs as the flow runs it (proxies from the held-out labelled
training-domain images through the camera fitted to the site, its twin, or with ``--judge
bank`` under the nearest shifts of the estimator's bank; every member applied to the site and
to each proxy) and every candidate is then
scored on labelled site photos NOT used for adaptation (the site's test half under the same
condition). Printed: champion, each candidate, the selected one and the oracle choice (the
best of the same candidates by site labels); gap recovered ((selected - champion) / (clean -
champion), clean = the champion on the same test photos without the condition); selection
regret (oracle - selected); harm (selected more than 1 point below the champion); time.

    .venv/bin/python -m bench.portfolio --seeds 0 1 2
    .venv/bin/python -m bench.portfolio --seeds 0 --conditions night --severities 2 --no-faces

Frozen activations run in fp32 (``--precision``; auto: bf16 on CPUs with native bf16); the
source models are bench/common's (cached).
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import (
    E6_CLASSES,
    REPO,
    condition_array,
    emotion6_views,
    face_split,
    log,
    photos_model,
    source_net,
    train_model,
    views_activations,
)
from emowatch.sites import AdaptOptions
from models.adapt.base import CachedSet
from models.adapt.bn import frozen_outputs
from models.adapt.portfolio import (
    Z_ONE_SIDED_95,
    SiteSet,
    correct,
    members,
    run_portfolio,
)
from models.adapt.proxies import ProxyConfig, build_proxies, choose_proxies, proxy_distances  # noqa: F401
from models.data import read_image_folder, stratified_split
from models.images import load_rgb
from models.network import EmotionNet, NetConfig
from models.train import TrainConfig

HARMLESS = ("jpeg_q90", "jpeg_q75", "resize_2x")


def site_array(path: Path, prep, condition: str, index: int) -> np.ndarray:
    """One photo under a condition ("night2", "blur1", "jpeg_q75", "resize_2x", "clean")."""
    if condition in HARMLESS:
        img = load_rgb(path)
        if condition.startswith("jpeg_q"):
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=int(condition[6:]))
            buf.seek(0)
            img = Image.open(buf).convert("RGB")
        else:
            w, h = img.size
            img = img.resize((max(1, w // 2), max(1, h // 2)), Image.BICUBIC).resize((w, h), Image.BICUBIC)
        return prep.to_array(img)
    if condition == "clean":
        return condition_array(path, prep, "clean", 0, index)
    return condition_array(path, prep, condition[:-1], int(condition[-1]), index)


def frozen(model: EmotionNet, prep, grids: np.ndarray, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = prep.normalize(grids)
    return frozen_outputs(model, x, None, precision), x


class Proxies:
    """The held-out labelled training-domain images of one source model (decoded once)."""

    def __init__(self, model: EmotionNet, prep, records, idx, precision: str, cfg: ProxyConfig) -> None:
        self.model, self.prep, self.precision, self.cfg = model, prep, precision, cfg
        self.grids = np.stack([prep.to_array(load_rgb(records[i].path)) for i in idx])
        self.labels = np.asarray([records[i].label for i in idx])

    def for_site(self, site_grids: np.ndarray, site_h: torch.Tensor,
                 native: tuple[int, int] | None = None
                 ) -> tuple[list[SiteSet], list[dict], object | None]:
        """(proxies, what they are, the twin's fit or None), as tasks.portfolio builds them
        (``native``: the site photos' size, models.sim.camera.native_size)."""
        if self.cfg.source == "twin":
            from models.adapt.proxies import twin_proxies

            return twin_proxies(self.model, self.prep, self.grids, self.labels, site_grids,
                                self.precision, self.cfg, native=native)
        return (*build_proxies(self.model, self.prep, self.grids, self.labels, site_grids,
                               site_h, self.precision, self.cfg), None)


def verdict_of(chosen, champion: EmotionNet, source_val: tuple[torch.Tensor, torch.Tensor],
               site_h: torch.Tensor, vouched: str = "") -> tuple[str, list[str], dict]:
    """The flow's verdict on the selected candidate (models.validate.candidate with the site's default
    gates, as tasks.candidate.validate runs them; no explanation gate: no probe images;
    ``vouched``: as the flow passes it for a candidate judged on the site's twin)."""
    from models.adapt.bn import with_bn_stats_of
    from models.validate.candidate import validate_candidate

    res = chosen.applied.result
    src_model = (with_bn_stats_of(res.model, champion)  # as tasks.candidate.source_model
                 if res.source_normalisation == "champion" else None)
    rep = validate_candidate(res.model, champion, source_val, site_h,
                             site_candidate=chosen.applied.h if res.frozen_changed else None,
                             candidate_source_model=src_model, vouched=vouched)
    return rep.verdict, list(rep.reasons), dict(rep.gates)


def run_site(setting: str, seed: int, model: EmotionNet, prep, proxies: Proxies,
             site_grids: np.ndarray, test_grids: np.ndarray, y_test: np.ndarray,
             clean_acc: float | None, source: CachedSet | None, args, rows: list[dict],
             source_val: tuple[torch.Tensor, torch.Tensor] | None = None,
             site_paths: list | None = None) -> None:
    from models.estimate.twin_estimator import MAX_RESIDUAL
    from tasks.portfolio import unjudged, vouched_by

    t0 = time.perf_counter()
    h_site, x_site = frozen(model, prep, site_grids, args.precision)
    from models.sim.camera import native_size
    from tasks.portfolio import photo_sizes

    native = native_size(photo_sizes([str(p) for p in site_paths or []]), prep.img_size)
    pxs, pinfo, twin = proxies.for_site(site_grids, h_site, native)
    t_prep = time.perf_counter() - t0
    if twin is not None and twin.distance > MAX_RESIDUAL:  # as tasks.portfolio: not judged
        res = unjudged(twin, pinfo, t_prep, MAX_RESIDUAL)
    else:  # the members get the whole budget; the proxies are timed apart (tasks.portfolio)
        res = run_portfolio(model, SiteSet(h=h_site, images=x_site), pxs, source,
                            members(args.members), args.budget, args.precision, seed, z=args.z,
                            min_gain=args.min_gain / 100, tolerance=args.tolerance / 100,
                            shared=twin is not None)
    h_test, x_test = frozen(model, prep, test_grids, args.precision)
    champ_acc = float(correct(model, h_test, y_test).mean())
    cands = []
    for c in res.candidates:
        if c.member.kind == "champion":
            acc = champ_acc
        elif c.applied is None:
            continue
        else:
            m = c.applied.result.model
            h = frozen_outputs(m, x_test, None, args.precision) if c.applied.result.frozen_changed else h_test
            acc = float(correct(m, h, y_test).mean())
        cands.append({**c.to_dict(), "test_acc": acc})
    verdict, why, gates = "no_gain", list(res.reasons), {}
    if res.chosen is not None and source_val is not None:
        verdict, why, gates = verdict_of(res.chosen, model, source_val, h_site,
                                         vouched_by(twin, MAX_RESIDUAL) if twin is not None else "")
    sel = next((c for c in cands if c["selected"]), None)
    sel_acc = sel["test_acc"] if sel else champ_acc
    oracle = max(cands, key=lambda c: c["test_acc"])
    row = {"setting": setting, "seed": seed, "champion": champ_acc, "clean": clean_acc,
           "selected": sel["name"] if sel else "no_gain", "selected_acc": sel_acc,
           "oracle": oracle["name"], "oracle_acc": oracle["test_acc"],
           "regret": oracle["test_acc"] - sel_acc, "harm": sel_acc < champ_acc - 0.01,
           "gap": ((sel_acc - champ_acc) / (clean_acc - champ_acc)
                   if clean_acc is not None and clean_acc - champ_acc > 0.005 else None),
           "portfolio_s": res.seconds, "prep_s": t_prep, "proxies": pinfo, "candidates": cands,
           "reasons": res.reasons + [r for r in why if r not in res.reasons], "verdict": verdict,
           "gates": gates, "twin": None if twin is None else twin.to_dict()}
    rows.append(row)
    gap = "–" if row["gap"] is None else f"{row['gap']:+.2f}"
    row["proxy_champion_acc"] = (res.candidates[0].estimate or {}).get("champion_acc", float("nan"))
    log(f"{setting} seed {seed}: champion {champ_acc:.3f} -> {row['selected']} {sel_acc:.3f} "
        f"(oracle {oracle['name']} {oracle['test_acc']:.3f}; gap {gap}; verdict {verdict}) "
        f"in {res.seconds:.0f} s; "
        f"proxies {[p['shift'][:40] for p in pinfo]} (champion on proxies {row['proxy_champion_acc']:.3f}, prep {t_prep:.0f} s)")
    for c in cands:
        e = c["estimate"] or {}
        log(f"    {c['name']:16s} est {100 * e.get('gain', 0):+5.1f} (lb {100 * e.get('lower', 0):+5.1f}) "
            f"true {100 * (c['test_acc'] - champ_acc):+5.1f}  {c['seconds']:.1f} s")


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def print_tables(rows: list[dict]) -> None:
    print("\n| site | seed | champion % | clean % | selected | selected % | oracle | oracle % | "
          "gap recovered | regret pts | harm | verdict | proxies s | portfolio s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        gap = "–" if r["gap"] is None else f"{r['gap']:+.2f}"
        print(f"| {r['setting']} | {r['seed']} | {pct(r['champion'])} | "
              f"{'–' if r['clean'] is None else pct(r['clean'])} | {r['selected']} | "
              f"{pct(r['selected_acc'])} | {r['oracle']} | {pct(r['oracle_acc'])} | "
              f"{gap} | {100 * r['regret']:.1f} | "
              f"{'yes' if r['harm'] else 'no'} | {r.get('verdict', '?')} | {r['prep_s']:.0f} | "
              f"{r['portfolio_s']:.0f} |")
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["setting"], []).append(r)
    print("\n| site | seeds | champion % | selected % | oracle % | gap recovered, mean ± sd | "
          "no_gain | worst change pts | max regret pts | portfolio s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s, rs in by.items():
        gaps = [r["gap"] for r in rs if r["gap"] is not None]
        gtxt = f"{np.mean(gaps):+.2f} ± {np.std(gaps):.2f}" if gaps else "–"
        print(f"| {s} | {len(rs)} | {pct(np.mean([r['champion'] for r in rs]))} | "
              f"{pct(np.mean([r['selected_acc'] for r in rs]))} | "
              f"{pct(np.mean([r['oracle_acc'] for r in rs]))} | {gtxt} | "
              f"{sum(r['selected'] == 'no_gain' for r in rs)}/{len(rs)} | "
              f"{100 * min(r['selected_acc'] - r['champion'] for r in rs):+.1f} | "
              f"{100 * max(r['regret'] for r in rs):.1f} | "
              f"{np.mean([r['portfolio_s'] for r in rs]):.0f} |")
    names = sorted({c["name"] for r in rows for c in r["candidates"]},
                   key=lambda n: [c["name"] for r in rows for c in r["candidates"]].index(n))
    print("\n| candidate | sites | true gain pts, mean | est. gain pts, mean | lower > 0 | "
          "selected | s per site (site + proxies) |")
    print("|---|---|---|---|---|---|---|")
    for n in names:
        cs = [(r, c) for r in rows for c in r["candidates"] if c["name"] == n]
        tg = [100 * (c["test_acc"] - r["champion"]) for r, c in cs]
        eg = [100 * (c["estimate"] or {}).get("gain", 0) for _, c in cs]
        lb = sum((c["estimate"] or {}).get("lower", 0) > 0 for _, c in cs)
        print(f"| {n} | {len(cs)} | {np.mean(tg):+.1f} | {np.mean(eg):+.1f} | {lb} | "
              f"{sum(c['selected'] for _, c in cs)} | {np.mean([c['seconds'] for _, c in cs]):.1f} |")


def print_gate_table(rows: list[dict]) -> None:
    """Do the gates predict harm? Per gate, over the selected candidates: how many it failed,
    and how many of those (and of the passed) were truly more than 1 point below the champion."""
    sel = [r for r in rows if r.get("gates")]
    if not sel:
        return
    print("\n| gate | selected candidates | failed | failed and harmful | passed and harmful |")
    print("|---|---|---|---|---|")
    for g in sorted({g for r in sel for g in r["gates"]}):
        rs = [r for r in sel if g in r["gates"]]
        bad = [r for r in rs if not r["gates"][g]["passed"]]
        print(f"| {g} | {len(rs)} | {len(bad)} | {sum(r['harm'] for r in bad)} | "
              f"{sum(r['harm'] for r in rs if r not in bad)} |")


def main(argv: list[str] | None = None) -> None:
    from emowatch.hardware import resolve_precision

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--cache-dir", type=Path, default=REPO / ".emowatch" / "cache" / "bench")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--conditions", nargs="+", default=["night", "blur", "colour_cast", "greyscale"])
    ap.add_argument("--severities", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--harmless", nargs="*", default=list(HARMLESS))
    ap.add_argument("--no-faces", action="store_true")
    ap.add_argument("--n-site", type=int, default=240)
    defaults = AdaptOptions()
    ap.add_argument("--members", nargs="*", default=list(defaults.portfolio),
                    help="portfolio members (default: a site's default, adapt.portfolio)")
    ap.add_argument("--budget", type=float, default=defaults.portfolio_budget_s,
                    help="portfolio time budget per site (default: a site's, "
                    "adapt.portfolio_budget_s; members not started within it are skipped)")
    ap.add_argument("--k", type=int, default=ProxyConfig.k, help="proxies per site")
    ap.add_argument("--z", type=float, default=Z_ONE_SIDED_95, help="one-sided z of the lower bound")
    ap.add_argument("--precision", default="fp32",
                    help="inference precision (default fp32, what most CPUs have; auto: bf16 "
                    "where native)")
    ap.add_argument("--judge", default=defaults.judge, choices=("twin", "bank"),
                    help="what candidates are judged on (default: a site's, adapt.judge)")
    ap.add_argument("--min-gain", type=float, default=defaults.min_gain)
    ap.add_argument("--tolerance", type=float, default=defaults.tolerance)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args(argv)
    args.precision = resolve_precision(args.precision)
    torch.set_num_threads(torch.get_num_threads())
    log(f"precision {args.precision}, judge {args.judge}, members {args.members}")
    cache = args.cache_dir
    e6, prep, views = emotion6_views(args.data_dir, cache)
    y6 = e6.labels
    sites = [f"{c}{s}" for c in args.conditions for s in args.severities] + list(args.harmless)
    rows: list[dict] = []
    for seed in args.seeds:
        (tr, es, va, ad, te), model = photos_model(e6, views, seed, cache, args.epochs,
                                                   ncfg=source_net())
        ad = ad[:args.n_site]
        source = CachedSet(h=views[tr][:, 0].float(), labels=torch.as_tensor(y6[tr]))
        source_val = (views[va][:, 0].float(), torch.as_tensor(y6[va]))  # the gates' split
        pcfg = ProxyConfig(k=args.k, source=args.judge, seed=seed)
        px = Proxies(model, prep, e6.records, sorted(va + es), args.precision, pcfg)
        log(f"seed {seed}: {len(px.labels)} held-out photos for proxies")
        clean_test = np.stack([site_array(e6.records[i].path, prep, "clean", i) for i in te])
        clean_acc = float(correct(model, frozen(model, prep, clean_test, args.precision)[0],
                                  y6[te]).mean())
        for cond in sites:
            sg = np.stack([site_array(e6.records[i].path, prep, cond, i) for i in ad])
            tg = np.stack([site_array(e6.records[i].path, prep, cond, i) for i in te])
            run_site(f"photos→{cond}", seed, model, prep, px, sg, tg, y6[te], clean_acc,
                     source, args, rows, source_val, [e6.records[i].path for i in ad])
            if args.json_out:
                args.json_out.write_text(json.dumps(rows, indent=1, default=float))
        if not args.no_faces:
            ck = read_image_folder(args.data_dir / "ckplus48", classes=E6_CLASSES,
                                   aliases={"happy": "joy"})
            fmodel = EmotionNet(NetConfig(num_classes=len(E6_CLASSES))).eval()
            with torch.no_grad():
                ck_views = views_activations(fmodel, ck.records, cache, "ck-views", TrainConfig())
            yc = ck.labels
            ftr, fes, fva = face_split(ck.records, seed)
            fm = train_model(ck_views[ftr], yc[ftr], ck_views[fes, 0], yc[fes], seed, args.epochs,
                             cache, "model-faces", source_net())
            pad, pte = stratified_split(e6.records, 0.5, seed + 300)
            pad = pad[:args.n_site]
            fpx = Proxies(fm, prep, ck.records, sorted(fva + fes), args.precision, pcfg)
            sg = np.stack([site_array(e6.records[i].path, prep, "clean", i) for i in pad])
            tg = np.stack([site_array(e6.records[i].path, prep, "clean", i) for i in pte])
            run_site("faces→photos", seed, fm, prep, fpx, sg, tg, y6[pte], None,
                     CachedSet(h=ck_views[ftr][:, 0].float(), labels=torch.as_tensor(yc[ftr])),
                     args, rows, (ck_views[fva][:, 0].float(), torch.as_tensor(yc[fva])),
                     [e6.records[i].path for i in pad])
            if args.json_out:
                args.json_out.write_text(json.dumps(rows, indent=1, default=float))
    print_tables(rows)
    print_gate_table(rows)


if __name__ == "__main__":
    main()
