"""The texts of every e-mail emowatch sends (plain text first: read in any mail client).

Pure functions of the records they describe: the drift alert (``tasks.monitor`` queues it), the
approval request and the promotion notices (``tasks.promote.actions``), and a decision made in
MLflow that was refused (``tasks.promote.sync``). Each returns ``(subject, body)`` or the body.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from emowatch.sites import Site

if TYPE_CHECKING:
    from models.drift.base import DriftResult
    from models.estimate.base import Estimate


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def pfmt(x: float | None) -> str:
    """A p-value or statistic: 4 significant digits, "n/a" when missing."""
    return "n/a" if x is None else f"{x:.4g}"


def drift_email(site: Site, check_id: int, result: DriftResult, phrases: list[str],
                model_key: str, reports: Mapping[str, Any], estimate: Estimate | None = None,
                impact: str | None = None) -> tuple[str, str]:
    """(subject, body): the impact and the estimate first, then the drift test's evidence."""
    # imported here: the module stays plain text for the promotion path (tasks.impact loads
    # Prefect through tasks.featurize)
    from models.estimate.base import as_estimate
    from tasks.impact import explanation, headline

    est = as_estimate(estimate)
    imp = impact or "unknown"
    sub = result.details.get(result.details.get("triggered_by", ""), {}) if result.details else {}
    drifted = result.decision == "drift"
    lines = [
        headline(site, est, imp),
        explanation(site, est, imp),
        "",
        f"Drift test:    {result.decision} (combined p-value {pfmt(result.p_value)} "
        f"{'<=' if drifted else '>'} alpha {result.threshold})",
        f"Test:          {result.method}; triggered by {result.details.get('triggered_by', '-')}"
        f" (statistic {pfmt(sub.get('statistic'))}, p {pfmt(sub.get('p_value'))})",
        f"Sample sizes:  {result.n_cur} recent site images vs {result.n_ref} reference images",
        f"Model:         {model_key}",
        f"Drift check:   #{check_id}",
        "",
        "What changed in the images: " + ("; ".join(phrases) if phrases else "no clear change in image quality statistics"),
    ]
    # the predicted-class shares any sub-test reports (the softmax test does); the keys read
    # before ("predicted_share_cur" of "bbsd") never existed, so this line was never written
    subs = [v for v in (result.details or {}).values() if isinstance(v, dict)]
    shares = next((v["details"]["pred_share_cur"] for v in subs
                   if isinstance(v.get("details"), dict) and v["details"].get("pred_share_cur")),
                  None)
    if shares:
        lines.append("Predicted classes now: " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))
    lines += [
        "",
        f"Report (open in a browser): {reports.get('page') or 'not written'}",
        f"Status of every site:       {reports.get('status') or 'not written'}",
        f"Evidently report (detail):  {reports.get('html') or 'not available (' + str(reports.get('error')) + ')'}",
        "",
        "What happens next: if the site's adapt.auto is true, emowatch re-adapts the model to the",
        "site without labels and asks for approval of the candidate. By hand:",
        f"  emowatch adapt {site.name} --json",
    ]
    subject = f"[emowatch] {headline(site, est, imp)} (drift p={pfmt(result.p_value)}, n={result.n_cur})"
    return subject, "\n".join(lines)


def refused_message(site: Site, version: str, what: str, tags: Sequence[str]) -> tuple[str, str]:
    """A decision on ``version`` made in MLflow was refused; ``tags``: the decision, by and
    reason tag names (``tasks.promote.sync``)."""
    decision, by, reason = tags
    subject = f"[emowatch] {site.name}: a decision on version {version} in MLflow was refused"
    body = (f"Site {site.name}: {what}\n\n"
            f"The served model is still the recorded champion. To approve, a listed approver "
            f"({', '.join(site.approvers) or 'none listed'}) runs\n"
            f"  emowatch approve {site.name} {version} --by NAME [--reason TEXT]\n"
            f"or sets the tags {decision}=approve, {by}=NAME and "
            f"{reason} on the version in MLflow.\n")
    return subject, body


def gates_table(gates: Mapping[str, Mapping[str, Any]] | None) -> str:
    """The gates as a fixed-width text table."""
    if not gates:
        return "  (no gate results recorded)"
    w = max(12, *(len(n) for n in gates))
    lines = [f"  {'gate':<{w}}  {'passed':<6}  {'value':>10}  {'threshold':>10}"]
    for name in sorted(gates):
        g = gates[name]
        lines.append(f"  {name:<{w}}  {fmt(bool(g.get('passed'))):<6}  "
                     f"{fmt(g.get('value')):>10}  {fmt(g.get('threshold')):>10}")
    return "\n".join(lines)


def audit_line(audit: Mapping[str, Any] | None) -> str:
    if not audit:
        return "Audit set: none (no labelled images at this site)."
    line = (f"Audit accuracy: challenger {fmt(audit.get('challenger'))}, "
            f"champion {fmt(audit.get('champion'))}")
    if audit.get("champion_only") is not None and audit.get("challenger_only") is not None:
        line += (f" on {audit.get('n', '?')} labelled site images (only the champion right on "
                 f"{audit['champion_only']}, only the challenger on {audit['challenger_only']})")
    return line + "."


