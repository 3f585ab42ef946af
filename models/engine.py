"""Where the passes that need no gradient run: PyTorch, or the same graph in ONNX Runtime.

Measured on a 2-core AVX2 machine without native bf16 (``bench/throughput.py``): Lite0 at
224 px, 2 threads -- PyTorch fp32 NCHW batch 32 ~22 img/s, channels-last batch 4 ~41 img/s,
ONNX Runtime fp32 ~100 img/s at any batch size, with features equal to PyTorch's to ~3e-5.
So the fp32 eval passes (featurization, the frozen part's activation caches) run in ONNX
Runtime when it is installed; bf16 (CPUs with native bf16) stays on PyTorch's autocast, and
everything that needs gradients or batch statistics (training, adaptation, BN re-estimation)
stays in PyTorch.

An eval-mode module is exported once per content (a digest of its weights and buffers, so a
model whose BN statistics were re-estimated is a different graph), kept in memory, and --
when a ``cache_dir`` is given -- on disk beside a sha256 of the file, checked on every load. An
export costs ~2.3 s for Lite0: without a ``cache_dir``, below :data:`MIN_IMAGES_TO_EXPORT`
images PyTorch is used unless the graph is already exported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

ENGINES: tuple[str, ...] = ("auto", "torch", "onnx")
MIN_IMAGES_TO_EXPORT = 128
_MEMO_SIZE = 6
_MEMO: OrderedDict[str, OnnxPass] = OrderedDict()
_LOCK = threading.Lock()
_EXPORT_LOCK = threading.Lock()


def available() -> bool:
    """ONNX Runtime (and onnx, which the exporter needs) installed."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))


def resolve(engine: str, precision: str = "fp32") -> str:
    """``"auto" | "torch" | "onnx"`` -> the engine that runs: "onnx" only for fp32 ("auto":
    where ONNX Runtime is installed); bf16 always runs on PyTorch's autocast."""
    if engine not in ENGINES:
        raise ValueError(f"inference engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if precision != "fp32" or engine == "torch":
        return "torch"
    if engine == "onnx" and not available():
        raise ValueError("inference engine 'onnx' needs the packages onnxruntime and onnx")
    return "onnx" if available() else "torch"


class OnnxPass:
    """One exported eval-mode module as an ONNX Runtime session: float32 NCHW in, arrays out."""

    def __init__(self, model_bytes: bytes, threads: int | None = None) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads or torch.get_num_threads())
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def __call__(self, x: np.ndarray | torch.Tensor) -> list[np.ndarray]:
        if isinstance(x, torch.Tensor):
            x = x.detach().float().contiguous().numpy()
        return self._session.run(None, {self._input: np.ascontiguousarray(x, np.float32)})


