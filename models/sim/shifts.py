"""A broad, seeded, parametric family of image shifts: what the accuracy estimators are
fitted on (``models.estimate.base``), never what they are benchmarked on (``models.sim.conditions``).

Pure numpy + PIL. A *spec* is a JSON-able list of ``(primitive, params)`` steps; the
parameters are drawn once per spec (a site's camera is the same for every image), the
per-image randomness (sensor noise) comes from the ``rng`` passed to :func:`apply_spec`.

    rng = np.random.default_rng(0)
    spec = sample_spec(rng)                       # e.g. [("blur", {...}), ("jpeg", {...})]
    out = apply_spec(img_uint8_hwc, spec, np.random.default_rng([spec_id, image_id]))

Design rules:
* continuous parameters, each primitive with a severity u in [0, 1] mapped from imperceptible
  to far beyond ``models.sim.conditions`` severity 3; u = U(0,1)**1.5 puts more mass on mild
  shifts (where the harmless/harmful decision is made), u = U(0,1)**0.6 on strong ones;
* 1-3 primitives per spec (plus a few identity specs), applied in a fixed camera-pipeline
  order (optics -> sensor -> ISP -> resampling -> compression);
* none of the benchmark's site functions or severities is used here.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageFilter

Spec = list  # [(name, params dict), ...]

# Camera-pipeline order in which the primitives of a spec are applied.
ORDER: tuple[str, ...] = (
    "blur",        # optics: defocus (Gaussian) or motion (line kernel)
    "vignette",    # optics: radial fall-off
    "exposure",    # sensor: gain and gamma (darker / brighter, crushed / lifted shadows)
    "noise",       # sensor: Gaussian, luma-only or signal-dependent noise
    "wb",          # ISP: per-channel gains (colour cast / white balance)
    "saturation",  # ISP: desaturate (down to monochrome) or oversaturate
    "hue",         # ISP: hue rotation
    "contrast",    # ISP: contrast scaling around the mean
    "haze",        # scene/lens: blend with a bright veil (fog, flare, dirty window)
    "sharpen",     # ISP: unsharp mask
    "downup",      # resampling: down by f and back up (cheap digital zoom, thumbnails)
    "rescale",     # resampling: the site stores another resolution
    "jpeg",        # compression
)
PRIMITIVES = frozenset(ORDER)


def _sev(rng: np.random.Generator, power: float) -> float:
    return float(rng.random() ** power)


def _lerp(a: float, b: float, u: float) -> float:
    return a + (b - a) * u


def _loglerp(a: float, b: float, u: float) -> float:
    return math.exp(_lerp(math.log(a), math.log(b), u))


def sample_params(name: str, rng: np.random.Generator, power: float = 1.5) -> dict:
    """Random parameters of one primitive (severity u = U(0,1)**power drawn inside)."""
    u = _sev(rng, power)
    if name == "blur":
        kind = "motion" if rng.random() < 0.3 else "gaussian"
        return {"kind": kind, "sigma_frac": _loglerp(1 / 1500, 1 / 22, u),
                "angle": float(rng.uniform(0, 180))}
    if name == "vignette":
        return {"strength": 0.9 * u}
    if name == "exposure":
        # gain and gamma each with their own severity and direction
        ug, ugm = u, _sev(rng, power)
        gain = _loglerp(1.0, 0.12, ug) if rng.random() < 0.65 else _loglerp(1.0, 1.8, ug)
        gamma = _loglerp(1.0, 2.6, ugm) if rng.random() < 0.6 else _loglerp(1.0, 0.45, ugm)
        return {"gain": gain, "gamma": gamma}
    if name == "noise":
        kind = str(rng.choice(["iid", "luma", "signal"], p=[0.5, 0.25, 0.25]))
        return {"kind": kind, "sigma": _lerp(0.3, 32.0, u)}
    if name == "wb":
        v = rng.uniform(-0.8, 0.5, size=3)
        return {"log_gains": (u * v).tolist()}
    if name == "saturation":
        if rng.random() < 0.7:
            s = max(0.0, 1.0 - 1.15 * u)  # ~9% of desaturations end fully grey (monochrome camera)
        else:
            s = _lerp(1.0, 2.0, u)
        return {"factor": s}
    if name == "hue":
        return {"degrees": float(rng.choice([-1, 1])) * 50.0 * u}
    if name == "contrast":
        return {"factor": _loglerp(1.0, 0.35, u) if rng.random() < 0.6 else _loglerp(1.0, 1.8, u)}
    if name == "haze":
        base = rng.uniform(150, 255)
        tint = rng.uniform(-20, 20, size=3)
        return {"alpha": 0.75 * u, "colour": np.clip(base + tint, 0, 255).tolist()}
    if name == "sharpen":
        return {"percent": int(round(_lerp(30, 400, u))), "radius": float(rng.uniform(0.6, 3.0)),
                "threshold": int(rng.integers(0, 4))}
    if name == "downup":
        filters = ["nearest", "bilinear", "bicubic", "box", "lanczos"]
        return {"factor": _loglerp(1.05, 8.0, u), "down": str(rng.choice(filters)),
                "up": str(rng.choice(filters))}
    if name == "rescale":
        f = _loglerp(1.0, 0.3, u) if rng.random() < 0.7 else _loglerp(1.0, 2.0, u)
        return {"factor": f, "filter": str(rng.choice(["bilinear", "bicubic", "lanczos"]))}
    if name == "jpeg":
        return {"quality": int(round(_lerp(99, 2, u)))}
    raise ValueError(f"unknown primitive {name!r}")


def sample_spec(rng: np.random.Generator, exclude: Sequence[str] = (),
                p_identity: float = 0.06, power: float = 1.5) -> Spec:
    """One random shift: identity (p_identity) or 1-3 distinct primitives in ORDER.
    power: severity exponent (u = U(0,1)**power; 1.5 favours mild shifts, 0.6 severe ones)."""
    if rng.random() < p_identity:
        return []
    names = [n for n in ORDER if n not in set(exclude)]
    k = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
    chosen = set(rng.choice(names, size=k, replace=False).tolist())
    return [(n, sample_params(n, rng, power)) for n in ORDER if n in chosen]


def sample_specs(n: int, seed: int, **kw) -> list[Spec]:
    rng = np.random.default_rng(seed)
    return [sample_spec(rng, **kw) for _ in range(n)]


def bank_specs(k_mild: int = 120, k_severe: int = 80, seed: int = 20240611) -> list[Spec]:
    """A fitting bank: k_mild specs with severity exponent 1.5 (mostly mild, 6% identity) +
    k_severe specs with exponent 0.6 (mostly strong, no identity)."""
    return (sample_specs(k_mild, seed)
            + sample_specs(k_severe, seed + 1, power=0.6, p_identity=0.0))


def primitives_of(spec: Spec) -> set[str]:
    return {name for name, _ in spec}


def spec_text(spec: Spec) -> str:
    if not spec:
        return "identity"
    parts = []
    for name, p in spec:
        short = ",".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in p.items() if k not in ("colour",) and not isinstance(v, list))
        parts.append(f"{name}({short})")
    return "+".join(parts)


# --- primitives ------------------------------------------------------------------------------
_PIL_FILTERS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                "box": Image.BOX, "lanczos": Image.LANCZOS}
_LUMA = np.asarray([0.299, 0.587, 0.114], np.float32)


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _motion_blur(a: np.ndarray, length: float, angle: float) -> np.ndarray:
    """Average of shifted copies along a line of ``length`` px (bilinear sub-pixel shifts)."""
    x = a.astype(np.float32)
    taps = max(2, int(math.ceil(length)) + 1)
    th = math.radians(angle)
    acc = np.zeros_like(x)
    for t in np.linspace(-length / 2, length / 2, taps):
        dx, dy = t * math.cos(th), t * math.sin(th)
        ix, iy = int(math.floor(dx)), int(math.floor(dy))
        fx, fy = dx - ix, dy - iy
        s00 = np.roll(x, (iy, ix), axis=(0, 1))
        s01 = np.roll(x, (iy, ix + 1), axis=(0, 1))
        s10 = np.roll(x, (iy + 1, ix), axis=(0, 1))
        s11 = np.roll(x, (iy + 1, ix + 1), axis=(0, 1))
        acc += (1 - fy) * ((1 - fx) * s00 + fx * s01) + fy * ((1 - fx) * s10 + fx * s11)
    return _u8(acc / taps)


def apply_primitive(a: np.ndarray, name: str, p: dict, rng: np.random.Generator) -> np.ndarray:
    """(H,W,3) uint8 -> (H',W',3) uint8."""
    h, w = a.shape[:2]
    if name == "blur":
        r = p["sigma_frac"] * max(h, w)
        if r < 0.15:
            return a
        if p["kind"] == "gaussian":
            return np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(r)))
        return _motion_blur(a, 3.0 * r, p["angle"])
    if name == "vignette":
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        rr = ((yy - (h - 1) / 2) / (h / 2)) ** 2 + ((xx - (w - 1) / 2) / (w / 2)) ** 2
        m = np.clip(1.0 - p["strength"] * rr / 2.0, 0.0, 1.0)
        return _u8(a.astype(np.float32) * m[..., None])
    if name == "exposure":
        x = a.astype(np.float32) / 255.0
        return _u8(255.0 * p["gain"] * np.power(x, p["gamma"]))
    if name == "noise":
        x = a.astype(np.float32)
        s = p["sigma"]
        if p["kind"] == "iid":
            x += rng.normal(0.0, s, size=x.shape).astype(np.float32)
        elif p["kind"] == "luma":
            x += rng.normal(0.0, s, size=(h, w, 1)).astype(np.float32)
        else:  # signal-dependent (shot noise): std grows with the signal
            x += rng.normal(0.0, 1.0, size=x.shape).astype(np.float32) * (
                s * np.sqrt(np.maximum(x, 1.0) / 128.0))
        return _u8(x)
    if name == "wb":
        g = np.exp(np.asarray(p["log_gains"], np.float32))
        return _u8(a.astype(np.float32) * g)
    if name == "saturation":
        x = a.astype(np.float32)
        luma = (x @ _LUMA)[..., None]
        return _u8(luma + p["factor"] * (x - luma))
    if name == "hue":
        # rotate the chroma plane of YIQ
        x = a.astype(np.float32)
        m = np.asarray([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                       np.float32)
        yiq = x @ m.T
        t = math.radians(p["degrees"])
        c, s = math.cos(t), math.sin(t)
        i, q = yiq[..., 1].copy(), yiq[..., 2].copy()
        yiq[..., 1], yiq[..., 2] = c * i - s * q, s * i + c * q
        return _u8(yiq @ np.linalg.inv(m).T)
    if name == "contrast":
        x = a.astype(np.float32)
        mean = float((x @ _LUMA).mean())
        return _u8(mean + p["factor"] * (x - mean))
    if name == "haze":
        x = a.astype(np.float32)
        col = np.asarray(p["colour"], np.float32)
        return _u8((1.0 - p["alpha"]) * x + p["alpha"] * col)
    if name == "sharpen":
        f = ImageFilter.UnsharpMask(radius=p["radius"], percent=p["percent"],
                                    threshold=p["threshold"])
        return np.asarray(Image.fromarray(a).filter(f))
    if name == "downup":
        f = p["factor"]
        sw, sh = max(2, int(round(w / f))), max(2, int(round(h / f)))
        im = Image.fromarray(a).resize((sw, sh), _PIL_FILTERS[p["down"]])
        return np.asarray(im.resize((w, h), _PIL_FILTERS[p["up"]]))
    if name == "rescale":
        f = p["factor"]
        sw, sh = max(8, int(round(w * f))), max(8, int(round(h * f)))
        return np.asarray(Image.fromarray(a).resize((sw, sh), _PIL_FILTERS[p["filter"]]))
    if name == "jpeg":
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=int(p["quality"]))
        buf.seek(0)
        with Image.open(buf) as im:
            return np.asarray(im.convert("RGB"))
    raise ValueError(f"unknown primitive {name!r}")


def apply_spec(a: np.ndarray, spec: Spec, rng: np.random.Generator) -> np.ndarray:
    """Apply every step of ``spec`` to an (H,W,3) uint8 image (grey (H,W) is expanded)."""
    a = np.asarray(a)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    for name, p in spec:
        a = apply_primitive(a, name, p, rng)
    return np.ascontiguousarray(a, dtype=np.uint8)


__all__ = ["ORDER", "PRIMITIVES", "Spec", "apply_primitive", "apply_spec", "bank_specs",
           "primitives_of", "sample_params", "sample_spec", "sample_specs", "spec_text"]
