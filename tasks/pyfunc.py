"""Every model version as an MLflow pyfunc (``mlflow models serve`` / ``mlflow.pyfunc.load_model``).

Input: a DataFrame with one column ``image`` of *encoded image file bytes* (PNG, JPEG, ... any
size; base64 strings in a REST request); output: one float32 probability column per class. The
bytes are decoded by ``models.images.load_rgb`` and resized by the checkpoint's own
preprocessing, exactly as featurizing does, so pyfunc and pipeline predictions agree.

The class subclasses ``mlflow.pyfunc.PythonModel`` and is built on first use (mlflow takes
seconds to import); it is pickled *by reference* (``tasks.pyfunc.EmotionPyfunc``) with an empty
state: the weights are the checkpoint artifact, loaded by ``load_context``.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pandas as pd

CHECKPOINT_ARTIFACT = "checkpoint"
REFERENCE_ARTIFACT = "reference_profile"
_LOCK = threading.Lock()


def __getattr__(name: str) -> Any:
    # ``tasks.pyfunc.EmotionPyfunc`` is built on first access; unpickling a version lands here.
    if name == "EmotionPyfunc":
        return pyfunc_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def decode_cell(blob: Any) -> Any:
    """One ``image`` cell (bytes, or base64 text from REST) -> upright RGB PIL image."""
    from models.images import load_rgb

    if isinstance(blob, str):  # base64 that the REST layer did not decode
        import base64

        blob = base64.b64decode(blob)
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise ValueError(f"column 'image' must hold encoded image bytes, got {type(blob).__name__}")
    return load_rgb(bytes(blob))


def pyfunc_class() -> type:
    """:class:`EmotionPyfunc`, built once per process."""
    with _LOCK:
        built = globals().get("EmotionPyfunc")
        if built is None:
            built = _define()
            built.__qualname__ = "EmotionPyfunc"  # importable by reference for pickle
            built.__module__ = __name__
            globals()["EmotionPyfunc"] = built
        return built


def _define() -> type:
    import mlflow.pyfunc

    from models.network import load_checkpoint

    class EmotionPyfunc(mlflow.pyfunc.PythonModel):
        """Emotion classifier as an MLflow pyfunc (see the module docstring)."""

        def __init__(self) -> None:
            self.ckpt: Any = None  # nothing heavy is pickled with the class
            self.batch_size = 32

        def load_context(self, context) -> None:  # noqa: ANN001 (mlflow's PythonModelContext)
            self.ckpt = load_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT])
            self.ckpt.model.eval()

        # The pd.DataFrame hint is one MLflow infers no schema from (the signature is given
        # explicitly); without any hint MLflow warns at class creation.
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
                    arr = np.stack([prep.to_array(decode_cell(b)) for b in blobs[s:s + self.batch_size]])
                    logits = model(prep.normalize(arr))  # (B, K)
                    out[s:s + len(arr)] = torch.softmax(logits, dim=1).numpy()
            return pd.DataFrame(out, columns=list(self.ckpt.classes), index=model_input.index)

    return EmotionPyfunc


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


__all__ = ["CHECKPOINT_ARTIFACT", "REFERENCE_ARTIFACT", "decode_cell", "pip_requirements",
           "pyfunc_class", "signature"]
