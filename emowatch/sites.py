"""The sites file: which sites exist, where their images arrive, and their policies.

``load_sites(path)`` reads a TOML file and returns validated :class:`Site` objects, or raises
:class:`SitesFileError` whose message names the line, the field and why it is wrong.
See ``deployments/sites.example.toml`` for a commented example.
"""

from __future__ import annotations

import re
import tomllib
from datetime import UTC
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$|^[^@\s]+@localhost$")


class DriftThresholds(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(0.05, gt=0, le=0.5, description="Significance level of the drift test.")
    min_samples: int = Field(30, ge=5, le=100_000, description="Below: insufficient_data.")
    window: int = Field(500, ge=5, le=100_000, description="Most recent images tested.")
    permutations: int = Field(500, ge=50, le=20_000, description="MMD permutation count.")
    quality_test: bool = Field(
        True, description="Also test image-quality statistics (catches colour casts, greyscale, "
        "JPEG damage that the model's features barely show; bench/drift.py)."
    )
    cooldown_minutes: int | None = Field(
        None, ge=0, description="Alert cool-down; default: Settings.alert_cooldown_minutes."
    )
    max_accuracy_drop: float = Field(
        0.03, ge=0, le=1, description="Tolerated drop of the estimated accuracy below the "
        "training domain's (a fraction): above it with confidence the impact is harmful; an "
        "upper bound within it is harmless.")
    alert_on: Literal["harmful", "drift"] = Field(
        "harmful", description="harmful: e-mail (and re-adapt) when the impact is harmful, or "
        "unknown while the drift test fired; a harmless drift is recorded and reported only. "
        "drift: every statistical drift, whatever its impact.")

    @model_validator(mode="after")
    def _window_holds_min(self) -> DriftThresholds:
        if self.window < self.min_samples:
            raise ValueError(f"window ({self.window}) must be >= min_samples ({self.min_samples})")
        return self


def _default_portfolio() -> tuple[str, ...]:
    from models.catalog import DEFAULT_PORTFOLIO

    return DEFAULT_PORTFOLIO


class AdaptOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str = Field(
        "portfolio",
        description="'portfolio' (several candidates, cheapest first; the one to propose chosen "
        "by the lower bound of its estimated gain on labelled proxies of the site, or none: "
        "verdict no_gain; models.adapt.portfolio), or one method of models.catalog.ADAPTERS, which "
        "then runs alone (mmd: the paper's loss, through the whole backbone with "
        "train_backbone).")
    portfolio: list[str] = Field(
        default_factory=lambda: list(_default_portfolio()),
        description="The portfolio's members, by their names in models.catalog.PORTFOLIO "
        "(tried in the catalog's order, cheapest first).")
    # 50 s (was 75): on 2 fp32 AVX2 cores loading, the twin's proxies, validation and
    # registration take ~70 s of a 240-image re-adaptation, so 50 s keeps it near 120 s
    # (bench.readapt_site); bench.portfolio (seed 0, night 2, blur 2) selected the same
    # candidates at 50 and 75 s there (docs/benchmarks.md, session 16).
    portfolio_budget_s: float = Field(
        50.0, gt=0,
        description="Seconds the portfolio may spend building candidates (site and proxies; "
        "loading and the twin are timed apart); a member not started by then, or whose "
        "measured seconds do not fit what is left, is skipped and says so.")
    proxies: int = Field(4, ge=1, le=10, description="Labelled proxies of the site the "
                         "portfolio's estimates are measured on (twin: draws of its camera, each "
                         "split differently into the half adapted on and the half scored).")
    judge: Literal["twin", "bank"] = Field(
        "twin",
        description="What the portfolio's candidates are judged on: 'twin' (the held-out "
        "labelled images through the camera fitted to the site, models.estimate.twin; a site "
        "the twin cannot reproduce ends no_gain) or 'bank' (the simulated shifts of the "
        "estimator's bank nearest the site, models.adapt.proxies.build_proxies).")
    min_gain: float = Field(
        0.0, ge=-100, le=100,
        description="Accuracy points a candidate's estimated gain over the champion must exceed "
        "for the portfolio to propose it (0: any gain; 2: more than 2 points); otherwise verdict "
        "no_gain.")
    tolerance: float = Field(
        1.0, ge=0, le=100,
        description="Accuracy points a proposed candidate may be worse than the champion at "
        "most, at 95% (its one-sided lower bound must be above -tolerance): non-inferiority, "
        "not certainty of a gain.")
    source_free: bool = Field(False, description="Training data may not be used at this site.")
    max_images: int = Field(500, ge=10, le=100_000)
    time_budget_s: float = Field(600.0, gt=0)
    site_bn_weight: float | None = Field(
        None, ge=0, le=1,
        description="adabn/shot-im/tent: weight of the site in the final batch-norm statistics "
        "(1 = AdaBN; 0.5 = half training domain, keeps more source accuracy on mild shifts, "
        "fixes little on strong ones). Default: the method's (1).")
    train_backbone: bool = Field(
        True,
        description="mmd/coral: adapt every layer from the raw images (backprop through the whole "
        "backbone, models.adapt.discrepancy.with_backbone). False: only the bottleneck and head, on cached "
        "activations (seconds instead of ~6 min per 500-image site on 2 cores, ~1 GB less memory), "
        "which recovered none of the blur gap and lost more source accuracy (bench/adapt_full.py).")
    auto: bool = Field(True, description="Re-adapt automatically when drift is detected.")

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        from models.catalog import ADAPTERS

        if v != "portfolio" and v not in ADAPTERS:
            raise ValueError(f"{v!r} is not an adaptation method ('portfolio' or one of "
                             f"{', '.join(sorted(ADAPTERS))})")
        return v

    @field_validator("portfolio")
    @classmethod
    def _known_members(cls, v: list[str]) -> list[str]:
        from models.catalog import PORTFOLIO

        known = [n for n, _, _ in PORTFOLIO]
        bad = [m for m in v if m not in known]
        if bad:
            raise ValueError(f"unknown portfolio member(s) {bad}; known: {', '.join(known)}")
        if not v:
            raise ValueError("the portfolio needs at least one member")
        return v


def _evidence_only() -> list[str]:
    from models.catalog import EVIDENCE_ONLY

    return list(EVIDENCE_ONLY)


class GateTolerances(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_source_acc_drop: float = Field(0.03, ge=0, le=1)
    # Explanation-stability defaults follow models.explain.metrics.GateTolerances (measured in
    # tests/test_explain.py: a retrained model on the same cue scores ~0.4-0.95 rank correlation,
    # one that reads another image region ~0.1-0.2).
    min_explanation_rank_corr: float = Field(0.3, ge=-1, le=1)
    min_explanation_topk_overlap: float = Field(0.5, ge=0, le=1)
    min_explanation_cosine: float = Field(0.5, ge=-1, le=1)
    max_faithfulness_drop: float = Field(0.1, ge=0, le=1)
    min_effective_sample_size: float = Field(30.0, ge=1)
    min_prediction_entropy_ratio: float = Field(0.5, ge=0, le=1)
    evidence_only: list[str] = Field(
        default_factory=_evidence_only,
        description="Gates computed and shown as evidence that do not decide the verdict "
        "(names of models.catalog.GATES; default dev_risk and residual_drift, which did not "
        "predict harm in the benchmarks; [] makes every gate decide).")

    @field_validator("evidence_only")
    @classmethod
    def _known_gates(cls, v: list[str]) -> list[str]:
        from models.catalog import GATES

        unknown = [g for g in v if g not in GATES]
        if unknown:
            raise ValueError(f"unknown gate(s) {unknown}; known: {', '.join(GATES)}")
        return v


class Site(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    inbox: Path
    schedule: str = "0 * * * *"
    approvers: list[str] = Field(default_factory=list)
    policy: Literal["manual", "auto"] = "manual"
    audit: Path | None = None
    drift: DriftThresholds = Field(default_factory=DriftThresholds)
    adapt: AdaptOptions = Field(default_factory=AdaptOptions)
    gates: GateTolerances = Field(default_factory=GateTolerances)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not SITE_NAME.match(v):
            raise ValueError(
                "site names are 1-63 characters of a-z, 0-9, '-' and '_', starting with a letter or digit"
            )
        if v == "source":
            raise ValueError("'source' is reserved (emowatch-source is the training-domain model)")
        return v

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v: str) -> str:
        from datetime import datetime

        from cronsim import CronSim, CronSimError  # small, already a Prefect dependency

        if len(v.split()) != 5:
            raise ValueError(f"{v!r} is not a 5-field cron expression (minute hour day month weekday)")
        try:
            CronSim(v, datetime.now(UTC))
        except CronSimError as e:
            raise ValueError(f"{v!r} is not a valid cron expression: {e}") from None
        return v

    @field_validator("approvers")
    @classmethod
    def _emails(cls, v: list[str]) -> list[str]:
        for a in v:
            if not EMAIL.match(a):
                raise ValueError(f"{a!r} is not an e-mail address")
        return v

    @property
    def model_name(self) -> str:
        """Registered MLflow model of this site."""
        return f"emowatch-{self.name}"


class SitesFileError(ValueError):
    """An invalid sites file; the message says where and why."""


def _line_of(text: str, site: str | None, field: str | None) -> int | None:
    """Best-effort line number of ``field`` in the table of ``site`` (1-based)."""
    lines = text.splitlines()
    start = 0
    if site is not None:
        hdr = re.compile(rf"^\s*\[\s*sites\s*\.\s*\"?{re.escape(site)}\"?\s*(\.|\])")
        for i, ln in enumerate(lines):
            if hdr.match(ln):
                start = i
                if field is None:
                    return i + 1
                break
    if field is not None:
        key = re.compile(rf"^\s*\"?{re.escape(field)}\"?\s*=")
        sub = re.compile(rf"^\s*\[.*\.{re.escape(field)}\s*\]")
        for i in range(start, len(lines)):
            if key.match(lines[i]) or sub.match(lines[i]):
                return i + 1
    return start + 1 if site is not None else None


def parse_sites(text: str, *, source: str = "<sites>", base_dir: Path | None = None) -> dict[str, Site]:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SitesFileError(f"{source}: not valid TOML: {e}") from None
    unknown = set(raw) - {"sites"}
    if unknown:
        k = sorted(unknown)[0]
        ln = _line_of(text, None, k)
        raise SitesFileError(f"{source}:{ln}: unknown top-level key {k!r} (only [sites.<name>] tables)")
    sites_raw = raw.get("sites", {})
    if not isinstance(sites_raw, dict):
        raise SitesFileError(f"{source}: 'sites' must be a table of [sites.<name>] tables")
    out: dict[str, Site] = {}
    for name, body in sites_raw.items():
        if not isinstance(body, dict):
            raise SitesFileError(f"{source}:{_line_of(text, None, name)}: sites.{name} must be a table")
        try:
            site = Site(name=name, **body)
        except ValidationError as e:
            err = e.errors()[0]
            loc = [str(p) for p in err["loc"]]
            field = loc[-1] if loc and not loc[-1].isdigit() else (loc[-2] if len(loc) > 1 else None)
            ln = _line_of(text, name, field if field != "name" else None)
            where = ".".join(["sites", name, *loc]) if loc and loc != ["name"] else f"sites.{name}"
            msg = err["msg"].removeprefix("Value error, ")
            raise SitesFileError(f"{source}:{ln}: {where}: {msg}") from None
        if base_dir is not None:
            if not site.inbox.is_absolute():
                site.inbox = (base_dir / site.inbox).resolve()
            if site.audit is not None and not site.audit.is_absolute():
                site.audit = (base_dir / site.audit).resolve()
        out[name] = site
    return out


def load_sites(path: Path) -> dict[str, Site]:
    """Read and validate the sites file. Relative paths are relative to the file's folder."""
    path = Path(path)
    if not path.exists():
        raise SitesFileError(
            f"{path}: sites file not found (set EMOWATCH_SITES_FILE or run 'emowatch init')"
        )
    return parse_sites(path.read_text(encoding="utf-8"), source=str(path), base_dir=path.parent.resolve())


def get_site(sites: dict[str, Site], name: str) -> Site:
    try:
        return sites[name]
    except KeyError:
        known = ", ".join(sorted(sites)) or "none"
        raise SitesFileError(f"unknown site {name!r} (known: {known})") from None
