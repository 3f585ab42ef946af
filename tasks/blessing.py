"""The promotion rule (a TFX-style "blessing"), as one pure function.

A challenger is *blessed* when its verdict is ``pass``, every gate passed, and (where the site
has a labelled audit set) its audit accuracy is not below the champion's by more than the
tolerance. Then:

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
            failed.append("audit_accuracy")
            reasons.append(
                f"audit accuracy {audit['challenger']:.3f} is {drop:.3f} below the champion's "
                f"{audit['champion']:.3f} (tolerance {audit_tolerance:.3f})"
            )
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
