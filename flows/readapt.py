"""``readapt_site``: unsupervised re-adaptation of a drifted site, validated and registered as
a challenger (never the champion); then approval e-mail or auto-promotion per site policy."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger

from emowatch.settings import Settings
from flows.runner import default_runner, open_runtime, optional_int
from tasks import candidate as c
from tasks import portfolio as p
from tasks import readapt as t
from tasks.records import ReadaptOutcome


@flow(name="readapt_site", task_runner=default_runner(), log_prints=True)
def readapt_site(site: str, method: str | None = None, drift_check_id: int | None = None,
                 seed: int = 0, train_backbone: bool | None = None,
                 settings: Settings | None = None) -> dict[str, Any]:
    """Returns the run's ``tasks.records.ReadaptOutcome`` as JSON: ``{site, method, version,
    gates: {name: {passed, value, threshold}}, verdict, reasons, candidates, ...}``. ``method`` None: the site's ``adapt.method`` (by default the
    portfolio: ``candidates`` lists every one tried, ``verdict`` "no_gain" with ``version``
    None when none is estimated to beat the champion); a method forces it alone.
    ``train_backbone`` overrides the site's ``adapt.train_backbone`` (None: the site's)."""
    from tasks.notify import deliver_alerts
    from tasks.promote.actions import promote_version_task, request_approval_task
    from tasks.promote.descriptions import refresh_descriptions
    from tasks.promote.gate_record import AUTO_ACTOR, auto_blessing

    log = get_run_logger()
    ctx = open_runtime(settings).site_context(site)
    cfg = ctx.site
    check_id = optional_int(drift_check_id)
    if check_id is not None:  # started by the drift event, not by a person
        skip = t.auto_adapt_blocker(ctx)
        if skip:
            log.info("site %s: not re-adapting on drift check %s: %s", site, check_id, skip)
            return ReadaptOutcome(site, method or cfg.adapt.method, skipped=skip).to_json()
    m = t.resolve_method(cfg, method)
    ctx = ctx.serving()
    owner = t.owner_id()
    t.acquire(ctx, owner)  # one adaptation per site at a time (database lock)
    run_id = t.start_run(ctx, m, check_id)
    t0 = time.perf_counter()
    portfolio = None
    try:
        backbone = cfg.adapt.train_backbone if train_backbone is None else bool(train_backbone)
        if m == "portfolio":
            backbone = backbone and t.portfolio_runs_backbone(cfg)
        inputs = t.load_inputs(ctx, source_free=not t.needs_source(m, cfg), train_backbone=backbone,
                               lazy_source=m == "portfolio")
        if m == "portfolio":
            portfolio = p.run_portfolio_task(inputs, cfg, seed)
            chosen = portfolio.chosen
            if chosen is None:  # nothing beats the champion with confidence: no version
                t.finish_run(ctx, run_id, status="done", verdict="no_gain",
                             reasons=portfolio.reasons, candidates=portfolio.table(),
                             n_site_images=len(inputs.site_h),
                             seconds=time.perf_counter() - t0)
                log.info("site %s: no_gain (%s)", site, portfolio.reasons[0])
                return ReadaptOutcome(
                    site, m, verdict="no_gain", model=cfg.model_name, base_model=ctx.model.key,
                    reasons=portfolio.reasons, candidates=portfolio.table(),
                    proxies=portfolio.proxies, seconds=round(time.perf_counter() - t0, 1),
                    adapt_seconds=round(portfolio.seconds, 1), n_site_images=len(inputs.site_h),
                    adaptation_run_id=run_id, setup_seconds=portfolio.setup_seconds).to_json()
            result, label = chosen.applied.result, chosen.member.name
        else:
            result, label = t.run_adaptation(inputs, m, cfg, seed), m
        validation = c.validate(inputs, result, cfg, portfolio.vouched if portfolio else "")
        reasons = (portfolio.reasons if portfolio else []) + validation.reasons
        validation.reasons = reasons
        cands = portfolio.table() if portfolio else None
        reg = c.register_challenger(ctx, inputs, result, validation, label, candidates=cands)
        t.finish_run(ctx, run_id, status="done", candidate_version=reg["version"],
                     verdict=validation.verdict, gates=validation.gates,
                     audit=validation.audit, reasons=reasons, candidates=cands,
                     n_site_images=len(inputs.site_h), seconds=time.perf_counter() - t0,
                     mlflow_run_id=reg["run_id"])
    except BaseException as e:
        t.finish_run(ctx, run_id, status="failed", error=f"{type(e).__name__}: {e}",
                     seconds=time.perf_counter() - t0,
                     candidates=portfolio.table() if portfolio else None)
        raise
    finally:
        t.release(ctx, owner)

    verdict = validation.verdict
    promotion = alert_id = None
    # the promotion's own rule, on the record just written: an auto site promotes only what the
    # blessing allows (the audit set included), and asks a person for the rest
    if auto_blessing(ctx, validation).allowed:
        promotion = promote_version_task(ctx, reg["version"], action="auto", actor=AUTO_ACTOR,
                                         reason="every gate passed")
    else:
        # the explanation gallery first: the e-mail keeps what fits in its size budget
        attachments = sorted(reg["plots"].values(), key=lambda p: "explanations" not in p)
        alert_id = request_approval_task(ctx, reg["version"], verdict, validation.gates,
                                         attachments, audit=validation.audit,
                                         reasons=validation.reasons,
                                         candidates=cands)
    deliver_alerts(ctx)  # a mail server that is down never fails the flow
    extra = {"approval e-mail": f"outbox alert #{alert_id} (emowatch outbox)"} if alert_id else {}
    refresh_descriptions(ctx, [reg["version"]], links={reg["version"]: extra})
    log.info("site %s: challenger %s/%s verdict %s", site, cfg.model_name, reg["version"], verdict)
    return ReadaptOutcome.registered(
        site, m, label, validation, version=reg["version"], model=cfg.model_name,
        base_model=ctx.model.key, seconds=round(time.perf_counter() - t0, 1),
        adapt_seconds=round(portfolio.seconds if portfolio else result.seconds, 1),
        candidates=cands, proxies=portfolio.proxies if portfolio else None,
        n_site_images=len(inputs.site_h), plots=reg["plots"], promotion=promotion,
        approval_alert_id=alert_id, adaptation_run_id=run_id,
        setup_seconds=portfolio.setup_seconds if portfolio else None).to_json()
