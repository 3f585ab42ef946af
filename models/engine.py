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
from typing import Any

import numpy as np
import torch
from torch import nn

ENGINES: tuple[str, ...] = ("auto", "torch", "onnx")
MIN_IMAGES_TO_EXPORT = 128
# PyTorch's eval passes run channels-last (weights and input) in small batches. Measured on a
# 2-core AVX2 machine (session 16, Lite0's frozen part, 224 px, fp32, 3 repeats): batch 4
# 3.5-4.6 s per 240 images, batch 2 4.4-5.4, batch 1 5.7-6.1, batch 8 6.5-7.1, batch 16
# 8.0-8.6, against 17-20 s NCHW in batches of 32; bf16 keeps the batch of 8 it was timed at.
TORCH_BATCH = {"fp32": 4, "bf16": 8}
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


def _lay_out(module: nn.Module, memory_format: torch.memory_format) -> None:
    """The module's weights in ``memory_format``, as ordinary tensors even when called under
    ``torch.inference_mode`` (inference-mode weights could not be trained or differentiated
    through afterwards)."""
    with torch.inference_mode(False), torch.no_grad():
        module.to(memory_format=memory_format)


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
            return channels_last_pass(getattr(net, "frozen", net), net.frozen_forward, x_t,
                                      TORCH_BATCH["fp32"])

    return run


def logits_runner(model: nn.Module | Callable[..., Any], precision: str = "fp32",
                  batch: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> logits`` of an eval pass of many batches (explanations' masked images): an
    EmotionNet in fp32 runs in ONNX Runtime where installed (exported once per content; measured
    on 2 AVX2 cores, Lite0 at 224 px: 100 img/s in batches of 4 against PyTorch's 34
    channels-last and 12 NCHW in batches of 32; export 2.5 s), anything else channels-last in
    PyTorch in batches of ``batch`` (None: :data:`TORCH_BATCH`). Call it under the caller's
    autocast for bf16; the model's weights must not change while the runner is used."""
    b = batch or TORCH_BATCH.get(precision, 4)
    ort_pass = None
    if (precision == "fp32" and hasattr(model, "frozen_forward") and hasattr(model, "head")
            and resolve("auto") == "onnx"):
        size = int(model.config.img_size)
        ort_pass = onnx_pass(model, "full", size)

    def run(x: torch.Tensor) -> torch.Tensor:
        if ort_pass is None or tuple(x.shape[-2:]) != (size, size):  # exported at one size
            return channels_last_pass(model, model, x, b)
        out = [torch.from_numpy(ort_pass(x[s:s + b])[1]) for s in range(0, x.shape[0], b)]
        return torch.cat(out) if out else torch.zeros(0)

    return run


def channels_last_pass(module: nn.Module | Callable[..., Any], fn: Callable[[torch.Tensor], torch.Tensor],
                       x: torch.Tensor, batch: int) -> torch.Tensor:
    """``fn`` over ``x`` in batches of ``batch``, with ``module``'s weights and each batch
    channels-last (oneDNN's fast convolutions want both: either alone takes a slow path); the
    module's layout is put back after. Returns the outputs joined, float32, contiguous."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    with channels_last(module):
        out = [fn(x[s:s + batch].contiguous(memory_format=torch.channels_last)).float()
               for s in range(0, x.shape[0], batch)]
    return torch.cat(out).contiguous() if out else fn(x[:0]).float()


class channels_last:
    """Context: ``module``'s weights channels-last for the duration, the layout they had put
    back after (nothing to do for a plain function, or weights already channels-last)."""

    def __init__(self, module: nn.Module | Callable[..., Any]) -> None:
        self.module = module if isinstance(module, nn.Module) else None
        self.restore = False

    def __enter__(self) -> channels_last:
        if self.module is not None and not _is_channels_last(self.module):
            _lay_out(self.module, torch.channels_last)
            self.restore = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self.restore:
            _lay_out(self.module, torch.contiguous_format)
            self.restore = False


def frozen_activations(net: nn.Module, x: np.ndarray | torch.Tensor, engine: str = "auto",
                       cache_dir: str | Path | None = None) -> torch.Tensor:
    """One batch through :func:`frozen_runner`."""
    return frozen_runner(net, int(x.shape[-1]), engine, cache_dir, int(x.shape[0]))(x)


def clear_memo() -> None:
    """Forget the sessions kept in memory (tests; a long-lived process that swaps models)."""
    with _LOCK:
        _MEMO.clear()


__all__: Sequence[str] = ["ENGINES", "MIN_IMAGES_TO_EXPORT", "TORCH_BATCH", "OnnxPass", "available",
                          "channels_last", "channels_last_pass", "clear_memo", "logits_runner", "digest", "frozen_activations", "frozen_runner", "onnx_pass",
                          "resolve"]
