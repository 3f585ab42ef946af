"""Local copies of registered versions' artifacts, checked against the hashes recorded at
registration (used by :class:`tasks.registry.client.Registry`; no MLflow client here, only the
artifact download of one URI)."""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from pathlib import Path

from tasks import pyfunc
from tasks.ingest.storage import file_sha256
from tasks.registry.records import RegistryError, VersionInfo, safe_dirname

log = logging.getLogger(__name__)

CHECKPOINT_FILE = pyfunc.CHECKPOINT_FILE
REFERENCE_FILE = pyfunc.REFERENCE_FILE
# Version tags holding the sha256 of each artifact, recorded at registration and checked by
# every load: a file changed in the artifact store afterwards is refused.
SHA_TAGS = {CHECKPOINT_FILE: "emowatch.sha256.checkpoint",
            REFERENCE_FILE: "emowatch.sha256.reference_profile"}


def version_dir(download_uri: str, cache_dir: Path, name: str, version: str) -> Path:
    """Local copy of a version's data folder (checkpoint + reference profile).

    Cached under ``cache_dir``: a version never changes once registered. The folder name
    includes a hash of where the artifacts live, so a re-created registry that reuses
    "name/1" for other weights cannot serve a stale copy. Versions of the loader-module
    flavour keep the files in ``data/artifacts``, older ones in ``artifacts``. The caller
    holds MLflow's fluent globals for ``download_uri``'s tracking server.
    """
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    uri = download_uri.rstrip("/")
    tag = hashlib.sha1(uri.encode()).hexdigest()[:12]
    dest = cache_dir / safe_dirname(name) / f"{version}-{tag}"
    if (dest / ".complete").exists():
        return dest / "artifacts"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=dest.parent))
    try:
        for where in (f"data/{pyfunc.DATA_DIR}", "artifacts"):
            try:
                got = Path(mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{uri}/{where}", dst_path=str(tmp / "dl")))
            except (MlflowException, OSError):
                continue
            if (got / CHECKPOINT_FILE).is_file():
                got.rename(tmp / "artifacts")
                break
        if not (tmp / "artifacts" / CHECKPOINT_FILE).is_file():
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


def verified(path: Path, info: VersionInfo, filename: str) -> Path:
    """``path`` (the local copy of one artifact of a version) after checking it against the
    sha256 recorded when the version was registered (versions registered before hashes were
    recorded load with a warning; the checkpoint reader never runs code either way)."""
    if not path.is_file():
        raise RegistryError(f"{info.key} has no {filename}")
    expected = info.tags.get(SHA_TAGS[filename])
    if expected is None:
        log.warning("%s records no sha256 of %s (registered before emowatch recorded "
                    "them): loading it unverified", info.key, filename)
        return path
    got = file_sha256(path)
    if got != expected:
        raise RegistryError(
            f"{info.key}: {filename} does not match the sha256 recorded when the version "
            f"was registered (expected {expected[:16]}..., found {got[:16]}...): the file was "
            "changed in the artifact store or the local cache; refusing to load it")
    return path


__all__ = ["CHECKPOINT_FILE", "REFERENCE_FILE", "SHA_TAGS", "verified", "version_dir"]
