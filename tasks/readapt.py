"""Tasks of the readapt flow: data, adaptation, label-free validation, registration.

The site's labels are never used to adapt or to decide: only the optional audit folder (a
handful of labelled site images a team may keep) adds labelled evidence to the gates.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from emowatch.settings import Settings
from emowatch.sites import Site

# Probe images for the explanation gate: half from the training domain, half from the site.
# 8 images x 2 models x ~60 calls (depth 4) keeps the gate to ~1 min at 224 px on 2 cores.
PROBE_IMAGES = 8
# Site images held out of adaptation for nothing: adaptation is unsupervised, so every recent
# image may be used; validation uses the same images (no labels are involved).
LOCK_GRACE_S = 900
# Whole-backbone adaptation decodes at most this many training images (seeded sample).
MAX_BACKBONE_SOURCE = 1000
# Rows of the champion-vs-challenger gallery attached to the approval e-mail.
GALLERY_IMAGES = 4


@dataclass
class AdaptInputs:
    ckpt: Any  # champion Checkpoint
    profile: Any  # champion ReferenceProfile
    base_key: str
    src_train: tuple[torch.Tensor, torch.Tensor] | None  # (h, labels)
    src_val: tuple[torch.Tensor, torch.Tensor]  # (h, labels) - never adapted on
    src_heldout: torch.Tensor  # (h) val+test for the candidate's reference profile
    heldout_paths: list[str]
    site_h: torch.Tensor
    site_paths: list[str]
    source_paths_val: list[str]
    # Decoded, normalised (N, 3, S, S) images for adaptation through the whole backbone
    # (site option adapt.train_backbone); None on the cached path.
    src_train_images: torch.Tensor | None = None
    site_images: torch.Tensor | None = None


class AdaptationLocked(RuntimeError):
    """Another adaptation of this site is running."""


def lock_name(site: str) -> str:
    return f"adapt:{site}"


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"


def acquire(settings: Settings, site: Site, owner: str) -> None:
    from db import queries
    from tasks.context import prepare

    _, engine = prepare(settings)
    ttl = site.adapt.time_budget_s + LOCK_GRACE_S
    if not queries.acquire_lock(engine, lock_name(site.name), owner, ttl):
        from db.session import session_scope

        with session_scope(engine) as s:
            holder = queries.lock_holder(s, lock_name(site.name))
        raise AdaptationLocked(f"an adaptation of site {site.name!r} is already running ({holder})")


def release(settings: Settings, site: Site, owner: str) -> None:
    from db import queries
    from tasks.context import prepare

    _, engine = prepare(settings)
    queries.release_lock(engine, lock_name(site.name), owner)


def start_run(settings: Settings, site_id: int, method: str, base_key: str,
              drift_check_id: int | None) -> int:
    from db.models import AdaptationRun
    from db.session import session_scope
    from tasks.context import prepare

    _, engine = prepare(settings)
    with session_scope(engine) as s:
        row = AdaptationRun(site_id=site_id, method=method, base_model=base_key,
                            drift_check_id=drift_check_id, status="running")
        s.add(row)
        s.flush()
        return row.id


def finish_run(settings: Settings, run_id: int, **fields: Any) -> None:
    from db.models import AdaptationRun, utcnow
    from db.session import session_scope
    from tasks.context import prepare

    _, engine = prepare(settings)
    with session_scope(engine) as s:
        row = s.get(AdaptationRun, run_id)
        for k, v in fields.items():
            setattr(row, k, v)
        row.finished_at = utcnow()


def auto_adapt_blocker(site: Site) -> str | None:
    """Why a drift event should NOT start an adaptation of ``site`` (None: go ahead).

    A challenger waiting for approval is not replaced by the next hourly drift: drift keeps
    being detected until a person decides, and re-adapting every hour would only churn
    versions (a person can still run ``emowatch adapt`` by hand)."""
    from tasks import registry

    if not site.adapt.auto:
        return "adapt.auto is false for this site"
    pending = registry.get_alias_version(site.model_name, registry.CHALLENGER)
    if pending is not None:
        return f"challenger version {pending} is still waiting for approval"
    return None


def resolve_method(site: Site, method: str | None) -> str:
    m = method or site.adapt.method
    if site.adapt.source_free and m in ("mmd", "coral"):
        raise ValueError(f"site {site.name} is source_free: method {m!r} needs the training data; "
                         "use shot-im, tent or adabn")
    return m


@task(name="load-adaptation-data", cache_policy=NO_CACHE)
def load_inputs(settings: Settings, site: Site, site_id: int, model_name: str, version: str,
                source_free: bool, train_backbone: bool = False) -> AdaptInputs:
    """Champion, its training-domain split (cached activations) and the site's recent images;
    with ``train_backbone`` also the decoded training and site images."""
    from db import queries
    from db.session import session_scope
    from tasks.activations import cached_activations, record_items
    from tasks.context import load_model, prepare
    from tasks.training import SourceSpec, load_source

    log = get_run_logger()
    _, engine = prepare(settings)
    ckpt, profile = load_model(model_name, version)
    spec_d = ckpt.config.get("source")
    if not spec_d:
        raise ValueError(f"{model_name}/{version} carries no source-data spec; cannot re-adapt it")
    spec = SourceSpec.from_dict(spec_d)
    if not Path(spec.data).is_dir():
        raise FileNotFoundError(
            f"training data of {model_name}/{version} is not at {spec.data} any more "
            "(mount it there, or use a source-free method: --method shot-im)")
    splits = load_source(spec)
    if list(splits.data.classes) != list(ckpt.classes):
        raise ValueError(f"training data classes {splits.data.classes} differ from the model's {ckpt.classes}")
    with session_scope(engine) as s:
        rows = queries.recent_images(s, site_id, site.adapt.max_images)
        site_items = [(r.sha256, r.store_path) for r in rows]
    if len(site_items) < site.drift.min_samples:
        raise ValueError(f"site {site.name} has {len(site_items)} images; at least "
                         f"{site.drift.min_samples} (drift.min_samples) are needed to adapt")

    def acts(records: list[Any], what: str) -> tuple[torch.Tensor, list[str]]:
        items = record_items(records)
        log.info("activations of %d %s images", len(items), what)
        return cached_activations(ckpt, items, settings.cache_dir), [p for _, p in items]

    recs = splits.data.records
    val_recs = [recs[i] for i in splits.val]
    h_val, val_paths = acts(val_recs, "source validation")
    y_val = torch.as_tensor([r.label for r in val_recs])
    src_train = None
    if not source_free:
        tr_recs = [recs[i] for i in splits.train]
        h_tr, _ = acts(tr_recs, "source training")
        src_train = (h_tr, torch.as_tensor([r.label for r in tr_recs]))
    test_recs = [recs[i] for i in splits.test]
    h_test, test_paths = acts(test_recs, "source test")
    log.info("activations of %d site images", len(site_items))
    site_h = cached_activations(ckpt, site_items, settings.cache_dir)
    inputs = AdaptInputs(
        ckpt=ckpt, profile=profile, base_key=f"{model_name}/{version}", src_train=src_train,
        src_val=(h_val, y_val), src_heldout=torch.cat([h_val, h_test]),
        heldout_paths=val_paths + test_paths, site_h=site_h,
        site_paths=[p for _, p in site_items], source_paths_val=val_paths,
    )
    if train_backbone and src_train is None:
        log.info("train_backbone applies to mmd and coral only (they use the training data); "
                 "this source-free adaptation runs on the cached path")
    elif train_backbone:
        # BACKBONE_STEPS x BACKBONE_BATCH = 2,400 source draws: a seeded sample of at most
        # MAX_BACKBONE_SOURCE training images serves them and bounds memory (~0.6 MB each).
        keep = np.arange(len(splits.train))
        if len(keep) > MAX_BACKBONE_SOURCE:
            keep = np.sort(np.random.default_rng(0).choice(len(keep), MAX_BACKBONE_SOURCE, replace=False))
        tr_paths = [str(recs[splits.train[i]].path) for i in keep]
        log.info("decoding %d training and %d site images for whole-backbone adaptation",
                 len(tr_paths), len(site_items))
        keep_t = torch.as_tensor(keep)
        inputs.src_train = (src_train[0][keep_t], src_train[1][keep_t])
        inputs.src_train_images = _images(inputs, tr_paths)
        inputs.site_images = _images(inputs, inputs.site_paths)
    return inputs


@task(name="adapt", cache_policy=NO_CACHE)
def run_adaptation(inputs: AdaptInputs, method: str, site: Site, seed: int = 0) -> Any:
    from models.adapt import CachedSet, get_adapter, with_backbone

    adapter = get_adapter(method)
    cfg = adapter.default_config()
    cfg.seed = seed
    cfg.time_budget_s = site.adapt.time_budget_s
    if site.adapt.site_bn_weight is not None:
        cfg.site_bn_weight = site.adapt.site_bn_weight
    log = get_run_logger()
    source, target = inputs.src_train, inputs.site_h
    if inputs.site_images is not None and adapter.needs_source:
        cfg = with_backbone(cfg)
        cfg.mirror_source = bool(inputs.ckpt.config.get("train", {}).get("flip", True))
        source = CachedSet(h=inputs.src_train[0], labels=inputs.src_train[1],
                           images=inputs.src_train_images)
        target = CachedSet(h=inputs.site_h, images=inputs.site_images)
    log.info("adapting %s to %d site images with %s%s (budget %.0f s)", inputs.base_key,
             len(inputs.site_h), method,
             " through the whole backbone" if cfg.backbone_lr_mult > 0 else "", cfg.time_budget_s)
    res = adapter.adapt(inputs.ckpt, source, target, cfg, progress=True)
    log.info("%s: %d steps in %.1f s%s", method, res.steps_done, res.seconds,
             " (stopped at the time budget)" if res.stopped_early else "")
    return res


def site_probe_images(inputs: AdaptInputs, n: int = PROBE_IMAGES, seed: int = 0) -> torch.Tensor:
    """Normalised probe images: half source validation, half site (seeded choice)."""
    rng = np.random.default_rng(seed)
    half = max(1, n // 2)
    pick = lambda paths, k: [paths[i] for i in sorted(rng.choice(len(paths), min(k, len(paths)), replace=False))]  # noqa: E731
    return _images(inputs, pick(inputs.source_paths_val, half) + pick(inputs.site_paths, n - half))


@task(name="validate-candidate", cache_policy=NO_CACHE)
def validate(inputs: AdaptInputs, result: Any, site: Site) -> dict[str, Any]:
    """Label-free gates (source accuracy, DEV, residual drift, prediction sanity), the
    explanation-stability gate, and the audit set when the site has one."""
    from models.explain_metrics import GateTolerances, explanation_gate
    from models.validate import DEVConfig, ValidationConfig, validate_candidate

    log = get_run_logger()
    g = site.gates
    vcfg = ValidationConfig(max_source_drop=g.max_source_acc_drop,
                            min_entropy_ratio=g.min_prediction_entropy_ratio,
                            dev=DEVConfig(min_ess=g.min_effective_sample_size))
    own = candidate_activations(inputs, result)
    site_cand = src_cand = None
    if own is not None:  # the candidate's frozen part changed: judge it on its own activations
        src_h, site_cand = candidate_inputs(inputs, own)
        src_cand = (src_h, inputs.src_val[1])
    rep = validate_candidate(result.model, inputs.ckpt.model, inputs.src_val, inputs.site_h,
                             vcfg, site_candidate=site_cand, source_candidate=src_cand)
    gates = {k: _plain(v) for k, v in rep.gates.items()}
    probe = site_probe_images(inputs)
    t0 = time.perf_counter()
    tol = GateTolerances(min_rank_correlation=g.min_explanation_rank_corr,
                         min_topk_overlap=g.min_explanation_topk_overlap,
                         min_cosine=g.min_explanation_cosine,
                         max_faithfulness_drop=g.max_faithfulness_drop)
    maps: dict[str, Any] = {}
    expl = explanation_gate(inputs.ckpt.model, result.model, probe, tol, attributions=maps)
    log.info("explanation gate on %d probe images: %.1f s", len(probe), time.perf_counter() - t0)
    for k, v in expl.items():
        gates[f"explanation_{k}"] = _plain(v)
    audit = None
    if site.audit is not None:
        audit = audit_accuracy(inputs, result, site)
    verdict = rep.verdict
    if verdict != "fail" and not all(v["passed"] for v in gates.values()):
        verdict = "fail"
    dev = rep.dev.to_dict()
    return {"verdict": verdict, "gates": gates, "dev": _plain(dev),
            "champion_dev": _plain(rep.champion_dev.to_dict()), "source_acc": rep.source_acc,
            "champion_source_acc": rep.champion_source_acc, "mmd2_before": rep.mmd2_before,
            "mmd2_after": rep.mmd2_after, "audit": audit, "probe": probe,
            "probe_maps": {k: a.maps for k, a in maps.items()}, "candidate_activations": own}


def candidate_activations(inputs: AdaptInputs, result: Any) -> dict[str, torch.Tensor] | None:
    """The candidate's own frozen activations of the site and held-out source images when its
    frozen part changed (whole-backbone mmd/coral, adabn scope "all"); None otherwise, when
    the champion's cached activations are the candidate's too."""
    if not result.frozen_changed:
        return None
    from models.adapt import cache_activations

    site_x = inputs.site_images if inputs.site_images is not None else _images(inputs, inputs.site_paths)
    return {"site": cache_activations(result.model, site_x),
            "heldout": cache_activations(result.model, _images(inputs, inputs.heldout_paths))}


def candidate_inputs(inputs: AdaptInputs, own: dict[str, torch.Tensor] | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(source-validation, site) activations as the candidate sees them: its own
    (:func:`candidate_activations`; the held-out set starts with the validation images) or,
    when its frozen part is the champion's, the champion's cached ones."""
    if own is None:
        return inputs.src_val[0], inputs.site_h
    return own["heldout"][:len(inputs.source_paths_val)], own["site"]


