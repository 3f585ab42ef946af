"""``emowatch demo``: the whole loop on embedded defaults, with a summary table.

train the source model -> three sites (one like the training domain, two with other cameras)
-> ingest + monitor each -> re-adapt the drifted ones (no labels) -> gates incl. explanation
stability -> challengers in MLflow -> promotion per policy (auto site by itself; the demo acts
as the approver of a manual site whose challenger passed) -> audit accuracy -> summary.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from emowatch.settings import Settings
from flows.monitor import monitor_site
from flows.promote import promote
from flows.readapt import readapt_site
from flows.runner import default_runner
from flows.train import train_source

DEMO_EPOCHS = 15
DEMO_TRAINABLE_BLOCKS = 1
# The demo's accuracy estimator is fitted on a third of the default bank (60 shifts): the
# whole demo stays within minutes (python -m bench.estimate measures the default).
DEMO_ESTIMATOR_SPECS = 20


def _say(msg: str) -> None:
    # Progress for the person watching (stderr, so --json output stays clean).
    import sys

    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def demo_settings(settings: Settings, workdir: Path, sites_file: Path) -> Settings:
    """The demo's own settings: its sites file and its own state folder (a fresh registry,
    database and outbox every run); the user's own .emowatch state is untouched."""
    return settings.model_copy(update={
        "home": Path(workdir).resolve() / "state", "sites_file": sites_file,
        "database_url": None, "mlflow_tracking_uri": None})


@flow(name="demo", task_runner=default_runner(), log_prints=False)
def demo(workdir: str = ".emowatch/demo", fast: bool = False, seed: int = 0,
         settings: Settings | None = None) -> dict[str, Any]:
    from flows.runner import open_runtime
    from tasks.demo import prepare_demo
    from tasks.predict import evaluate_folder

    log = get_run_logger()
    t_start = time.perf_counter()
    settings = settings if settings is not None else Settings()
    data_dir = None if fast else settings.data_dir
    if not fast and settings.require_data and data_dir is None:  # --fast never uses real data
        raise ValueError("EMOWATCH_REQUIRE_DATA is set but EMOWATCH_DATA_DIR is not")
    _say(f"preparing data in {workdir} ({'real photos from ' + str(data_dir) if data_dir else 'generated faces'})")
    data = prepare_demo(Path(workdir), data_dir, seed=seed)
    settings = demo_settings(settings, Path(workdir), data.sites_file)
    rt = open_runtime(settings)

    _say(f"1/5 training the source model ({data.backbone}) on {data.source_dir}")
    # The demo trains a lighter model than `emowatch train`'s defaults so the whole loop fits
    # in minutes on 2 cores: one fine-tuned block, no random-crop views (bench/train.py has
    # the full-size figures).
    trained = train_source(data=str(data.source_dir), backbone=data.backbone, img_size=data.img_size,
                           epochs=(30 if data.kind == "generated" else DEMO_EPOCHS), seed=seed,
                           promote=True, trainable_blocks=DEMO_TRAINABLE_BLOCKS, crops=0,
                           estimator_specs=DEMO_ESTIMATOR_SPECS, settings=settings)
    _say(f"    emowatch-source v{trained['version']}: test accuracy {trained['test_accuracy']:.3f}")

    rows: list[dict[str, Any]] = []
    for s in data.sites:
        name = s["name"]
        before = evaluate_folder(rt, name, s["audit"])  # source champion on the audit set
        _say(f"2/5 monitoring {name} (camera: {s['condition']})")
        mon = monitor_site(site=name, settings=settings)
        est = mon["estimate"]
        _say(f"    {name}: {mon['decision']} (p={_f(mon['p_value'])}, n={mon['n_cur']}); "
             f"impact {mon['impact']}, estimated accuracy {_acc(est)}"
             + (f"; {', '.join(mon['quality_shift'])}" if mon["quality_shift"] else ""))
        row = {"site": name, "camera": s["condition"], "policy": s["policy"],
               "decision": mon["decision"], "p_value": mon["p_value"], "n_cur": mon["n_cur"],
               "impact": mon["impact"], "estimate": est, "notified": mon["notified"],
               "report_html": mon["report_html"], "alert_id": mon["alert_id"],
               "audit_acc_before": before["accuracy"], "method": None, "verdict": None,
               "gates": None, "challenger": None, "promoted": False}
        if mon["notified"]:  # what the drift event would start (alert_on rule)
            method = rt.site_context(name).site.adapt.method
            _say(f"3/5 re-adapting {name} without labels ({method})")
            ad = readapt_site(site=name, seed=seed, settings=settings)
            failed = [k for k, v in ad["gates"].items() if not v["passed"]]
            row.update(method=ad["method"], verdict=ad["verdict"], challenger=ad["version"],
                       gates=f"{len(ad['gates']) - len(failed)}/{len(ad['gates'])}",
                       failed_gates=failed, plots=ad["plots"])
            if ad["version"] is None:  # the portfolio found nothing better than the champion
                _say(f"    {name}: {ad['reasons'][0]}")
                row["gates"] = "-"
            else:
                _say(f"    {name}: challenger v{ad['version']} ({ad.get('selected') or method}) "
                     f"verdict {ad['verdict']}" + (f" (failed: {', '.join(failed)})" if failed else ""))
                if ad.get("promotion"):
                    row["promoted"] = True
                    _say(f"4/5 {name}: auto-promoted (policy auto, every gate passed)")
                elif s["policy"] == "manual" and ad["verdict"] in ("pass", "unverifiable"):
                    approver = rt.site_context(name).site.approvers[0]
                    refusal = _approval_refusal(rt, name, ad["version"], approver)
                    if refusal:  # e.g. the audit set says the challenger is worse: no --force here
                        _say(f"4/5 {name}: challenger v{ad['version']} waits: {refusal}")
                        row["waits_because"] = refusal
                    else:
                        _say(f"4/5 {name}: the demo approves v{ad['version']} as its approver")
                        promote(site=name, version=ad["version"], action="approve",
                                actor=approver,
                                reason=f"demo: verdict {ad['verdict']}, gates {row['gates']}",
                                settings=settings)
                        row["promoted"] = True
                else:
                    _say(f"4/5 {name}: challenger v{ad['version']} waits (verdict {ad['verdict']}; "
                         f"policy {s['policy']})")
        after = evaluate_folder(rt, name, s["audit"])
        row["audit_acc_after"] = after["accuracy"]
        row["champion"] = after["model"]
        rows.append(row)

    _say("5/5 summary")
    from tasks.reports.pages import screenshot, write_status_page

    status = write_status_page(rt)
    shot = screenshot(status, status.with_name("status.png"))  # None without chromium
    seconds = time.perf_counter() - t_start
    text = summary_text(rows, trained, data.kind, settings, seconds)
    log.info("demo finished in %.0f s", seconds)
    return {"data": data.kind, "source": trained, "sites": rows, "seconds": round(seconds, 1),
            "summary_text": text, "sites_file": str(data.sites_file),
            "status_page": str(status), "status_screenshot": str(shot) if shot else None}