class _Frozen(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.frozen_forward(x)


class _Full(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # EmotionNet.forward_cached without embed_cached's channels-last copy (a layout hint for
        # PyTorch that would reach the graph as transposes)
        z = self.net.bottleneck(self.net.top(self.net.frozen_forward(x)))
        return z, self.net.head(z)


_PARTS = {"frozen": (_Frozen, ["h"]), "full": (_Full, ["z", "logits"])}


def digest(module: nn.Module, tag: str) -> str:
    """sha256 of ``tag``, the library versions and every tensor of the module's state."""
    import onnxruntime

    h = hashlib.sha256(f"{tag}|torch {torch.__version__}|ort {onnxruntime.__version__}".encode())
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _export(net: nn.Module, part: str, img_size: int) -> bytes:
    import warnings

    wrapper_cls, outputs = _PARTS[part]
    was_training = net.training
    memory_format = (torch.channels_last if _is_channels_last(net) else torch.contiguous_format)
    net.to(memory_format=torch.contiguous_format)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper_cls(net).eval(), torch.zeros(1, 3, img_size, img_size), buf,
                              input_names=["x"], output_names=outputs,
                              dynamic_axes={"x": {0: "n"}}, dynamo=False)
    finally:  # the exporter leaves the wrapper's mode on the net: put the caller's back
        net.train(was_training)
        net.to(memory_format=memory_format)
    return buf.getvalue()


def _is_channels_last(net: nn.Module) -> bool:
    for p in net.parameters():
        if p.dim() == 4:
            return bool(p.is_contiguous(memory_format=torch.channels_last)
                        and not p.is_contiguous())
    return False


def _read_cached(path: Path) -> bytes | None:
    try:
        data, want = path.read_bytes(), path.with_suffix(".sha256").read_text().strip()
    except OSError:
        return None
    return data if hashlib.sha256(data).hexdigest() == want else None


def _write_cached(path: Path, data: bytes) -> None:
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    for target, payload in ((path, data),
                            (path.with_suffix(".sha256"), hashlib.sha256(data).hexdigest().encode())):
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(payload)
        os.replace(tmp, target)


def onnx_pass(net: nn.Module, part: str, img_size: int, n_images: int | None = None,
              cache_dir: str | Path | None = None) -> OnnxPass | None:
    """The ONNX Runtime session of ``net``'s ``part`` ("frozen": images -> activations h;
    "full": images -> (z, logits)), eval mode. None when it is not exported yet, there is no
    ``cache_dir`` and ``n_images`` is below :data:`MIN_IMAGES_TO_EXPORT` (then PyTorch is as
    fast as an export that no later process would reuse)."""
    if part not in _PARTS:
        raise ValueError(f"part must be one of {sorted(_PARTS)}, got {part!r}")
    module = net.frozen if part == "frozen" else net
    key = digest(module, f"{part}|{img_size}|{type(net).__name__}")
    with _LOCK:
        if key in _MEMO:
            _MEMO.move_to_end(key)
            return _MEMO[key]
    with _EXPORT_LOCK:  # one export per graph, even with several threads featurizing
        with _LOCK:
            if key in _MEMO:
                return _MEMO[key]
        path = Path(cache_dir) / f"{key}.onnx" if cache_dir is not None else None
        data = _read_cached(path) if path is not None else None
        if data is None:
            # kept on disk, an export serves every later process (each monitor check of a
            # served site is one): worth it at once; in memory only, for enough images
            if path is None and n_images is not None and n_images < MIN_IMAGES_TO_EXPORT:
                return None
            data = _export(net, part, img_size)
            if path is not None:
                try:
                    _write_cached(path, data)
                except OSError:  # a read-only cache only costs the next process an export
                    pass
        ort_pass = OnnxPass(data)
        with _LOCK:
            _MEMO[key] = ort_pass
            while len(_MEMO) > _MEMO_SIZE:
                _MEMO.popitem(last=False)
    return ort_pass


def frozen_runner(net: nn.Module, img_size: int, engine: str = "auto",
                  cache_dir: str | Path | None = None, n_images: int | None = None
                  ) -> Callable[[np.ndarray | torch.Tensor], torch.Tensor]:
    """``x -> net.frozen_forward(x)`` (eval, no gradient) in the engine ``engine`` resolves to,
    decided once for a loop over batches (the weights' digest is not recomputed per batch);
    ``n_images``: how many images the loop passes in all (for the export decision)."""
    ort_pass = (onnx_pass(net, "frozen", img_size, n_images, cache_dir)
                if resolve(engine) == "onnx" else None)

    def run(x: np.ndarray | torch.Tensor) -> torch.Tensor:
        x_t = torch.as_tensor(x).float()
        if ort_pass is not None:
            return torch.from_numpy(ort_pass(x_t)[0])
        with torch.no_grad():
            return net.frozen_forward(x_t)

    return run


def frozen_activations(net: nn.Module, x: np.ndarray | torch.Tensor, engine: str = "auto",
                       cache_dir: str | Path | None = None) -> torch.Tensor:
    """One batch through :func:`frozen_runner`."""
    return frozen_runner(net, int(x.shape[-1]), engine, cache_dir, int(x.shape[0]))(x)


def clear_memo() -> None:
    """Forget the sessions kept in memory (tests; a long-lived process that swaps models)."""
    with _LOCK:
        _MEMO.clear()


__all__: Sequence[str] = ["ENGINES", "MIN_IMAGES_TO_EXPORT", "OnnxPass", "available",
                          "clear_memo", "digest", "frozen_activations", "frozen_runner", "onnx_pass",
                          "resolve"]