def _images(inputs: AdaptInputs, paths: list[str]) -> torch.Tensor:
    """Decoded, resized and normalised (N, 3, S, S) images, as the champion sees them."""
    from models.data import load_rgb

    prep = inputs.ckpt.preprocessing
    return prep.normalize(np.stack([prep.to_array(load_rgb(p)) for p in paths]))


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


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def candidate_profile(inputs: AdaptInputs, model: Any, own: dict[str, torch.Tensor] | None = None) -> Any:
    """Reference profile of the candidate: its features of the same held-out training-domain
    images as the champion's profile (image-quality statistics are unchanged). ``own``: the
    candidate's own activations (:func:`candidate_activations`) when its frozen part changed."""
    from models.adapt import cached_outputs
    from models.profile import ReferenceProfile

    z, p = cached_outputs(model, inputs.src_heldout if own is None else own["heldout"])
    prof = inputs.profile
    return ReferenceProfile.from_arrays(
        features=np.asarray(z, np.float32), probs=np.asarray(p, np.float32),
        classes=list(prof.classes), quality=getattr(prof, "quality", None),
    )


@task(name="register-challenger", retries=2, retry_delay_seconds=[2, 5], cache_policy=NO_CACHE)
def register_challenger(settings: Settings, site: Site, inputs: AdaptInputs, result: Any,
                        validation: dict[str, Any], method: str) -> dict[str, Any]:
    """Log everything to MLflow; register a version of emowatch-<site> with alias challenger."""
    from tasks import registry

    cand = result.to_checkpoint(inputs.ckpt)
    cand.config["adaptation"]["base_model"] = inputs.base_key
    cand.config["adaptation"]["site"] = site.name
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        prof_path = t / "reference_profile.npz"
        own = validation.get("candidate_activations")
        candidate_profile(inputs, result.model, own).to_npz(prof_path)
        artifacts: dict[str, Path] = {}
        try:
            from models.adapt import cached_outputs
            from models.explain_metrics import gallery_figure
            from models.plots import adaptation_curves_figure, embedding_figure

            z0s, _ = cached_outputs(inputs.ckpt.model, inputs.src_val[0])
            z0t, _ = cached_outputs(inputs.ckpt.model, inputs.site_h)
            src_h, site_h = candidate_inputs(inputs, own)
            z1s, _ = cached_outputs(result.model, src_h)
            z1t, _ = cached_outputs(result.model, site_h)
            fig = embedding_figure(np.asarray(z0s), np.asarray(z0t), np.asarray(z1s), np.asarray(z1t),
                                   title=f"{site.name}: source vs site features, before / after {method}")
            fig.savefig(t / "embedding.png", dpi=100, bbox_inches="tight")
            artifacts["plots/embedding.png"] = t / "embedding.png"
            if result.history:
                fig = adaptation_curves_figure(result.history)
                fig.savefig(t / "adaptation_curves.png", dpi=100, bbox_inches="tight")
                artifacts["plots/adaptation_curves.png"] = t / "adaptation_curves.png"
            full = validation["probe"]  # first half training domain, second half site
            half = len(full) // 2
            pick = list(range(min(GALLERY_IMAGES // 2, half))) + list(range(half, min(half + GALLERY_IMAGES // 2, len(full))))
            maps = validation["probe_maps"]  # the explanation gate's own maps
            champ_maps, chall_maps = maps["champion"][pick], maps["challenger"][pick]
            titles = [f"{'training domain' if i < half else site.name} probe {n + 1}"
                      for n, i in enumerate(pick)]
            fig = gallery_figure(full[pick], champ_maps, chall_maps, titles=titles)
            fig.savefig(t / "explanations.png", dpi=100, bbox_inches="tight")
            artifacts["plots/explanations.png"] = t / "explanations.png"
        except Exception as e:  # noqa: BLE001 - a plot is not worth losing the candidate
            get_run_logger().warning("could not draw adaptation plots: %s", e)
        gates = validation["gates"]
        metrics = {f"gate.{k}": v["value"] for k, v in gates.items() if v.get("value") is not None}
        metrics.update({"source_acc": validation["source_acc"],
                        "champion_source_acc": validation["champion_source_acc"],
                        "mmd2_before": validation["mmd2_before"], "mmd2_after": validation["mmd2_after"],
                        "dev_risk": validation["dev"].get("risk"), "dev_ess": validation["dev"].get("ess"),
                        "adapt_seconds": result.seconds})
        metrics = {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}
        tags = {
            "emowatch.kind": "challenger",
            "emowatch.site": site.name,
            "emowatch.verdict": validation["verdict"],
            "emowatch.gates": json.dumps(gates),
            "emowatch.method": method,
            "emowatch.base_model": inputs.base_key,
        }
        if validation.get("audit") and validation["audit"].get("champion") is not None:
            tags["emowatch.audit"] = json.dumps(
                {k: validation["audit"][k] for k in ("champion", "challenger", "n", "champion_only",
                                                     "challenger_only") if k in validation["audit"]})
        reg = registry.log_and_register(
            cand, model_name=site.model_name, reference_profile_path=prof_path, metrics=metrics,
            params={"adapt": result.config, "method": method, "n_site_images": len(inputs.site_h)},
            artifacts=artifacts, tags=tags, alias=registry.CHALLENGER,
            run_name=f"readapt-{site.name}", experiment="emowatch-adapt",
        )
        local_plots = {}
        keep_dir = Path(settings.reports_dir) / site.name / f"adapt-v{reg.version}"
        keep_dir.mkdir(parents=True, exist_ok=True)
        for name, p in artifacts.items():
            dst = keep_dir / Path(name).name
            dst.write_bytes(Path(p).read_bytes())
            local_plots[Path(name).stem] = str(dst.resolve())
    return {"name": reg.name, "version": reg.version, "run_id": reg.run_id, "plots": local_plots}
