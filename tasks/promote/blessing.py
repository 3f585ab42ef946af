"""The promotion rule (a TFX-style "blessing"), as one pure function.

A challenger is *blessed* when its verdict is ``pass``, every gate passed, and (where the site
has a labelled audit set) its audit accuracy is not below the champion's by more than the
tolerance -- counted as a failure only when the paired comparison says the drop is not chance:
an exact one-sided McNemar (sign) test on the images only one of the two models gets right,
p < ``AUDIT_ALPHA``. (On a 40-image audit set one image is 2.5 points: a 2-point tolerance on
its own would fail half of all challengers that are exactly as good as the champion.) Then:

* ``auto``    — allowed only on ``policy = "auto"`` sites and only when blessed;
                ``unverifiable`` never auto-promotes.
* ``approve`` — a person decides. Allowed when blessed or ``unverifiable`` (the person takes
                responsibility for what labels-free checks could not tell); a challenger that
                FAILED a gate (or the audit) needs ``force`` and a non-empty reason.
* ``reject`` / ``rollback`` — always allowed (they never put an unchecked model in front).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Action = Literal["approve", "auto", "reject", "rollback"]

# A challenger may be at most this much less accurate than the champion on the audit set
# (labelled images from the site itself: the only direct evidence we ever get).
AUDIT_TOLERANCE = 0.02
# Significance of the audit drop (one-sided exact McNemar) needed to count it as a failure.
AUDIT_ALPHA = 0.05


def mcnemar_worse_p(champion_only: int, challenger_only: int) -> float:
    """One-sided exact McNemar p-value for "the challenger is worse": P(X >= champion_only),
    X ~ Binomial(champion_only + challenger_only, 1/2)."""
    from scipy.stats import binom

    n = int(champion_only) + int(challenger_only)
    if n == 0:
        return 1.0
    return float(binom.sf(int(champion_only) - 1, n, 0.5))


@dataclass
class Blessing:
    allowed: bool
    blessed: bool
    failed_gates: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"allowed": self.allowed, "blessed": self.blessed,
                "failed_gates": self.failed_gates, "reasons": self.reasons}


def bless(
    *,
    action: Action,
    policy: Literal["manual", "auto"],
    verdict: str | None,
    gates: dict[str, dict[str, Any]] | None,
    audit: dict[str, float] | None = None,
    force: bool = False,
    reason: str = "",
    audit_tolerance: float = AUDIT_TOLERANCE,
    audit_alpha: float = AUDIT_ALPHA,
) -> Blessing:
    """Decide whether ``action`` may move the champion alias to the challenger."""
    if action in ("reject", "rollback"):
        return Blessing(allowed=True, blessed=False, reasons=[f"{action} is always allowed"])
    if action not in ("approve", "auto"):
        raise ValueError(f"unknown action {action!r}")

    gates = gates or {}
    failed = sorted(n for n, g in gates.items() if not bool(g.get("passed")))
    reasons: list[str] = []
    if audit is not None and audit.get("challenger") is not None and audit.get("champion") is not None:
        drop = float(audit["champion"]) - float(audit["challenger"])
        if drop > audit_tolerance:
            what = (f"audit accuracy {audit['challenger']:.3f} is {drop:.3f} below the champion's "
                    f"{audit['champion']:.3f} (tolerance {audit_tolerance:.3f})")
            paired = audit.get("champion_only") is not None and audit.get("challenger_only") is not None
            p = (mcnemar_worse_p(audit["champion_only"], audit["challenger_only"]) if paired
                 else 0.0)  # no paired counts (older records): the drop alone decides
            if p < audit_alpha:
                failed.append("audit_accuracy")
                reasons.append(what + (f", McNemar p={p:.3f}" if paired else ""))
            else:
                reasons.append(
                    f"{what}, but within chance on {audit.get('n', '?')} images (only the "
                    f"champion right on {audit['champion_only']}, only the challenger on "
                    f"{audit['challenger_only']}; McNemar p={p:.2f}): not counted as a failure")
    if verdict is None:
        reasons.append("the version has no validation verdict (not a checked challenger)")
    elif verdict == "fail" and not failed:
        failed.append("verdict")
    blessed = verdict == "pass" and not failed
    if failed:
        reasons.append("failed gates: " + ", ".join(failed))

    if action == "auto":
        if policy != "auto":
            return Blessing(False, blessed, failed, reasons + ["site policy is manual"])
        if verdict == "unverifiable":
            return Blessing(False, blessed, failed, reasons + ["unverifiable never auto-promotes"])
        if not blessed:
            return Blessing(False, blessed, failed, reasons + ["not every gate passed"])
        return Blessing(True, True, failed, reasons + ["every gate passed"])

    # action == "approve"
    if blessed:
        return Blessing(True, True, failed, reasons + ["every gate passed"])
    if failed or verdict is None:
        if not force:
            return Blessing(False, False, failed, reasons + ["approving it needs --force and --reason"])
        if not reason.strip():
            return Blessing(False, False, failed, reasons + ["--force needs a --reason"])
        return Blessing(True, False, failed, reasons + [f"forced by approver: {reason.strip()}"])
    # unverifiable, no failed gate: a person may take the responsibility
    return Blessing(True, False, failed, reasons + ["unverifiable without labels: approved by a person"])