def _approval_refusal(rt: Any, site: str, version: str, actor: str) -> str | None:
    """Why ``emowatch approve`` (without --force) would refuse, or None (the blessing's dry run)."""
    from tasks.promote.actions import check_promotion

    try:
        check_promotion(rt.site_context(site), version, "approve", actor=actor)
    except ValueError as e:
        return str(e)
    return None


def _acc(e: dict[str, Any]) -> str:
    if e.get("accuracy") is None:
        return "-"
    return f"~{e['accuracy']:.2f} [{e['low']:.2f}, {e['high']:.2f}]"


def _f(x: float | None) -> str:
    return "-" if x is None else (f"{x:.2g}" if x < 0.001 else f"{x:.3f}")


def _source_acc(rows: list[dict[str, Any]]) -> str:
    for r in rows:
        e = r.get("estimate") or {}
        if e.get("source_accuracy") is not None:
            return f"{e['source_accuracy']:.2f}"
    return "-"


def summary_text(rows: list[dict[str, Any]], trained: dict[str, Any], kind: str, settings: Any,
                 seconds: float) -> str:
    head = ["site", "camera", "decision", "p-value", "impact", "estimated acc", "method", "gates",
            "verdict", "champion", "audit acc before -> after"]
    table = [head]
    for r in rows:
        table.append([
            r["site"], r["camera"], r["decision"], _f(r["p_value"]), r.get("impact") or "-",
            _acc(r.get("estimate") or {}), r["method"] or "-",
            r["gates"] or "-", r["verdict"] or "-",
            r["champion"].split("/", 1)[1] if r.get("champion") else "-",
            f"{r['audit_acc_before']:.2f} -> {r['audit_acc_after']:.2f}",
        ])
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    home = Path(settings.home).resolve()
    out = [
        "",
        f"emowatch demo ({kind} data) finished in {seconds / 60:.1f} min. Source model "
        f"{trained['model']} v{trained['version']}: test accuracy {trained['test_accuracy']:.3f}.",
        "",
        *lines,
        "",
        "(estimated acc = the label-free estimate of the source champion's accuracy on the site's",
        f" images, training domain {_source_acc(rows)}; impact = what that means against the",
        " site's tolerance; only a harmful or unknown drift starts a re-adaptation; audit acc =",
        " accuracy of the site's champion on the site's labelled audit photos, which are never",
        " used for adaptation; 'champion' = model/version serving the site now)",
        "",
        f"Status page:        {home / 'reports' / 'index.html'} (open it in a browser; "
        "emowatch report rewrites it)",
        f"Check reports:      {home / 'reports'}/<site>/check-*.html (Evidently detail: "
        "drift-*.html)",
        f"Evidently UI:       evidently ui --workspace {home / 'evidently'}",
        f"Explanation plots:  {home / 'reports'}/<site>/adapt-v*/explanations.png",
        f"E-mails (.eml):     {home / 'outbox'}",
        f"MLflow UI:          mlflow ui --backend-store-uri {settings.tracking_uri}",
        f"Our database:       {settings.db_url}",
        "Next: emowatch status --json; emowatch approve <site> <version> --by <you>; emowatch rollback <site>",
    ]
    return "\n".join(out)
