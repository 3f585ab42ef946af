"""The MLflow model registry: log, register, load and move aliases of emowatch models.

One registered model per site (``emowatch-<site>``) plus the source-domain model
(``emowatch-source``). Aliases: ``champion`` (what a site serves and is monitored with) and
``challenger`` (an adapted candidate waiting for gates/approval). A site with no model of its
own is served by ``emowatch-source@champion`` until its first adaptation is promoted
(:meth:`Registry.resolve_site_model`, :meth:`Registry.copy_to_site`).

Every version is an MLflow pyfunc (``tasks.pyfunc``) whose artifacts are the emowatch checkpoint
(weights, classes, preprocessing, resolved config) and the reference profile (the training
domain's feature sample that drift tests compare against), so one version is everything needed
to featurize, test drift and serve.

A :class:`Registry` is bound to one tracking URI (``Settings.tracking_uri``): it is built once
per run (``tasks.context.RunContext``) and passed down. MLflow's *fluent* API (``start_run``,
``log_model``) keeps its URI in process globals; the methods that use it set them, under a lock,
for the duration of the call. Importing this module does nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.network import Checkpoint, load_checkpoint, save_checkpoint
from tasks import pyfunc
from tasks.ingest.storage import file_sha256
from tasks.registry import artifacts as registry_artifacts
from tasks.registry.model_cache import ModelCache
from tasks.registry.model_cache import stamps as file_stamps
from tasks.registry.records import (
    CHALLENGER,
    CHAMPION,
    DEFAULT_EXPERIMENT,
    SOURCE_MODEL,
    RegisteredVersion,
    RegistryError,
    VersionInfo,
    flatten,
    is_remote,
    not_found,
    quoted,
    safe_dirname,
    site_model_name,
    tag_value,
    version_info,
)

if TYPE_CHECKING:  # mlflow takes ~5 s to import: only the methods that need it import it
    from mlflow import MlflowClient

    from emowatch.settings import Settings
    from models.profile import ReferenceProfile

log = logging.getLogger(__name__)

_CHECKPOINT_FILE = registry_artifacts.CHECKPOINT_FILE
_REFERENCE_FILE = registry_artifacts.REFERENCE_FILE
SHA_TAGS = registry_artifacts.SHA_TAGS
_MODEL_NAME_IN_RUN = "model"  # the logged model's name inside its run
# MLflow's fluent API reads process globals: one fluent operation at a time per process.
_FLUENT_LOCK = threading.RLock()
_MODELS = ModelCache()  # Registry.load_model, per process (tasks/registry/model_cache.py)


def _drop_pickle_warning(record: logging.LogRecord) -> bool:
    # MLflow warns on every log_model that python_model is cloudpickled. Ours pickles to a
    # class reference and an empty state (the weights are the checkpoint artifact).
    return "Passing a Python object as `python_model`" not in record.getMessage()


class Registry:
    """The model registry at one tracking URI (see the module docstring)."""

    def __init__(self, tracking_uri: str, artifact_root: Path | None, cache_dir: Path,
                 engine: str = "auto") -> None:
        self.tracking_uri = tracking_uri
        self.engine = engine  # the inference engine of every checkpoint loaded (models.engine)
        # None: the tracking server decides where artifacts go (http/databricks URIs)
        self.artifact_root = None if is_remote(tracking_uri) else Path(artifact_root or ".").resolve()
        self.cache_dir = Path(cache_dir).resolve()
        self._client_obj: MlflowClient | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Registry:
        """The registry of ``settings`` (creates the SQLite store's folder and the artifact
        root: call it where work starts, not at import)."""
        reg = cls(settings.tracking_uri, settings.artifact_root, settings.cache_dir / "registry",
                  settings.inference_engine)
        uri = reg.tracking_uri
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        if reg.artifact_root is not None:
            reg.artifact_root.mkdir(parents=True, exist_ok=True)
        logging.getLogger("mlflow.pyfunc").addFilter(_drop_pickle_warning)  # idempotent
        # Artifact download progress bars would flood task logs (respects a value already set).
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        return reg

    def __getstate__(self) -> dict[str, Any]:  # picklable (Dask workers): no client inside
        return {**self.__dict__, "_client_obj": None}

    # --- plumbing -------------------------------------------------------------------------
    def client(self) -> MlflowClient:
        if self._client_obj is None:
            from mlflow import MlflowClient

            self._client_obj = MlflowClient(tracking_uri=self.tracking_uri,
                                            registry_uri=self.tracking_uri)
        return self._client_obj

    @contextlib.contextmanager
    def fluent(self) -> Iterator[Any]:
        """MLflow's fluent API pointed at this registry for the duration (``mlflow`` module)."""
        import mlflow

        with _FLUENT_LOCK:
            mlflow.set_tracking_uri(self.tracking_uri)
            mlflow.set_registry_uri(self.tracking_uri)
            yield mlflow

    def ensure_experiment(self, name: str = DEFAULT_EXPERIMENT) -> str:
        """Id of experiment ``name``, created with its artifacts under the artifact root."""
        from mlflow.exceptions import MlflowException

        client = self.client()
        exp = client.get_experiment_by_name(name)
        if exp is None:
            root = self.artifact_root
            loc = (root / safe_dirname(name)).as_uri() if root is not None else None
            try:
                return client.create_experiment(name, artifact_location=loc)
            except MlflowException:  # created concurrently by another process
                exp = client.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        if self.artifact_root is not None and not exp.artifact_location.startswith(
                self.artifact_root.as_uri()):
            log.warning("experiment %r keeps its artifacts at %s, outside %s (created elsewhere)",
                        name, exp.artifact_location, self.artifact_root)
        return exp.experiment_id

    # --- logging and registering -------------------------------------------------------------
    def log_and_register(
        self,
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
        description: str | None = None,
    ) -> RegisteredVersion:
        """Log one MLflow run (params, metrics, extra artifacts, the pyfunc model) and register it.

        ``artifacts`` maps a run-artifact folder to a file or directory (reports, plots);
        ``params`` may be nested (flattened with dots); ``tags`` go on the run and on the new
        version. ``alias`` (e.g. ``"challenger"``) is moved to the new version.
        """
        ref = Path(reference_profile_path)
        if not ref.is_file():
            raise ValueError(f"reference profile not found: {ref}")
        if not checkpoint.classes or len(checkpoint.classes) != checkpoint.net_config.num_classes:
            raise ValueError(f"checkpoint has {len(checkpoint.classes)} class names for "
                             f"{checkpoint.net_config.num_classes} outputs")
        extra = {k: Path(v) for k, v in (artifacts or {}).items()}
        for k, p in extra.items():
            if not p.exists():
                raise ValueError(f"artifact {k!r} not found: {p}")
        clean_metrics: dict[str, float] = {}
        for k, v in flatten(metrics or {}).items():
            try:
                clean_metrics[k] = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"metric {k!r} is not a number: {v!r}") from None
        flat_params = {k: tag_value(v) for k, v in flatten(params or {}).items()}
        str_tags = {k: tag_value(v) for k, v in (tags or {}).items()}

        exp_id = self.ensure_experiment(experiment)
        with tempfile.TemporaryDirectory(prefix="emowatch-reg-") as tmp, self.fluent() as mlflow:
            data = Path(tmp) / pyfunc.DATA_DIR
            data.mkdir()
            ckpt_path = data / _CHECKPOINT_FILE
            save_checkpoint(checkpoint, ckpt_path)
            ref_copy = data / _REFERENCE_FILE  # fixed name inside every version
            shutil.copyfile(ref, ref_copy)
            str_tags.update({tag: file_sha256(data / f) for f, tag in SHA_TAGS.items()})
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
                mlflow.log_text(json.dumps(checkpoint.config, indent=2, sort_keys=True,
                                           default=str), "config.json")
                with warnings.catch_warnings():
                    # We log no input example: it would be a base64 image in the MLmodel folder.
                    warnings.filterwarnings("ignore", message=".*input example was not provided")
                    info = mlflow.pyfunc.log_model(
                        name=_MODEL_NAME_IN_RUN,
                        loader_module="tasks.pyfunc",  # no pickled object in the version
                        data_path=str(data),
                        signature=pyfunc.signature(list(checkpoint.classes)),
                        pip_requirements=pyfunc.pip_requirements(),
                        metadata={
                            "emowatch_classes": list(checkpoint.classes),
                            "emowatch_net_config": checkpoint.net_config.to_dict(),
                            "emowatch_preprocessing": checkpoint.preprocessing.to_dict(),
                        },
                    )
            # Registered from the logged model (MLflow 3): the version's source is
            # models:/<model_id> and keeps the run as its lineage.
            mv = self._register(mlflow, f"models:/{info.model_id}", model_name, str_tags)
        if description:
            self.set_description(model_name, mv.version, description)
        if alias:
            self.client().set_registered_model_alias(model_name, alias, mv.version)
        return RegisteredVersion(model_name, str(mv.version), run_id,
                                 f"models:/{model_name}/{mv.version}", info.model_id)

    @staticmethod
    def _register(mlflow: Any, model_uri: str, name: str, tags: Mapping[str, str]) -> Any:
        # mlflow.register_model prints progress to stderr; keep task logs clean.
        with contextlib.redirect_stderr(io.StringIO()):
            return mlflow.register_model(model_uri, name, tags=dict(tags) or None)

    def log_run(self, experiment: str, run_name: str, tags: Mapping[str, str],
                metrics: Mapping[str, float],
                artifacts: Sequence[tuple[str | Path, str]] = ()) -> str:
        """A plain tracking run (e.g. one drift check) with ``(file, folder)`` artifacts;
        returns its id."""
        exp = self.ensure_experiment(experiment)
        with self.fluent() as mlflow, mlflow.start_run(experiment_id=exp, run_name=run_name) as run:
            mlflow.set_tags(dict(tags))
            if metrics:
                mlflow.log_metrics(dict(metrics))
            for path, folder in artifacts:
                mlflow.log_artifact(str(path), artifact_path=folder)
            return run.info.run_id

    # --- versions, tags and aliases ---------------------------------------------------------
    def get_version(self, name: str, version: str | int) -> VersionInfo:
        from mlflow.exceptions import MlflowException

        try:
            return version_info(self.client().get_model_version(name, str(version)))
        except MlflowException as e:
            if not_found(e):
                raise RegistryError(f"model {name!r} has no version {version}") from None
            raise

    def aliases(self, name: str) -> dict[str, str]:
        """alias -> version of ``name`` ({} when the model does not exist)."""
        from mlflow.exceptions import MlflowException

        try:
            return {a: str(v) for a, v in self.client().get_registered_model(name).aliases.items()}
        except MlflowException as e:
            if not_found(e):
                return {}
            raise

    def get_alias_version(self, name: str, alias: str) -> str | None:
        """Version that ``name@alias`` points at; None when the model or the alias is missing."""
        # Not get_model_version_by_alias: on the SQL store a missing alias raises
        # INVALID_PARAMETER_VALUE (a missing model RESOURCE_DOES_NOT_EXIST), so absence would
        # have to be told apart from a real error by the message.
        return self.aliases(name).get(alias)

    def set_alias(self, name: str, alias: str, version: str | int) -> None:
        """Point ``name@alias`` at ``version`` (moving it from wherever it was)."""
        self.get_version(name, version)  # a clear error for a missing version
        self.client().set_registered_model_alias(name, alias, str(version))

    def delete_alias(self, name: str, alias: str) -> bool:
        """Remove ``name@alias``; False when there was none."""
        if self.get_alias_version(name, alias) is None:
            return False
        self.client().delete_registered_model_alias(name, alias)
        return True

    def set_version_tags(self, name: str, version: str | int, tags: Mapping[str, Any]) -> None:
        """Tag a version (e.g. gate results); non-string values are stored as JSON."""
        client = self.client()
        self.get_version(name, version)
        for k, v in tags.items():
            client.set_model_version_tag(name, str(version), k, tag_value(v))

    def set_description(self, name: str, version: str | int | None, text: str) -> None:
        """The Markdown description of a version (``version`` None: of the registered model)."""
        client = self.client()
        if version is None:
            client.update_registered_model(name, description=text)
        else:
            client.update_model_version(name, str(version), description=text)

    def list_versions(self, name: str) -> list[VersionInfo]:
        """All versions of ``name``, oldest first ([] when the model does not exist)."""
        client = self.client()
        out: list[VersionInfo] = []
        token = None
        while True:
            page = client.search_model_versions(f"name = '{quoted(name)}'", page_token=token)
            out.extend(version_info(mv) for mv in page)
            token = page.token
            if not token:
                break
        by_version: dict[str, list[str]] = {}
        for a, v in self.aliases(name).items():
            by_version.setdefault(v, []).append(a)
        out = [dataclasses.replace(i, aliases=tuple(sorted(by_version.get(i.version, ()))))
               for i in out]
        return sorted(out, key=lambda i: int(i.version))

    # --- loading ------------------------------------------------------------------------------
    def _version_dir(self, name: str, version: str) -> Path:
        """Local copy of a version's data folder (:func:`registry_artifacts.version_dir`)."""
        uri = self.client().get_model_version_download_uri(name, str(version))
        with self.fluent():
            return registry_artifacts.version_dir(uri, self.cache_dir, name, version)

    def artifact_folder(self, name: str, version: str | int) -> Path:
        """The local copy of a version's files, NOT verified (for ``emowatch doctor``, which
        records the hashes of versions registered before they were recorded)."""
        return self._version_dir(name, str(version))

    def _verified(self, info: VersionInfo, filename: str) -> Path:
        return registry_artifacts.verified(
            self._version_dir(info.name, info.version) / filename, info, filename)

    def load_by_version(self, name: str, version: str | int) -> tuple[Checkpoint, VersionInfo]:
        info = self.get_version(name, version)
        return self._checkpoint(info), info

    def _checkpoint(self, info: VersionInfo) -> Checkpoint:
        ckpt = load_checkpoint(self._verified(info, _CHECKPOINT_FILE))
        ckpt.engine, ckpt.engine_cache = self.engine, self.cache_dir.parent / "onnx"
        return ckpt

    def load_checkpoint_by_alias(self, name: str, alias: str = CHAMPION
                                 ) -> tuple[Checkpoint, VersionInfo]:
        v = self.get_alias_version(name, alias)
        if v is None:
            raise RegistryError(f"model {name!r} has no alias {alias!r}")
        return self.load_by_version(name, v)

    def load_reference_profile(self, name: str, version: str | int) -> Path:
        """Local path of the version's reference profile (npz), verified."""
        return self._verified(self.get_version(name, version), _REFERENCE_FILE)

    def load_model(self, name: str, version: str | int) -> tuple[Checkpoint, ReferenceProfile]:
        """(Checkpoint, ReferenceProfile) of a version, cached per process (``ModelCache``);
        a hit is served only while the local files are unchanged (size, mtime): a changed
        file is verified again, and refused when it no longer matches."""
        from models.profile import ReferenceProfile

        info = self.get_version(name, version)
        shas = tuple(info.tags.get(t) for t in SHA_TAGS.values())
        key = (self.tracking_uri, name, str(version), *shas)
        content = (self.engine, *shas) if all(shas) else None
        folder = self._version_dir(name, str(version))
        stamps = file_stamps([folder / f for f in SHA_TAGS])  # a change during the load is
        hit = _MODELS.get(key, stamps)                        # seen at the next hit
        if hit is None and (hit := _MODELS.shared(content)) is not None:
            for f in SHA_TAGS:  # the same model under another name: its copy's bytes checked
                self._verified(info, f)
        if hit is None:
            hit = (self._checkpoint(info),  # verified against the sha256 tags
                   ReferenceProfile.from_npz(self._verified(info, _REFERENCE_FILE)))
        _MODELS.put(key, content, hit, stamps)
        return hit

    # --- sites ----------------------------------------------------------------------------------
    def copy_to_site(self, source_name: str, source_version: str | int, site_model: str,
                     tags: Mapping[str, Any] | None = None) -> RegisteredVersion:
        """Register the artifacts of ``source_name/source_version`` as a new version of a site
        model. The new version points at the same logged model (no copy of the weights); it
        carries ``emowatch.copied_from`` but *not* the source version's tags: gate results of
        one site do not hold for another."""
        src = self.get_version(source_name, source_version)
        all_tags = {"emowatch.copied_from": src.key,
                    **{t: src.tags[t] for t in SHA_TAGS.values() if t in src.tags},
                    **{k: tag_value(v) for k, v in (tags or {}).items()}}
        uri = f"models:/{src.model_id}" if src.model_id else src.model_uri
        with self.fluent() as mlflow:
            mv = self._register(mlflow, uri, site_model, all_tags)
        return RegisteredVersion(site_model, str(mv.version), mv.run_id or "",
                                 f"models:/{site_model}/{mv.version}", src.model_id)

    def resolve_site_model(self, site_name: str, alias: str = CHAMPION) -> tuple[str, str, str]:
        """(model name, version, alias) that serves a site: its own ``alias``, else the
        source's champion."""
        own = site_model_name(site_name)
        v = self.get_alias_version(own, alias)
        if v is not None:
            return own, v, alias
        v = self.get_alias_version(SOURCE_MODEL, CHAMPION)
        if v is not None:
            return SOURCE_MODEL, v, CHAMPION
        raise RegistryError(
            f"site {site_name!r} has no {own}@{alias} and there is no {SOURCE_MODEL}@{CHAMPION}: "
            "train and register the source model first")


__all__ = [
    "CHALLENGER", "CHAMPION", "SOURCE_MODEL", "RegisteredVersion", "Registry", "RegistryError",
    "VersionInfo", "site_model_name", "tag_value",
]
