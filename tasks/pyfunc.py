"""Every model version as an MLflow pyfunc (``mlflow models serve`` / ``mlflow.pyfunc.load_model``).

Input: a DataFrame with one column ``image`` of *encoded image file bytes* (PNG, JPEG, ... any
size; base64 strings in a REST request); output: one float32 probability column per class. The
bytes are decoded by ``models.images.load_rgb`` and resized by the checkpoint's own
preprocessing, exactly as featurizing does, so pyfunc and pipeline predictions agree.

The flavour is a *loader module* (``loader_module: tasks.pyfunc`` in the MLmodel file): MLflow
imports this installed module and calls :func:`_load_pyfunc` on the version's data folder. No
Python object is pickled into the version, so replacing a file in the artifact store cannot
make a loader run code: the checkpoint is read with ``torch.load(weights_only=True)``.
(Versions registered before this held a pickled ``EmotionPyfunc``; MLflow unpickles those, as
it does any pickled model: ``tasks.registry`` still resolves that class for them.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

CHECKPOINT_FILE = "checkpoint.pt"
REFERENCE_FILE = "reference_profile.npz"
DATA_DIR = "artifacts"  # the data folder's name inside the version (``data/artifacts``)


def decode_cell(blob: Any) -> Any:
    """One ``image`` cell (bytes, or base64 text from REST) -> upright RGB PIL image."""
    from models.images import load_rgb

    if isinstance(blob, str):  # base64 that the REST layer did not decode
        import base64

        blob = base64.b64decode(blob)
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise ValueError(f"column 'image' must hold encoded image bytes, got {type(blob).__name__}")
    return load_rgb(bytes(blob))


class EmotionPredictor:
    """The pyfunc model MLflow hands out: ``predict(DataFrame[image]) -> DataFrame[class]``."""

    def __init__(self, ckpt: Any, batch_size: int = 32) -> None:
        self.ckpt = ckpt
        self.batch_size = batch_size
        ckpt.model.eval()

    def predict(self, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        import torch

        if not isinstance(model_input, pd.DataFrame) or "image" not in model_input.columns:
            raise ValueError("input must be a DataFrame with a column 'image' of image bytes")
        prep, model = self.ckpt.preprocessing, self.ckpt.model
        blobs = list(model_input["image"])
        out = np.empty((len(blobs), len(self.ckpt.classes)), dtype=np.float32)  # (N, K)
        with torch.no_grad():
            for s in range(0, len(blobs), self.batch_size):
                arr = np.stack([prep.to_array(decode_cell(b)) for b in blobs[s:s + self.batch_size]])
                logits = model(prep.normalize(arr))  # (B, K)
                out[s:s + len(arr)] = torch.softmax(logits, dim=1).numpy()
        return pd.DataFrame(out, columns=list(self.ckpt.classes), index=model_input.index)


def _load_pyfunc(data_path: str) -> EmotionPredictor:  # the name MLflow's loader_module calls
    from models.network import load_checkpoint

    return EmotionPredictor(load_checkpoint(Path(data_path) / CHECKPOINT_FILE))


def signature(classes: list[str]) -> Any:
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([ColSpec("float", c) for c in classes]),
    )


def pip_requirements() -> list[str]:
    # Given explicitly: letting MLflow infer them loads the model in a subprocess (~10 s).
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("mlflow", "torch", "numpy", "pandas", "pillow", "efficientnet-lite-pytorch"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def legacy_pyfunc_class() -> type:
    """The pickled class of versions registered before the loader module (MLflow unpickles
    ``tasks.registry.EmotionPyfunc`` / ``tasks.pyfunc.EmotionPyfunc`` for them)."""
    import mlflow.pyfunc

    from models.network import load_checkpoint

    class EmotionPyfunc(mlflow.pyfunc.PythonModel):
        def __init__(self) -> None:
            self.predictor: EmotionPredictor | None = None

        def load_context(self, context) -> None:  # noqa: ANN001
            self.predictor = EmotionPredictor(load_checkpoint(context.artifacts["checkpoint"]))

        def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:  # noqa: ANN001
            if self.predictor is None:
                raise RuntimeError("EmotionPyfunc used before load_context()")
            return self.predictor.predict(model_input, params)

    EmotionPyfunc.__qualname__ = "EmotionPyfunc"
    return EmotionPyfunc


def __getattr__(name: str) -> Any:
    if name == "EmotionPyfunc":
        return legacy_pyfunc_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CHECKPOINT_FILE", "DATA_DIR", "REFERENCE_FILE", "EmotionPredictor", "decode_cell",
           "legacy_pyfunc_class", "pip_requirements", "signature"]
