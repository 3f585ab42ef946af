"""Tasks of the readapt flow after adaptation: validate the candidate, then register it.

Validation is label-free (source accuracy, DEV, residual drift, prediction sanity, explanation
stability); the site's optional labelled audit folder adds the only direct evidence.
Registration logs the candidate with its reference profile, plots and gate record to MLflow as
a version of ``emowatch-<site>`` with alias ``challenger`` (never the champion).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from emowatch.jsonable import plain
from emowatch.sites import Site
from tasks.readapt import GALLERY_IMAGES, PROBE_IMAGES, AdaptInputs, decode_images
from tasks.records import Validation

if TYPE_CHECKING:
    import torch

    from tasks.context import RunContext


def site_probe_images(inputs: AdaptInputs, n: int = PROBE_IMAGES, seed: int = 0) -> torch.Tensor:
    """Normalised probe images: half source validation, half site (seeded choice)."""
    rng = np.random.default_rng(seed)
    half = max(1, n // 2)
    pick = lambda paths, k: [paths[i] for i in sorted(rng.choice(len(paths), min(k, len(paths)), replace=False))]  # noqa: E731
    return decode_images(inputs, pick(inputs.source_paths_val, half) + pick(inputs.site_paths, n - half))


def validation_config(site: Site) -> Any:
    """The site's gate tolerances as ``models.validate.candidate.ValidationConfig``."""
    from models.explain.metrics import GateTolerances
    from models.validate.candidate import ValidationConfig
    from models.validate.dev import DEVConfig

    g = site.gates
    return ValidationConfig(
        max_source_drop=g.max_source_acc_drop, min_entropy_ratio=g.min_prediction_entropy_ratio,
        dev=DEVConfig(min_ess=g.min_effective_sample_size), evidence=tuple(g.evidence_only),
        explanation=GateTolerances(min_rank_correlation=g.min_explanation_rank_corr,
                                   min_topk_overlap=g.min_explanation_topk_overlap,
                                   min_cosine=g.min_explanation_cosine,
                                   max_faithfulness_drop=g.max_faithfulness_drop))


@task(name="validate-candidate", cache_policy=NO_CACHE)
def validate(inputs: AdaptInputs, result: Any, site: Site, vouched: str = "") -> Validation:
    """The gates of ``models.validate.candidate`` (source accuracy, DEV, residual drift, prediction
    sanity, explanation stability on probe images), and the audit set when the site has one.

    The candidate is judged on the site as it runs (its own activations when its frozen part
    changed). On training-domain images it is judged as its method says
    (``AdaptResult.source_normalisation``): as it runs, or -- for a candidate that only
    re-normalised or tuned itself for the site (adabn, tent, shot-im) -- its weights with the
    champion's BN statistics, the training domain's: scoring it on training-domain images
    normalised with the site's statistics would ask a question no site image ever poses.
    ``vouched``: what judged the candidate on images that reproduce the site (the portfolio's
    twin, ``PortfolioResult.vouched``); DEV's "unverifiable" is then evidence only."""
    from models.validate.candidate import validate_candidate

    log = get_run_logger()
    own = candidate_activations(inputs, result)
    site_cand = src_cand = None
    src_model = source_model(inputs, result)
    if own is not None:  # the candidate's frozen part changed: judge it on its own activations
        src_h, site_cand = candidate_inputs(inputs, own)
        if src_model is result.model:
            src_cand = (src_h, inputs.src_val[1])
    probe = site_probe_images(inputs)
    t0 = time.perf_counter()
    rep = validate_candidate(result.model, inputs.ckpt.model, inputs.src_val, inputs.site_h,
                             validation_config(site), site_candidate=site_cand,
                             source_candidate=src_cand, probe=probe,
                             candidate_source_model=None if src_model is result.model else src_model,
                             vouched=vouched)
    log.info("gates (with the explanation gate on %d probe images): %.1f s", len(probe),
             time.perf_counter() - t0)
    audit = audit_accuracy(inputs, result, site) if site.audit is not None else None
    return Validation(
        verdict=rep.verdict, reasons=list(rep.reasons),
        gates={k: plain(v) for k, v in rep.gates.items()},
        dev=plain(rep.dev.to_dict()), champion_dev=plain(rep.champion_dev.to_dict()),
        source_acc=rep.source_acc, champion_source_acc=rep.champion_source_acc,
        mmd2_before=rep.mmd2_before, mmd2_after=rep.mmd2_after, audit=audit,
        source_normalisation=result.source_normalisation, probe=probe,
        probe_maps={k: a.maps for k, a in rep.attributions.items()}, candidate_activations=own)


def source_model(inputs: AdaptInputs, result: Any) -> Any:
    """The network the source-accuracy gate scores on training-domain images: the candidate
    itself, or (``source_normalisation`` "champion") its weights with every BN layer's running
    statistics set to the champion's."""
    if getattr(result, "source_normalisation", "own") != "champion":
        return result.model
    from models.adapt.bn import with_bn_stats_of

    return with_bn_stats_of(result.model, inputs.ckpt.model)