def promotion_message(site: Site, r: Mapping[str, Any], plan: Mapping[str, Any]
                      ) -> tuple[str, str]:
    """(subject, body) of the e-mail that reports an approve / auto / reject / rollback."""
    name, v, prev = r["model"], r["version"], r["previous_champion"]
    who = f"{r['actor']}" + (f" ({r['reason']})" if r["reason"] else "")
    undo = (f"A rollback would restore version {r['next_rollback']}: "
            f"emowatch rollback {site.name} --by NAME" if r["next_rollback"]
            else "There is no earlier champion in the history: a rollback is not possible.")
    val = plan.get("validation") or {}
    if r["action"] in ("approve", "auto"):
        how = "automatically (every gate passed)" if r["action"] == "auto" else f"by {who}"
        forced = ("\nFORCED: the approver overrode failed checks: "
                  + "; ".join(r["blessing"]["reasons"]) if r["forced"] else "")
        subject = f"[emowatch] {site.name}: version {v} is now the champion"
        body = (f"Site {site.name}: {name} version {v} was promoted to champion {how}.\n"
                f"Previous champion: {prev or 'none'}.\n"
                f"Validation verdict: {val.get('verdict') or 'none'}.{forced}\n\n"
                f"Gates:\n{gates_table(val.get('gates'))}\n{audit_line(val.get('audit'))}\n\n"
                f"{undo}\n")
    elif r["action"] == "reject":
        subject = f"[emowatch] {site.name}: version {v} rejected"
        body = (f"Site {site.name}: {name} version {v} was rejected by {who}.\n"
                f"The champion stays version {r['champion'] or 'none'}; version {v} is kept in "
                f"the registry for the record.\n\n"
                f"Gates:\n{gates_table(val.get('gates'))}\n")
    else:
        subject = f"[emowatch] {site.name}: rolled back to version {v}"
        body = (f"Site {site.name}: the champion of {name} was rolled back from version "
                f"{prev or 'none'} to version {v} by {who}.\n{undo}\n")
    return subject, body


def candidates_table(candidates: Sequence[Mapping[str, Any]]) -> str:
    """The portfolio's candidates as text lines: estimated gain with its 95% interval, time,
    which one was selected, why one was skipped."""
    lines = [f"  {'candidate':16s} {'est. gain':>10s} {'95% interval':>16s} {'seconds':>8s}"]
    for c in candidates:
        name = c.get("name") or c.get("method")
        e = c.get("estimate") or {}
        mark = "  <- selected" if c.get("selected") else ""
        if c.get("skipped"):
            lines.append(f"  {name:16s} skipped: {c['skipped']}")
        elif name == "champion":
            lines.append(f"  {name:16s} {'0.0 pts':>10s} {'(the baseline)':>16s} {'':>8s}")
        else:
            lines.append(f"  {name:16s} {100 * e.get('gain', 0):+7.1f} pts "
                         f"[{100 * e.get('lower', 0):+5.1f}, {100 * e.get('upper', 0):+5.1f}] "
                         f"{c.get('seconds', 0):8.1f}{mark}")
    return "\n".join(lines)


def approval_message(site: Site, version: str, champion: str | None, verdict: str,
                     gates: Mapping[str, Mapping[str, Any]] | None,
                     audit: Mapping[str, Any] | None, blessing: Any,
                     reasons: Sequence[str] = (),
                     candidates: Sequence[Mapping[str, Any]] | None = None) -> tuple[str, str]:
    """(subject, body) of the "approval needed" e-mail for a challenger; ``blessing`` is what
    ``tasks.promote.blessing.bless`` says of an approval now; ``candidates`` the portfolio's table."""
    b = blessing
    if b.allowed and b.blessed:
        outcome = "Every gate passed."
        approve = f"  emowatch approve {site.name} {version} --by NAME [--reason TEXT]"
    elif b.allowed:
        outcome = ("The checks could not decide without labels (unverifiable): approving means "
                   "taking responsibility for it.")
        approve = f"  emowatch approve {site.name} {version} --by NAME --reason TEXT"
    else:
        outcome = ("Some checks FAILED (" + ", ".join(b.failed_gates) + "). Approving anyway "
                   "needs --force and a reason.")
        approve = f"  emowatch approve {site.name} {version} --by NAME --force --reason TEXT"
    why = list(dict.fromkeys([*reasons, *b.reasons]))  # the verdict's reasons, then the rule's
    if why:
        outcome += "\nWhy:\n" + "\n".join(f"- {r}" for r in why)
    subject = f"[emowatch] {site.name}: approve challenger version {version}? (verdict {verdict})"
    body = (
        f"Site {site.name} drifted and was re-adapted without labels. The challenger is "
        f"{site.model_name} version {version}; the champion is version {champion or 'none'}.\n"
        f"Site policy: {site.policy}. Validation verdict: {verdict}.\n{outcome}\n\n"
        f"Gates:\n{gates_table(gates)}\n{audit_line(audit)}\n\n"
        + (f"Candidates (estimated on labelled proxies of the site):\n"
           f"{candidates_table(candidates)}\n\n" if candidates else "") +
        f"To promote it to champion:\n{approve}\n"
        f"To reject it (the champion stays):\n"
        f"  emowatch reject {site.name} {version} --by NAME --reason TEXT\n"
    )
    return subject, body


__all__ = ["approval_message", "audit_line", "candidates_table", "drift_email", "fmt", "gates_table",
           "pfmt", "promotion_message", "refused_message"]
