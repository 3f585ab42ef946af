"""The MLflow model registry: log, register, load and move aliases of emowatch models.

One registered model per site (``emowatch-<site>``) plus the source-domain model
(``emowatch-source``). Aliases: ``champion`` (what a site serves and is monitored with) and
``challenger`` (an adapted candidate waiting for gates/approval). A site with no model of its
own is served by ``emowatch-source@champion`` until its first adaptation is promoted
(:func:`resolve_site_model`, :func:`copy_to_site`).

Every version is an MLflow pyfunc (:class:`EmotionPyfunc`) whose artifacts are the emowatch
checkpoint (weights, classes, preprocessing, resolved config) and the reference profile (the
training domain's feature sample that drift tests compare against), so one version is
everything needed to featurize, test drift and serve.

Call :func:`configure` once per process before anything else (the flows and CLI do; the other
functions configure from :func:`emowatch.settings.get_settings` if nobody did). MLflow keeps
its URIs in globals *and* in the ``MLFLOW_TRACKING_URI``/``MLFLOW_REGISTRY_URI`` environment
variables (``mlflow.set_tracking_uri`` exports them for subprocesses), so configuring is a
process-wide act; importing this module does nothing.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from models.network import Checkpoint, load_checkpoint, save_checkpoint

if TYPE_CHECKING:  # mlflow takes ~5 s to import: only the functions that need it import it
    from mlflow import MlflowClient

    from emowatch.settings import Settings

log = logging.getLogger(__name__)

SOURCE_MODEL = "emowatch-source"
CHAMPION = "champion"
CHALLENGER = "challenger"
DEFAULT_EXPERIMENT = "emowatch"

# Names of the files inside every model version's ``artifacts/`` folder.
CHECKPOINT_ARTIFACT = "checkpoint"
REFERENCE_ARTIFACT = "reference_profile"
_CHECKPOINT_FILE = "checkpoint.pt"
_REFERENCE_FILE = "reference_profile.npz"
_MODEL_NAME_IN_RUN = "model"  # the logged model's name inside its run
_LOGGED_MODEL_URI = re.compile(r"^models:/(m-[0-9a-f]+)$")  # MLflow 3 logged-model ids


class RegistryError(RuntimeError):
    """The registry does not hold what was asked for (missing model, version or alias)."""


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    run_id: str
    model_uri: str  # "models:/<name>/<version>"
    model_id: str | None = None  # MLflow 3 logged-model id ("m-...")


@dataclass(frozen=True)
class VersionInfo:
    """A model version as plain values (no MLflow entity leaks out of this module)."""

    name: str
    version: str
    run_id: str | None
    model_id: str | None
    source: str
    aliases: tuple[str, ...]
    tags: dict[str, str] = field(default_factory=dict)
    created_ms: int = 0

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def key(self) -> str:
        """``<name>/<version>``: the ``model_key`` of the featurize cache."""
        return f"{self.name}/{self.version}"


# --- configuration ----------------------------------------------------------------------------
@dataclass
class _State:
    tracking_uri: str
    artifact_root: Path | None  # None: the tracking server decides (http/databricks URIs)
    cache_dir: Path


_state: _State | None = None
_lock = threading.Lock()


def _is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


def configure(settings: Settings) -> None:
    """Point MLflow's tracking and registry at ``settings.tracking_uri``.

    Artifacts of experiments this module creates go to ``settings.artifact_root`` (not
    ``./mlruns`` under whatever the working directory is) unless the URI is a tracking server,
    which then owns artifact storage.
    """
    import mlflow

    global _state
    uri = settings.tracking_uri
    root = None if _is_remote(uri) else Path(settings.artifact_root).resolve()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
    logging.getLogger("mlflow.pyfunc").addFilter(_drop_pickle_warning)  # idempotent
    # Artifact download progress bars would flood task logs (respects a value already set).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with _lock:
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        _state = _State(uri, root, Path(settings.cache_dir).resolve() / "registry")


def _drop_pickle_warning(record: logging.LogRecord) -> bool:
    # MLflow warns on every log_model that python_model is cloudpickled. Ours pickles to a
    # class reference and an empty state (the weights are the checkpoint artifact).
    return "Passing a Python object as `python_model`" not in record.getMessage()


def _ensure_configured() -> _State:
    if _state is None:
        from emowatch.settings import get_settings

        configure(get_settings())
    assert _state is not None
    return _state


def _client() -> MlflowClient:
    from mlflow import MlflowClient

    st = _ensure_configured()
    return MlflowClient(tracking_uri=st.tracking_uri, registry_uri=st.tracking_uri)


def ensure_experiment(name: str = DEFAULT_EXPERIMENT) -> str:
    """Id of experiment ``name``, created with its artifacts under the artifact root."""
    from mlflow.exceptions import MlflowException

    st = _ensure_configured()
    client = _client()
    exp = client.get_experiment_by_name(name)
    if exp is None:
        loc = (st.artifact_root / _safe_dirname(name)).as_uri() if st.artifact_root else None
        try:
            return client.create_experiment(name, artifact_location=loc)
        except MlflowException:  # created concurrently by another process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    if st.artifact_root is not None and not exp.artifact_location.startswith(
        st.artifact_root.as_uri()
    ):
        log.warning("experiment %r keeps its artifacts at %s, outside %s (created elsewhere)",
                    name, exp.artifact_location, st.artifact_root)
    return exp.experiment_id


def _safe_dirname(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "experiment"


# --- the pyfunc -------------------------------------------------------------------------------
def __getattr__(name: str) -> Any:
    # ``tasks.registry.EmotionPyfunc`` is built on first access (it subclasses mlflow's
    # PythonModel, and mlflow is imported lazily); unpickling a model version lands here.
    if name == "EmotionPyfunc":
        return _pyfunc_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _decode(blob: Any) -> Any:
    """Encoded image bytes (PNG/JPEG/...) -> upright RGB PIL image, as ``models.data.load_rgb``."""
    from PIL import Image, ImageOps

    if isinstance(blob, str):  # base64 that the REST layer did not decode
        import base64

        blob = base64.b64decode(blob)
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise ValueError(f"column 'image' must hold encoded image bytes, got {type(blob).__name__}")
    with Image.open(io.BytesIO(bytes(blob))) as im:
        return ImageOps.exif_transpose(im).convert("RGB")


def _pyfunc_class() -> type:
    """Build :class:`EmotionPyfunc` on ``mlflow.pyfunc.PythonModel`` (imported on first use).

    The class is pickled *by reference* into every model version, so loading a version needs
    this module importable (emowatch installed), which is true wherever emowatch runs.
    """
    with _lock:
        built = globals().get("EmotionPyfunc")
        return built if built is not None else _build_pyfunc_class()


def _build_pyfunc_class() -> type:
    cls = _define_pyfunc_class()
    cls.__qualname__ = "EmotionPyfunc"  # importable by reference for pickle
    globals()["EmotionPyfunc"] = cls
    return cls


def _define_pyfunc_class() -> type:
    import mlflow.pyfunc

    class EmotionPyfunc(mlflow.pyfunc.PythonModel):
        """Emotion classifier as an MLflow pyfunc.

        Input: a DataFrame with one column ``image`` of *encoded image file bytes* (PNG, JPEG,
        ... any size; base64 strings in a REST request). Bytes rather than pixel arrays because
        sites deliver files of mixed sizes, because bytes travel through REST serving, and
        because decoding here (EXIF-upright RGB, then the checkpoint's own resize) is exactly
        what featurizing does, so pyfunc and pipeline predictions agree.
        Output: a DataFrame of class probabilities, one float32 column per class name.
        """

        def __init__(self) -> None:
            self.ckpt: Checkpoint | None = None  # nothing heavy is pickled with the class
            self.batch_size = 32

        def load_context(self, context) -> None:  # noqa: ANN001 (mlflow's PythonModelContext)
            self.ckpt = load_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT])
            self.ckpt.model.eval()

        # The pd.DataFrame hint is one MLflow infers no schema from (the signature is given
        # explicitly); without any hint MLflow warns at class creation. It is resolved from
        # this module's globals, hence the module-level pandas import.
        def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:  # noqa: ANN001
            import torch

            if self.ckpt is None:
                raise RuntimeError("EmotionPyfunc used before load_context()")
            if not isinstance(model_input, pd.DataFrame) or "image" not in model_input.columns:
                raise ValueError("input must be a DataFrame with a column 'image' of image bytes")
            prep, model = self.ckpt.preprocessing, self.ckpt.model
            blobs = list(model_input["image"])
            out = np.empty((len(blobs), len(self.ckpt.classes)), dtype=np.float32)  # (N, K)
            with torch.no_grad():
                for s in range(0, len(blobs), self.batch_size):
                    arr = np.stack([prep.to_array(_decode(b)) for b in blobs[s:s + self.batch_size]])
                    logits = model(prep.normalize(arr))  # (B, K)
                    out[s:s + len(arr)] = torch.softmax(logits, dim=1).numpy()
            return pd.DataFrame(out, columns=list(self.ckpt.classes), index=model_input.index)

    return EmotionPyfunc


def _signature(classes: list[str]) -> Any:
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([ColSpec("float", c) for c in classes]),
    )


def _pip_requirements() -> list[str]:
    # Given explicitly: letting MLflow infer them loads the model in a subprocess (~10 s).
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("mlflow", "torch", "numpy", "pandas", "pillow", "efficientnet-lite-pytorch"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


# --- logging and registering -----------------------------------------------------------------
def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _tag_value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)


def log_and_register(
    checkpoint: Checkpoint,
    *,
    model_name: str,
    reference_profile_path: str | Path,
    metrics: Mapping[str, float] | None = None,
    params: Mapping[str, Any] | None = None,
    artifacts: Mapping[str, str | Path] | None = None,
    tags: Mapping[str, Any] | None = None,
    alias: str | None = None,
    run_name: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
) -> RegisteredVersion:
    """Log one MLflow run (params, metrics, extra artifacts, the pyfunc model) and register it.

    ``artifacts`` maps a run-artifact folder to a file or directory (reports, plots);
    ``params`` may be nested (flattened with dots); ``tags`` go on the run and on the new
    version. ``alias`` (e.g. ``"challenger"``) is moved to the new version.
    """
    import mlflow

    ref = Path(reference_profile_path)
    if not ref.is_file():
        raise ValueError(f"reference profile not found: {ref}")
    if not checkpoint.classes or len(checkpoint.classes) != checkpoint.net_config.num_classes:
        raise ValueError(
            f"checkpoint has {len(checkpoint.classes)} class names for "
            f"{checkpoint.net_config.num_classes} outputs"
        )
    extra = {k: Path(v) for k, v in (artifacts or {}).items()}
    for k, p in extra.items():
        if not p.exists():
            raise ValueError(f"artifact {k!r} not found: {p}")
    clean_metrics: dict[str, float] = {}
    for k, v in _flatten(metrics or {}).items():
        try:
            clean_metrics[k] = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"metric {k!r} is not a number: {v!r}") from None
    flat_params = {k: _tag_value(v) for k, v in _flatten(params or {}).items()}
    str_tags = {k: _tag_value(v) for k, v in (tags or {}).items()}

    exp_id = ensure_experiment(experiment)
    client = _client()
    cls = _pyfunc_class()
    with tempfile.TemporaryDirectory(prefix="emowatch-reg-") as tmp:
        ckpt_path = Path(tmp) / _CHECKPOINT_FILE
        save_checkpoint(checkpoint, ckpt_path)
        ref_copy = Path(tmp) / _REFERENCE_FILE  # fixed name inside every version
        shutil.copyfile(ref, ref_copy)
        nested = mlflow.active_run() is not None  # inside a caller's run: a child run
        with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=str_tags,
                              nested=nested) as run:
            run_id = run.info.run_id
            if flat_params:
                mlflow.log_params(flat_params)
            if clean_metrics:  # NaN/inf are stored as such (a gate that could not be computed)
                mlflow.log_metrics(clean_metrics)
            for folder, p in extra.items():
                if p.is_dir():
                    mlflow.log_artifacts(str(p), artifact_path=folder)
                else:
                    mlflow.log_artifact(str(p), artifact_path=folder)
            mlflow.log_text(json.dumps(checkpoint.config, indent=2, sort_keys=True, default=str),
                            "config.json")
            with warnings.catch_warnings():
                # We log no input example: it would be a base64 image in the MLmodel folder.
                warnings.filterwarnings("ignore", message=".*input example was not provided")
                info = _log_pyfunc(mlflow, cls, checkpoint, ckpt_path, ref_copy)
    # Registered from the logged model (MLflow 3): the version's source is models:/<model_id>
    # and keeps the run as its lineage.
    mv = _register(f"models:/{info.model_id}", model_name, str_tags)
    if alias:
        client.set_registered_model_alias(model_name, alias, mv.version)
    return RegisteredVersion(model_name, str(mv.version), run_id,
                             f"models:/{model_name}/{mv.version}", info.model_id)


def _log_pyfunc(mlflow: Any, cls: type, checkpoint: Checkpoint, ckpt_path: Path,
                ref_path: Path) -> Any:
    return mlflow.pyfunc.log_model(
        name=_MODEL_NAME_IN_RUN,
        python_model=cls(),
        artifacts={CHECKPOINT_ARTIFACT: str(ckpt_path), REFERENCE_ARTIFACT: str(ref_path)},
        signature=_signature(list(checkpoint.classes)),
        pip_requirements=_pip_requirements(),
        metadata={
            "emowatch_classes": list(checkpoint.classes),
            "emowatch_net_config": checkpoint.net_config.to_dict(),
            "emowatch_preprocessing": checkpoint.preprocessing.to_dict(),
        },
    )


def _register(model_uri: str, name: str, tags: Mapping[str, str]) -> Any:
    import contextlib

    import mlflow

    _ensure_configured()
    # mlflow.register_model prints progress to stderr; keep task logs clean.
    with contextlib.redirect_stderr(io.StringIO()):
        return mlflow.register_model(model_uri, name, tags=dict(tags) or None)


# --- versions, tags and aliases ---------------------------------------------------------------
def _not_found(e: Exception) -> bool:
    return getattr(e, "error_code", "") in {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"}


def _model_id(mv: Any) -> str | None:
    # The SQL registry store has no model_id column: a version registered from a logged model
    # comes back with model_id=None and source "models:/<model_id>".
    if getattr(mv, "model_id", None):
        return mv.model_id
    m = _LOGGED_MODEL_URI.match(mv.source or "")
    return m.group(1) if m else None


def _info(mv: Any) -> VersionInfo:
    return VersionInfo(
        name=mv.name,
        version=str(mv.version),
        run_id=mv.run_id or None,
        model_id=_model_id(mv),
        source=mv.source or "",
        aliases=tuple(mv.aliases or ()),
        tags=dict(mv.tags or {}),
        created_ms=int(mv.creation_timestamp or 0),
    )


def get_version(name: str, version: str | int) -> VersionInfo:
    from mlflow.exceptions import MlflowException

    try:
        return _info(_client().get_model_version(name, str(version)))
    except MlflowException as e:
        if _not_found(e):
            raise RegistryError(f"model {name!r} has no version {version}") from None
        raise


def _aliases(name: str) -> dict[str, str]:
    """alias -> version of ``name`` ({} when the model does not exist)."""
    from mlflow.exceptions import MlflowException

    try:
        return {a: str(v) for a, v in _client().get_registered_model(name).aliases.items()}
    except MlflowException as e:
        if _not_found(e):
            return {}
        raise


def get_alias_version(name: str, alias: str) -> str | None:
    """Version that ``name@alias`` points at; None when the model or the alias does not exist."""
    # Not get_model_version_by_alias: on the SQL store a missing alias raises
    # INVALID_PARAMETER_VALUE (a missing model RESOURCE_DOES_NOT_EXIST), so absence would have
    # to be told apart from a real error by the message.
    return _aliases(name).get(alias)


def set_alias(name: str, alias: str, version: str | int) -> None:
    """Point ``name@alias`` at ``version`` (moving it from wherever it was)."""
    get_version(name, version)  # a clear error for a missing version
    _client().set_registered_model_alias(name, alias, str(version))


def delete_alias(name: str, alias: str) -> bool:
    """Remove ``name@alias``; False when there was none."""
    if get_alias_version(name, alias) is None:
        return False
    _client().delete_registered_model_alias(name, alias)
    return True


def set_version_tags(name: str, version: str | int, tags: Mapping[str, Any]) -> None:
    """Tag a version (e.g. gate results); non-string values are stored as JSON."""
    client = _client()
    get_version(name, version)
    for k, v in tags.items():
        client.set_model_version_tag(name, str(version), k, _tag_value(v))


def list_versions(name: str) -> list[VersionInfo]:
    """All versions of ``name``, oldest first ([] when the model does not exist)."""
    client = _client()
    out: list[VersionInfo] = []
    token = None
    while True:
        page = client.search_model_versions(f"name = '{_quote(name)}'", page_token=token)
        out.extend(_info(mv) for mv in page)
        token = page.token
        if not token:
            break
    by_version: dict[str, list[str]] = {}
    for a, v in _aliases(name).items():
        by_version.setdefault(v, []).append(a)
    out = [dataclasses.replace(i, aliases=tuple(sorted(by_version.get(i.version, ()))))
           for i in out]
    return sorted(out, key=lambda i: int(i.version))


def _quote(name: str) -> str:
    if "'" in name:
        raise ValueError(f"model names cannot contain quotes: {name!r}")
    return name


# --- loading ------------------------------------------------------------------------------------
def _version_dir(name: str, version: str) -> Path:
    """Local copy of a version's ``artifacts/`` folder.

    Cached under ``<cache_dir>/registry``: a version never changes once registered. The folder
    name includes a hash of where the artifacts live, so a re-created registry that reuses
    "name/1" for other weights cannot serve a stale copy.
    """
    import hashlib

    import mlflow.artifacts

    st = _ensure_configured()
    uri = _client().get_model_version_download_uri(name, str(version)).rstrip("/")
    tag = hashlib.sha1(uri.encode()).hexdigest()[:12]
    dest = st.cache_dir / _safe_dirname(name) / f"{version}-{tag}"
    if (dest / ".complete").exists():
        return dest / "artifacts"
    tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=_mkdir(dest.parent)))
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/artifacts", dst_path=str(tmp))
        if not (tmp / "artifacts" / _CHECKPOINT_FILE).is_file():
            raise RegistryError(f"{name}/{version} is not an emowatch model (no checkpoint)")
        (tmp / ".complete").touch()
        try:
            tmp.rename(dest)  # atomic: dest exists only complete
        except OSError:
            if not (dest / ".complete").exists():  # not a concurrent download that won
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest / "artifacts"


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def load_by_version(name: str, version: str | int) -> tuple[Checkpoint, VersionInfo]:
    info = get_version(name, version)
    ckpt = load_checkpoint(_version_dir(name, info.version) / _CHECKPOINT_FILE)
    return ckpt, info


def load_checkpoint_by_alias(name: str, alias: str = CHAMPION) -> tuple[Checkpoint, VersionInfo]:
    v = get_alias_version(name, alias)
    if v is None:
        raise RegistryError(f"model {name!r} has no alias {alias!r}")
    return load_by_version(name, v)


def load_reference_profile(name: str, version: str | int) -> Path:
    """Local path of the version's reference profile (npz)."""
    p = _version_dir(name, get_version(name, version).version) / _REFERENCE_FILE
    if not p.is_file():
        raise RegistryError(f"{name}/{version} has no reference profile")
    return p


# --- sites ----------------------------------------------------------------------------------------
def site_model_name(site_name: str) -> str:
    """The registered model of a site (same as ``emowatch.sites.Site.model_name``)."""
    name = f"emowatch-{site_name}"
    if name == SOURCE_MODEL:
        raise ValueError("'source' cannot be a site name: emowatch-source is the source model")
    return name


def copy_to_site(source_name: str, source_version: str | int, site_model_name: str,
                 tags: Mapping[str, Any] | None = None) -> RegisteredVersion:
    """Register the artifacts of ``source_name/source_version`` as a new version of a site model.

    The new version points at the same logged model (no copy of the weights); it carries
    ``emowatch.copied_from`` but *not* the source version's tags: gate results of one site do
    not hold for another.
    """
    src = get_version(source_name, source_version)
    all_tags = {"emowatch.copied_from": src.key, **{k: _tag_value(v) for k, v in (tags or {}).items()}}
    if src.model_id:
        mv = _register(f"models:/{src.model_id}", site_model_name, all_tags)
    else:  # a version registered from a path or run: fall back to its own registry URI
        mv = _register(src.model_uri, site_model_name, all_tags)
    return RegisteredVersion(site_model_name, str(mv.version), mv.run_id or "",
                             f"models:/{site_model_name}/{mv.version}", src.model_id)


def resolve_site_model(site_name: str, alias: str = CHAMPION) -> tuple[str, str, str]:
    """(model name, version, alias) that serves a site: its own ``alias``, else the source's."""
    own = site_model_name(site_name)
    v = get_alias_version(own, alias)
    if v is not None:
        return own, v, alias
    v = get_alias_version(SOURCE_MODEL, CHAMPION)
    if v is not None:
        return SOURCE_MODEL, v, CHAMPION
    raise RegistryError(
        f"site {site_name!r} has no {own}@{alias} and there is no {SOURCE_MODEL}@{CHAMPION}: "
        "train and register the source model first"
    )


__all__ = [
    "SOURCE_MODEL", "CHAMPION", "CHALLENGER", "RegistryError", "RegisteredVersion", "VersionInfo",
    "configure", "ensure_experiment", "log_and_register", "get_version", "get_alias_version",
    "set_alias", "delete_alias", "set_version_tags", "list_versions", "load_by_version",
    "load_checkpoint_by_alias", "load_reference_profile", "site_model_name", "copy_to_site",
    "resolve_site_model",
]
