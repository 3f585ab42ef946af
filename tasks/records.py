"""Typed records that cross task and flow boundaries (no Prefect, no I/O).

The accuracy estimate of a check is ``models.estimate.base.Estimate``; this module holds the
re-adaptation's two: the label-free :class:`Validation` of a candidate (``tasks.candidate``
builds it, the registration, the blessing and the approval e-mail read it) and the
:class:`ReadaptOutcome` of one ``readapt_site`` run. Each has one ``to_json``: what the flow,
the CLI (``emowatch adapt --json``) and the records in the database show. The outcome's JSON
has three shapes, kept exactly as they were when the flow returned dicts: a run that was not
started (``skipped``), one that found no candidate worth proposing (``no_gain``) and one that
registered a challenger.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Validation:
    """What the gates said of a candidate, and the evidence they used."""

    verdict: str  # "pass" | "fail" | "unverifiable"
    reasons: list[str]
    gates: dict[str, dict[str, Any]]  # gate result name -> {passed, value, threshold, ...}
    dev: dict[str, Any]  # the candidate's DEV record
    champion_dev: dict[str, Any]
    source_acc: float | None
    champion_source_acc: float | None
    mmd2_before: float | None
    mmd2_after: float | None
    audit: dict[str, Any] | None = None  # the site's labelled audit set, when it has one
    source_normalisation: str = "own"
    # Evidence kept for the registration's pictures (arrays, not JSON): the probe images (first
    # half training domain, second half site), the explanation gate's maps of both models, and
    # the candidate's own frozen activations when its frozen part changed.
    probe: Any = None
    probe_maps: dict[str, Any] = field(default_factory=dict)
    candidate_activations: Any = None

    JSON_FIELDS = ("verdict", "reasons", "gates", "dev", "champion_dev", "source_acc",
                   "champion_source_acc", "mmd2_before", "mmd2_after", "audit",
                   "source_normalisation")

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.JSON_FIELDS}


# The three JSON shapes of a re-adaptation run, in the order the CLI has always printed them
# (keys added since go at the end).
SKIPPED_KEYS = ("site", "method", "version", "gates", "verdict", "skipped")
NO_GAIN_KEYS = ("site", "method", "version", "model", "base_model", "gates", "verdict",
                "reasons", "candidates", "proxies", "seconds", "adapt_seconds",
                "n_site_images", "plots", "promotion", "approval_alert_id", "adaptation_run_id",
                "setup_seconds")
REGISTERED_KEYS = ("site", "method", "selected", "version", "model", "base_model", "gates",
                   "verdict", "reasons", "dev", "source_acc", "champion_source_acc", "audit",
                   "seconds", "adapt_seconds", "candidates", "proxies", "n_site_images", "plots",
                   "promotion", "approval_alert_id", "adaptation_run_id", "setup_seconds")


@dataclass
class ReadaptOutcome:
    """The outcome of one re-adaptation run of a site."""

    site: str
    method: str
    version: str | None = None  # the challenger registered (None: none)
    verdict: str | None = None  # the gates' verdict, "no_gain", or None when skipped
    gates: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: str | None = None  # why the run did not start (drift-triggered runs only)
    selected: str | None = None  # the candidate proposed (a portfolio member or the method)
    model: str | None = None
    base_model: str | None = None
    reasons: list[str] = field(default_factory=list)
    dev: dict[str, Any] | None = None
    source_acc: float | None = None
    champion_source_acc: float | None = None
    audit: dict[str, Any] | None = None
    seconds: float | None = None
    adapt_seconds: float | None = None
    candidates: list[dict[str, Any]] | None = None
    proxies: list[dict[str, Any]] | None = None
    n_site_images: int | None = None
    plots: dict[str, str] = field(default_factory=dict)
    promotion: dict[str, Any] | None = None
    approval_alert_id: int | None = None
    adaptation_run_id: int | None = None
    # the portfolio's proxies (the site twin's fit and images), timed apart from its budget
    setup_seconds: float | None = None

    @classmethod
    def registered(cls, site: str, method: str, selected: str, validation: Validation,
                   **kwargs: Any) -> ReadaptOutcome:
        """A run that registered a challenger, with its validation's figures."""
        return cls(site=site, method=method, selected=selected, verdict=validation.verdict,
                   gates=validation.gates, reasons=validation.reasons, dev=validation.dev,
                   source_acc=validation.source_acc,
                   champion_source_acc=validation.champion_source_acc, audit=validation.audit,
                   **kwargs)

    @property
    def keys(self) -> tuple[str, ...]:
        if self.skipped is not None:
            return SKIPPED_KEYS
        if self.version is None:
            return NO_GAIN_KEYS
        return REGISTERED_KEYS

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.keys}


__all__ = ["NO_GAIN_KEYS", "REGISTERED_KEYS", "SKIPPED_KEYS", "ReadaptOutcome", "Validation"]