def candidate_activations(inputs: AdaptInputs, result: Any) -> dict[str, torch.Tensor] | None:
    """The candidate's own frozen activations of the site and held-out source images when its
    frozen part changed (whole-backbone mmd/coral, adabn scope "all"); None otherwise, when
    the champion's cached activations are the candidate's too. A candidate judged with the
    champion's statistics on training-domain images (:func:`source_model`) sees those
    through the champion's frozen part."""
    if not result.frozen_changed:
        return None
    from models.adapt.base import cache_activations

    site_h = getattr(result, "site_h", None)
    if site_h is None:
        site_x = inputs.site_images if inputs.site_images is not None else decode_images(inputs, inputs.site_paths)
        site_h = cache_activations(result.model, site_x)
    if getattr(result, "source_normalisation", "own") == "champion":
        held = inputs.src_heldout
    else:
        held = cache_activations(result.model, decode_images(inputs, inputs.heldout_paths))
    return {"site": site_h, "heldout": held}


def candidate_inputs(inputs: AdaptInputs, own: dict[str, torch.Tensor] | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(source-validation, site) activations as the candidate sees them: its own
    (:func:`candidate_activations`; the held-out set starts with the validation images) or,
    when its frozen part is the champion's, the champion's cached ones."""
    if own is None:
        return inputs.src_val[0], inputs.site_h
    return own["heldout"][:len(inputs.source_paths_val)], own["site"]


def audit_accuracy(inputs: AdaptInputs, result: Any, site: Site) -> dict[str, Any] | None:
    """Accuracy of champion and candidate on the site's labelled audit folder."""
    from models.data import read_image_folder

    ckpt = inputs.ckpt
    try:
        ls = read_image_folder(site.audit, classes=None)
    except ValueError as e:
        get_run_logger().warning("audit folder of %s unusable: %s", site.name, e)
        return {"error": str(e), "champion": None, "challenger": None}
    keep = [i for i, r in enumerate(ls.records) if ls.classes[r.label] in ckpt.classes]
    if not keep:
        return {"error": "no audit images of the model's classes", "champion": None, "challenger": None}
    from models.evaluate import predict_arrays

    recs = [ls.records[i] for i in keep]
    labels = np.asarray([ckpt.classes.index(ls.classes[r.label]) for r in recs])
    right0 = predict_arrays(ckpt, recs).argmax(1) == labels
    right1 = predict_arrays(result.to_checkpoint(ckpt), recs).argmax(1) == labels
    # paired counts: what the blessing's McNemar test looks at
    return {"champion": float(right0.mean()), "challenger": float(right1.mean()), "n": len(recs),
            "champion_only": int((right0 & ~right1).sum()),
            "challenger_only": int((right1 & ~right0).sum())}


def candidate_profile(inputs: AdaptInputs, cand: Any) -> Any:
    """Reference profile of an adapted version: the site's images it was adapted to, as it
    sees them -- features and quality statistics computed the way every later check computes
    a site's (a full forward in the version's own precision: a profile from another
    arithmetic would itself look like drift).

    An adapted version serves the site's conditions, so its checks compare the site with
    those: the site it was adapted to reads no drift, and a return to the training domain's
    conditions (or any new change) is drift from the adapted conditions. The bank estimator
    is the champion's and does not carry over; the site twin's labelled images do, so checks
    of an adapted version estimate its accuracy on the site's twin (``models.estimate.twin``)."""
    from models.evaluate import extract_features
    from models.images import load_rgb
    from models.profile import ReferenceProfile
    from models.quality import image_stats

    prep = cand.preprocessing
    grids_, stats = [], []
    for path in inputs.site_paths:
        img = load_rgb(path)
        grids_.append(prep.to_array(img))
        stats.append(image_stats(img))
    z, p = extract_features(cand, np.stack(grids_))
    quality = {k: np.asarray([s[k] for s in stats], np.float64) for k in stats[0]}
    prof = inputs.profile
    out = ReferenceProfile.from_arrays(
        features=np.asarray(z, np.float32), probs=np.asarray(p, np.float32),
        classes=list(prof.classes), quality=quality,
        info={"n": int(len(z)), "precision": cand.precision, "base_model": inputs.base_key,
              "reference": "site", "site": cand.config.get("adaptation", {}).get("site")},
    )
    out.twin = getattr(prof, "twin", None)  # the training domain's labelled images: the twin
    return out


@task(name="register-challenger", retries=2, retry_delay_seconds=[2, 5], cache_policy=NO_CACHE)
def register_challenger(ctx: RunContext, inputs: AdaptInputs, result: Any,
                        validation: Validation, method: str,
                        candidates: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Log everything to MLflow; register a version of emowatch-<site> with alias challenger."""
    from tasks.registry.client import CHALLENGER

    site = ctx.site

    cand = result.to_checkpoint(inputs.ckpt)
    cand.config["adaptation"]["base_model"] = inputs.base_key
    cand.config["adaptation"]["site"] = site.name
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        prof_path = t / "reference_profile.npz"
        own = validation.candidate_activations
        candidate_profile(inputs, cand).to_npz(prof_path)
        artifacts: dict[str, Path] = {}
        try:
            from models.adapt.base import cached_outputs
            from models.explain.plots import gallery_figure
            from models.plots import adaptation_curves_figure, embedding_figure

            z0s, _ = cached_outputs(inputs.ckpt.model, inputs.src_val[0])
            z0t, _ = cached_outputs(inputs.ckpt.model, inputs.site_h)
            src_h, site_h = candidate_inputs(inputs, own)
            z1s, _ = cached_outputs(source_model(inputs, result), src_h)
            z1t, _ = cached_outputs(result.model, site_h)
            fig = embedding_figure(np.asarray(z0s), np.asarray(z0t), np.asarray(z1s), np.asarray(z1t),
                                   title=f"{site.name}: source vs site features, before / after {method}")
            fig.savefig(t / "embedding.png", dpi=100, bbox_inches="tight")
            artifacts["plots/embedding.png"] = t / "embedding.png"
            if result.history:
                fig = adaptation_curves_figure(result.history)
                fig.savefig(t / "adaptation_curves.png", dpi=100, bbox_inches="tight")
                artifacts["plots/adaptation_curves.png"] = t / "adaptation_curves.png"
            full = validation.probe  # first half training domain, second half site
            half = len(full) // 2
            pick = list(range(min(GALLERY_IMAGES // 2, half))) + list(range(half, min(half + GALLERY_IMAGES // 2, len(full))))
            maps = validation.probe_maps  # the explanation gate's own maps
            champ_maps, chall_maps = maps["champion"][pick], maps["challenger"][pick]
            titles = [f"{'training domain' if i < half else site.name} probe {n + 1}"
                      for n, i in enumerate(pick)]
            import torch

            with torch.no_grad():
                probe = full[pick]
                champ_p = torch.softmax(inputs.ckpt.model.eval()(probe).float(), 1).numpy()
                chall_p = torch.softmax(cand.model.eval()(probe).float(), 1).numpy()
            fig = gallery_figure(probe, champ_maps, chall_maps, titles=titles,
                                 champ_probs=champ_p, chall_probs=chall_p,
                                 classes=list(inputs.ckpt.classes))
            fig.savefig(t / "explanations.png", dpi=100, bbox_inches="tight")
            artifacts["plots/explanations.png"] = t / "explanations.png"
        except Exception as e:  # noqa: BLE001 - a plot is not worth losing the candidate
            get_run_logger().warning("could not draw adaptation plots: %s", e)
        gates = validation.gates
        metrics = {f"gate.{k}": v["value"] for k, v in gates.items() if v.get("value") is not None}
        metrics.update({"source_acc": validation.source_acc,
                        "champion_source_acc": validation.champion_source_acc,
                        "mmd2_before": validation.mmd2_before, "mmd2_after": validation.mmd2_after,
                        "dev_risk": validation.dev.get("risk"), "dev_ess": validation.dev.get("ess"),
                        "adapt_seconds": result.seconds})
        metrics = {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}
        tags = {
            "emowatch.kind": "challenger",
            "emowatch.site": site.name,
            "emowatch.verdict": validation.verdict,
            "emowatch.gates": json.dumps(gates),
            "emowatch.method": method,
            "emowatch.base_model": inputs.base_key,
        }
        if candidates:
            tags["emowatch.candidates"] = json.dumps(candidates)[:4900]
            chosen = next((c for c in candidates if c.get("selected")), None)
            if chosen and chosen.get("estimate"):
                metrics["estimated_gain"] = float(chosen["estimate"]["gain"])
                metrics["estimated_gain_lower"] = float(chosen["estimate"]["lower"])
        audit = validation.audit
        if audit and audit.get("champion") is not None:
            tags["emowatch.audit"] = json.dumps(
                {k: audit[k] for k in ("champion", "challenger", "n", "champion_only",
                                       "challenger_only") if k in audit})
        reg = ctx.registry.log_and_register(
            cand, model_name=site.model_name, reference_profile_path=prof_path, metrics=metrics,
            params={"adapt": result.config, "method": method, "n_site_images": len(inputs.site_h)},
            artifacts=artifacts, tags=tags, alias=CHALLENGER,
            run_name=f"readapt-{site.name}", experiment="emowatch-adapt",
        )
        local_plots = {}
        keep_dir = Path(ctx.settings.reports_dir) / site.name / f"adapt-v{reg.version}"
        keep_dir.mkdir(parents=True, exist_ok=True)
        for name, p in artifacts.items():
            dst = keep_dir / Path(name).name
            dst.write_bytes(Path(p).read_bytes())
            local_plots[Path(name).stem] = str(dst.resolve())
    return {"name": reg.name, "version": reg.version, "run_id": reg.run_id, "plots": local_plots}
