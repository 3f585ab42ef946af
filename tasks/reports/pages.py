"""What a person opens: one self-contained HTML report per drift check and the status page.

    write_check_report(ctx, ...) -> $EMOWATCH_HOME/reports/<site>/check-<id>.html
    write_status_page(rt)        -> $EMOWATCH_HOME/reports/index.html

Jinja2 templates in ``tasks/reports/templates`` (autoescaped), inline CSS, figures and thumbnails as
data URIs: no CDN, no JavaScript, works offline and as a mail attachment. The report leads with
emowatch's own decision, impact and accuracy estimate; each test's statistic / p-value /
threshold; what changed in words and as histograms; the site images the MMD test's witness
function finds most and least unlike the training domain; the predicted-class shares; links to
the Evidently report (the detailed appendix) and the MLflow run. The status page has one row
per site (champion, last check, impact, estimate, images, what waits for approval and why,
e-mails pending) and per site the p-value and estimated accuracy over time, linking each
check's report. A report of a 500-image window stays well under 1 MB (16 thumbnails, two
small figures).
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from models.estimate.base import Estimate
    from tasks.context import RunContext, Runtime

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
N_EXAMPLES = 8
THUMB_PX = 96
HISTORY_CHECKS = 60


# --- rendering ---------------------------------------------------------------------------------------
def pct(v: Any) -> str:
    return "-" if v is None else f"{100 * float(v):.1f}%"


def pts(v: Any) -> str:
    return "-" if v is None else f"{100 * float(v):+.1f} pts"


def num(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.4f}".rstrip("0").rstrip(".")
    return str(v)


@functools.cache
def _environment() -> Any:
    """The templates' environment, built once per process: it keeps the compiled templates
    (the warm check worker renders a page per check; the file loader still notices an edited
    template)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                             autoescape=jinja2.select_autoescape(["html", "j2"]),
                             undefined=jinja2.StrictUndefined)
    env.globals.update(pct=pct, pts=pts, num=num)
    return env


def render(template: str, **values: Any) -> str:
    return _environment().get_template(template).render(**values)


def png_uri(fig: Any, dpi: int = 80) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def thumb_uri(path: str | Path, size: int = THUMB_PX) -> str | None:
    """A small JPEG thumbnail as a data URI (None when the file cannot be read)."""
    from models.images import load_rgb

    try:
        im = load_rgb(path)
    except Exception as e:  # noqa: BLE001 -- a missing thumbnail is not worth a report
        log.warning("no thumbnail for %s: %s", path, e)
        return None
    im.thumbnail((2 * size, 2 * size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=70)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def array_uri(rgb: np.ndarray, quality: int = 75) -> str:
    """An RGB array as a JPEG data URI (75 for thumbnails; higher where compression would hide
    what the picture shows: noise, JPEG blocks)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(rgb, np.uint8)).save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def twin_pictures(profile: Any, twin: Mapping[str, Any] | None, site_paths: Sequence[str],
                  k: int = 2) -> list[tuple[str, np.ndarray]]:
    """What the site twin means, in pictures: ``k`` training-domain images, each beside itself
    through the fitted camera, then ``k`` site images, all on the model's grid: (caption,
    RGB array) pairs. Empty without a twin estimate or the twin's images."""
    if not twin or not twin.get("params") or not getattr(profile, "twin", None):
        return []
    from models.images import load_rgb
    from models.network import Preprocessing
    from models.sim.camera import CameraParams, apply_camera

    prep = Preprocessing(img_size=int(twin.get("grid") or 224))
    params = CameraParams(**twin["params"])
    rng = np.random.default_rng(0)
    held, _ = profile.twin_images(prep, limit=k)
    out: list[tuple[str, np.ndarray]] = []
    for i, im in enumerate(held):
        out += [(f"training {i + 1}", im),
                (f"its twin {i + 1}", apply_camera(im, params, rng, tuple(twin["native"])
                                                      if twin.get("native") else None))]
    for i, p in enumerate(list(site_paths)[:k]):
        try:
            out.append((f"site {i + 1}", prep.to_array(load_rgb(p))))
        except Exception:  # noqa: BLE001 -- a picture, never a failed report
            continue
    return out


def twin_strip(profile: Any, twin: Mapping[str, Any] | None, site_paths: Sequence[str]
               ) -> list[dict[str, str]]:
    """:func:`twin_pictures` as the page's figures (JPEG q92: q75 would hide noise and
    blocks)."""
    return [{"uri": array_uri(a, 92), "name": n} for n, a in twin_pictures(profile, twin,
                                                                           site_paths)]


def write_twin_picture(path: Path, profile: Any, twin: Mapping[str, Any] | None,
                       site_paths: Sequence[str]) -> Path | None:
    """The e-mail's picture of the twin: training image, its twin, site image side by side
    (one row), as a JPEG at ``path``; None without a twin."""
    from PIL import Image

    pics = twin_pictures(profile, twin, site_paths, k=1)
    if not pics:
        return None
    Image.fromarray(np.hstack([a for _, a in pics])).save(path, format="JPEG", quality=92)
    return path


