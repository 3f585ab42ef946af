"""The one Settings object of emowatch.

Every value can be set by an environment variable with the prefix ``EMOWATCH_``
(e.g. ``EMOWATCH_DATABASE_URL``) or in a ``.env`` file. The environment is read once, where a
process starts work (the CLI, ``serve``, a deployment's flow run): ``Settings()`` there, and the
object is passed down from then on (``tasks.context.RunContext``); nothing deeper reads the
environment. Nothing here touches the disk, the network or a database at import time: paths are
*computed*, and created only by ``Settings.ensure_dirs()``.

Serialised to JSON (Prefect stores flow-run parameters; ``emowatch status``) the URLs come out
with their passwords hidden and the SMTP password as ``**********``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_serializer
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="EMOWATCH_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # --- where state lives ------------------------------------------------------------
    home: Path = Field(Path(".emowatch"), description="Root of all runtime state.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of our database; default: SQLite file under home."
    )
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking/registry URI; default: SQLite store under home."
    )
    sites_file: Path = Field(Path("sites.toml"), description="The sites configuration file.")
    data_dir: Path | None = Field(
        None, description="Folder with the real data sets (ckplus48/, emotion6/), if any."
    )
    require_data: bool = Field(
        False, description="Fail (do not fall back to generated data) when data_dir is missing."
    )

    # --- ingestion limits ----------------------------------------------------------------
    max_file_bytes: int = Field(50 * 2**20, ge=1, description="Larger files are too-large.")
    # Pillow's own bomb limit is ~89 Mpx; 40 Mpx is above any camera a site would use
    # (a 7000x5000 photo is 35 Mpx) and keeps one decode under ~160 MB of RAM.
    max_image_pixels: int = Field(40_000_000, ge=1, description="Width*height above: too-large.")
    min_image_side: int = Field(16, ge=1, description="Either side below: too-small.")

    # --- e-mail ---------------------------------------------------------------------------
    smtp_host: str | None = Field(None, description="SMTP server; unset: keep .eml files only.")
    smtp_port: int = 25
    smtp_security: Literal["none", "starttls", "ssl"] = "none"
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_timeout_s: float = Field(10.0, gt=0)
    smtp_allow_plaintext_auth: bool = Field(
        False, description="Send the SMTP password over a connection without STARTTLS/SSL "
        "(refused by default: anyone on the path would read it).")
    mail_from: str = "emowatch@localhost"
    alert_retry_hours: float = Field(
        48.0, gt=0, description="An alert that could not be delivered is retried, with backoff, "
        "for this long before it is marked failed (emowatch outbox --requeue revives it).")
    alert_cooldown_minutes: int = Field(
        60, ge=0, description="At most one drift alert per site per this many minutes."
    )

    # --- promotions -------------------------------------------------------------------------
    allow_any_approver: bool = Field(
        False, description="Accept any --by name; by default it must be one of the site's "
        "approvers when the site lists any.")

    # --- compute ----------------------------------------------------------------------------
    task_runner: Literal["thread", "dask"] = "thread"
    dask_address: str | None = Field(
        None, description="Scheduler address for the dask task runner; unset: local cluster."
    )
    featurize_batch: int = Field(64, ge=1, le=4096)
    evidently_reports: Literal["always", "drift", "never"] = Field(
        "drift", description="When a check also writes the Evidently report (HTML, JSON, "
        "workspace snapshot): every check, only checks that found drift (default), or never. "
        "Costs ~10 s of a check on 2 cores (bench/scale.py).")
    check_worker: Literal["warm", "deployments"] = Field(
        "warm", description="`emowatch serve`: who runs the scheduled monitor checks: 'warm' "
        "(one long-lived worker process checks every due site, deployments.worker; the "
        "monitor-<site> deployments stay for 'check now') or 'deployments' (each check a "
        "scheduled deployment run, a new process each).")
    worker_max_checks: int | None = Field(
        1000, ge=1, description="`emowatch serve`'s warm check worker starts afresh after this "
        "many checks (None: never).")
    worker_max_rss_gib: float | None = Field(
        2.5, gt=0, description="... or when its resident memory passes this many GiB.")
    serve_limit: int = Field(
        2, ge=1, le=1000, description="`emowatch serve`: most flow runs at once (each a "
        "process; on 2 cores more only contend: bench/scale.py).")
    inference_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Arithmetic of a NEW model version's inference, stored with it "
        "(every later inference of that version uses the same): auto = bf16 where the CPU has "
        "it natively (AVX512-BF16/AMX: ~3x faster), else fp32.")
    inference_engine: Literal["auto", "torch", "onnx"] = Field(
        "auto", description="Where fp32 eval passes run (featurization, activation caches): "
        "auto = ONNX Runtime when installed (same numbers to ~1e-5, ~2.4x faster on 2 AVX2 "
        "cores), torch = PyTorch. bf16 versions always run on PyTorch.")

    @field_serializer("database_url", "mlflow_tracking_uri", when_used="json")
    def _hide_passwords(self, url: str | None) -> str | None:
        from emowatch.redact import redact_url

        return redact_url(url)

    def register_secrets(self) -> None:
        """Tell the redaction helper which values must never be printed, and redact this
        process's log lines from now on."""
        import os

        from emowatch.redact import install_log_redaction, register_secret, register_url_password

        if self.smtp_password is not None:
            register_secret(self.smtp_password.get_secret_value())
        register_url_password(self.database_url)
        register_url_password(self.mlflow_tracking_uri)
        for var in ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
            register_secret(os.environ.get(var))
        install_log_redaction()

    # --- derived locations (no I/O) ---------------------------------------------------------
    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'emowatch.db').resolve()}"

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{(self.home / 'mlflow.db').resolve()}"

    @property
    def artifact_root(self) -> Path:
        return (self.home / "mlartifacts").resolve()

    @property
    def store_dir(self) -> Path:
        """Content-addressed copies of ingested images (``ab/cdef...``)."""
        return self.home / "store"

    @property
    def reports_dir(self) -> Path:
        return self.home / "reports"

    @property
    def outbox_dir(self) -> Path:
        return self.home / "outbox"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def evidently_workspace(self) -> Path:
        return self.home / "evidently"

    def ensure_dirs(self) -> None:
        for p in (self.home, self.store_dir, self.reports_dir, self.outbox_dir, self.cache_dir):
            p.mkdir(parents=True, exist_ok=True)