# --- the check report ------------------------------------------------------------------------------------
def test_rows(details: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """One row per sub-test of the combined decision."""
    rows = []
    for name, d in (details or {}).items():
        if isinstance(d, Mapping) and "p_value" in d:
            rows.append({"name": name, "input": d.get("method"), "statistic": d.get("statistic"),
                         "p_value": d.get("p_value"), "threshold": d.get("threshold"),
                         "decision": d.get("decision")})
    return rows


def examples(ref_z: np.ndarray, cur_z: np.ndarray, probs: np.ndarray, classes: Sequence[str],
             paths: Sequence[str], n: int = N_EXAMPLES) -> tuple[list[dict], list[dict]]:
    """(most unlike, most like) the training domain by the MMD witness on the features."""
    from models.drift.mmd import witness

    if len(cur_z) < 2 or len(ref_z) < 2:
        return [], []
    w = witness(ref_z, cur_z)
    order = np.argsort(-w)

    def pick(idx: Sequence[int]) -> list[dict]:
        out = []
        for i in idx:
            uri = thumb_uri(paths[i])
            if uri is not None:
                k = int(np.argmax(probs[i]))
                out.append({"uri": uri, "name": Path(paths[i]).name[:12], "score": float(w[i]),
                            "label": classes[k], "prob": float(probs[i, k])})
        return out

    k = min(n, len(order) // 2)
    return pick(order[:k]), pick(order[::-1][:k])


def check_report_html(*, site: Any, check_id: int, model: str, result: Any, phrases: Sequence[str],
                      estimate: Estimate | Mapping[str, Any] | None, impact: str | None,
                      notified: bool,
                      profile: Any, fs: Any, paths: Sequence[str], evidently: str | None,
                      mlflow_run: str | None, created: str | None = None,
                      quality_fig: Any = None) -> str:
    from models.estimate.base import as_estimate
    from models.report_plots import class_shares_figure, quality_histograms_figure
    from tasks.impact import explanation, headline

    record = as_estimate(estimate)
    est = record.to_json()
    imp = impact or "unknown"
    quality_png = shares_png = None
    atypical: list[dict] = []
    typical: list[dict] = []
    training: list[dict] = []
    if len(fs):
        if profile.quality and fs.quality:
            quality_png = png_uri(quality_fig if quality_fig is not None else
                                  quality_histograms_figure(profile.quality, fs.quality,
                                                            site=site.name))
        shares_png = png_uri(class_shares_figure(profile.probs, fs.probs, profile.classes,
                                                 site=site.name))
        atypical, typical = examples(profile.features, fs.z, fs.probs, profile.classes, paths)
        thumbs = getattr(profile, "thumbnails", None)
        if thumbs is not None and len(thumbs):
            training = [{"uri": array_uri(t), "name": f"training {i + 1}"}
                        for i, t in enumerate(thumbs)]
    twin = twin_strip(profile, record.twin, paths) if len(fs) else []
    return render(
        "check_report.html.j2", site=site.name, check_id=check_id, model=model,
        created=created or dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        decision=result.decision, impact=imp, headline=headline(site, record, imp),
        explanation=explanation(site, record, imp), p_value=num(result.p_value),
        alpha=result.threshold, n_cur=result.n_cur, n_ref=result.n_ref,
        alert_on=site.drift.alert_on, notified=notified, estimate=est,
        tests=test_rows(result.details), phrases=list(phrases), quality_png=quality_png,
        shares_png=shares_png, atypical=atypical, typical=typical, training=training, twin=twin,
        evidently=Path(evidently).resolve().as_uri() if evidently else None,
        mlflow_run=mlflow_run)


def check_report_path(reports_dir: Path, site: str, check_id: int) -> Path:
    return Path(reports_dir) / site / f"check-{check_id}.html"


def write_check_report(ctx: RunContext, check_id: int, result: Any, phrases: Sequence[str],
                       profile: Any, fs: Any, paths: Sequence[str],
                       estimate: Estimate | None, impact: str | None, notified: bool,
                       reports: Mapping[str, Any], mlflow_run: str | None,
                       quality_fig: Any = None) -> Path:
    from tasks.ingest.storage import write_atomic

    out = check_report_path(ctx.settings.reports_dir, ctx.site.name, check_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    html = check_report_html(site=ctx.site, check_id=check_id, model=ctx.model.key,
                             result=result, phrases=phrases, estimate=estimate, impact=impact,
                             notified=notified, profile=profile, fs=fs, paths=paths,
                             evidently=reports.get("html"), mlflow_run=mlflow_run,
                             quality_fig=quality_fig)
    write_atomic(out, html.encode("utf-8"))
    return out


# --- the status page ---------------------------------------------------------------------------------
_HISTORY: dict[tuple, str] = {}  # (site, check ids, alpha) -> picture: a check never changes


def _history_png(site: str, checks: Sequence[Mapping[str, Any]], alpha: float) -> str:
    """A site's history picture, drawn again only when its checks changed (a warm worker
    rewrites the status page every tick: 100 sites, one of them checked)."""
    from models.report_plots import history_figure

    key = (site, tuple(c["id"] for c in checks), alpha)
    if key not in _HISTORY:
        if len(_HISTORY) >= 1000:
            _HISTORY.clear()
        _HISTORY[key] = png_uri(history_figure(
            [c["p_value"] for c in checks], [c["accuracy"] for c in checks],
            [c["low"] for c in checks], [c["high"] for c in checks], alpha=alpha,
            labels=[c["at"][5:] for c in checks]))
    return _HISTORY[key]


def _site_rows(rt: Runtime) -> tuple[list[dict[str, Any]], dict[str, int]]:
    from db import outbox
    from db.adaptations import latest_run
    from db.checks import recent_checks
    from db.deployments import champion_stack
    from db.session import session_scope
    from db.sites import site_ids
    from db.status import status_counts
    from emowatch.sites import load_sites
    from tasks.registry.client import CHALLENGER, site_model_name

    try:
        sites = load_sites(rt.settings.sites_file)
    except Exception:  # noqa: BLE001 -- the page shows what the database knows
        sites = {}
    rows = []
    with session_scope(rt.engine) as s:
        counts = status_counts(s)["sites"]
        ids = site_ids(s)
        pending_by = {name: outbox.counts_by_status(s, sid).get("pending", 0)
                      for name, sid in ids.items()}
        for name in sorted(set(sites) | set(ids)):
            cfg = sites.get(name)
            model = site_model_name(name)
            entry: dict[str, Any] = {
                "name": name, "policy": cfg.policy if cfg else "-",
                "approvers": ", ".join(cfg.approvers) if cfg else "",
                "images": counts.get(name, {}).get("images", 0),
                "pending": pending_by.get(name, 0), "champion": None, "last": None,
                "waiting": None, "checks": [], "history_png": None}
            rows.append(entry)
            if name not in ids:
                continue
            sid = ids[name]
            stack = champion_stack(s, sid, model)
            entry["champion"] = stack[-1] if stack else None
            checks = recent_checks(s, sid, HISTORY_CHECKS)  # oldest first
            reports = rt.settings.reports_dir
            for c in checks:
                est = c.estimate or {}
                page = check_report_path(reports, name, c.id)
                entry["checks"].append({
                    "id": c.id, "at": c.created_at.strftime("%Y-%m-%d %H:%M") if c.created_at else "",
                    "decision": c.decision, "p_value": c.p_value, "impact": c.impact,
                    "accuracy": est.get("accuracy"), "low": est.get("low"),
                    "high": est.get("high"),
                    "report": f"{name}/{page.name}" if page.is_file() else None})
            if checks:
                entry["last"] = entry["checks"][-1]
                entry["history_png"] = _history_png(
                    name, entry["checks"], cfg.drift.alpha if cfg else 0.05)
                entry["checks"] = entry["checks"][::-1][:20]  # newest first in the table
            run = latest_run(s, sid)
            if run is not None and run.candidate_version:
                entry["_candidate"] = {"version": run.candidate_version, "verdict": run.verdict,
                                       "method": run.method, "reasons": list(run.reasons or [])}
        outbox_counts = outbox.counts_by_status(s)
    for entry in rows:
        cand = entry.pop("_candidate", None)
        if cand is None:
            continue
        try:
            challenger = rt.registry.get_alias_version(site_model_name(entry["name"]), CHALLENGER)
        except Exception:  # noqa: BLE001 -- the page is still worth writing
            challenger = None
        if challenger == cand["version"]:
            entry["waiting"] = cand
    return rows, outbox_counts


def status_page_path(reports_dir: Path) -> Path:
    return Path(reports_dir) / "index.html"


def write_status_page(rt: Runtime) -> Path:
    """Write ``reports/index.html`` (atomically: monitors of several sites rewrite it at once)
    and return its path."""
    from tasks.ingest.storage import write_atomic

    rows, outbox_counts = _site_rows(rt)
    html = render("status.html.j2", sites=rows, outbox=outbox_counts,
                  written=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    out = status_page_path(rt.settings.reports_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, html.encode("utf-8"))
    return out


def screenshot(page: Path, out: Path, width: int = 1200, height: int = 1400) -> Path | None:
    """A PNG of a local page rendered by headless Chromium (Debian's ``chromium``), or None
    when no browser is installed or it failed (logged)."""
    import shutil
    import subprocess
    import tempfile

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        return None
    with tempfile.TemporaryDirectory(prefix="emowatch-chrome-") as profile:
        try:
            subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                            "--hide-scrollbars", f"--user-data-dir={profile}",
                            f"--window-size={width},{height}", f"--screenshot={out}",
                            Path(page).resolve().as_uri()],
                           capture_output=True, timeout=120, check=True)
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("no screenshot of %s: %s", page, e)
            return None
    return out if out.is_file() else None


__all__ = ["check_report_html", "screenshot", "status_page_path", "check_report_path", "examples", "render", "test_rows",
           "write_check_report", "write_status_page"]
