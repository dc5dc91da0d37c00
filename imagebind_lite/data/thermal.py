"""Thermal: one-channel infrared images (8-bit or 16-bit radiometric; PNG, TIFF, JPG) ->
normalised [1, S, S].

Reading gives intensities as a fraction of the file's full scale (``scaling="fixed"``): 8-bit
values / 255, 16-bit values / 65535 (radiometric counts, e.g. 14-bit FLIR cores, keep their
absolute meaning: hotter is always larger); float TIFFs are taken as they are. With
``scaling="per_image"`` each image is stretched between its 1st and 99th percentile to [0, 1],
which emulates the automatic gain control of cameras that write 8-bit frames (LLVIP, FLIR ADAS
JPGs): use it to train or evaluate 16-bit radiometric data together with 8-bit AGC data.

Channel policy: thermal is one channel. A grey image stored as RGB (all three channels equal up
to JPEG noise, as thermal JPGs usually are) is converted to one channel; an image whose channels
differ is a false-colour palette rendering ("ironbow", "rainbow"), whose intensity cannot be
recovered without the palette, so it is refused as ``wrong_shape`` unless
``rgb_policy="luma"`` asks for an ITU-R 601 grey conversion anyway. A 1-bit image, an image
smaller than ``min_size`` pixels a side, or a constant image (``empty``: a lens cap or dead
frame) is refused.

Normalisation: ``(x - mean) / std`` with the mean and std of all pixels of the training images
(after the conversion above), computed by ``train/compute_stats.py --modality thermal`` into
``<root>/stats.json`` and stored in the trained model's ``preprocess``: ImageBind never
published its thermal normalisation, and the statistics depend on the camera and on the
scaling, so they are measured rather than guessed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import bad_input as bi
from .datasets import BadSample
from .transforms import sensor_augment, sensor_eval_input, sensor_normaliser

SCALINGS = ("fixed", "per_image")
RGB_POLICIES = ("gray_only", "luma")

DEFAULTS = dict(scaling="fixed", rgb_policy="gray_only", mean=None, std=None, min_size=8)
STATS_KEYS = ("scaling",)

# A grey JPEG stored as RGB differs between channels by chroma rounding only.
_GRAY_MEAN_TOLERANCE = 2.0 / 255
_GRAY_MAX_TOLERANCE = 24.0 / 255


def _to_one_channel(rgb: np.ndarray, name: str, rgb_policy: str) -> np.ndarray:
    spread = rgb.max(axis=-1) - rgb.min(axis=-1)
    if float(spread.mean()) <= _GRAY_MEAN_TOLERANCE and float(spread.max()) <= _GRAY_MAX_TOLERANCE:
        return rgb.mean(axis=-1)
    if rgb_policy == "luma":
        return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    raise BadSample(
        "wrong_shape",
        f"{name}: a colour image given as thermal (channels differ: a false-colour palette "
        f"cannot be inverted to intensity); set preprocess.rgb_policy=luma to convert it anyway",
    )


def read_thermal(
    source: bi.Source, scaling: str = "fixed", rgb_policy: str = "gray_only", min_size: int = 8
) -> torch.Tensor:
    """A thermal image -> [1, H, W] float32 (see the module docstring for the scaling)."""
    if scaling not in SCALINGS:
        raise ValueError(f"thermal scaling must be one of {SCALINGS}, got {scaling!r}")
    if rgb_policy not in RGB_POLICIES:
        raise ValueError(f"thermal rgb_policy must be one of {RGB_POLICIES}, got {rgb_policy!r}")
    name = bi.source_name(source)
    image = bi.open_image(source)
    mode = image.mode
    bi.check_min_size(image.height, image.width, min_size, name)
    if mode == "1":
        raise BadSample("wrong_shape", f"{name}: a 1-bit image is not a thermal image")
    if mode == "L":
        x = np.asarray(image, dtype=np.float32) / 255.0
    elif mode.startswith("I;16"):
        x = np.array(image, dtype=np.uint16).astype(np.float32) / 65535.0
    elif mode == "I":
        raw = np.asarray(image)
        if raw.min() < 0 or raw.max() > 0xFFFF:
            raise BadSample("wrong_shape", f"{name}: integer values outside 16 bits")
        x = raw.astype(np.float32) / 65535.0
    elif mode == "F":
        x = np.asarray(image, dtype=np.float32)
    elif mode in ("LA", "La"):
        x = np.asarray(image.getchannel(0), dtype=np.float32) / 255.0
    else:
        # RGB, RGBA, P (palette), CMYK, YCbCr: judge the colour channels.
        rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        x = _to_one_channel(rgb, name, rgb_policy)
    x = bi.check_finite(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None], name)
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        raise BadSample("empty", f"{name}: constant image ({lo:g} everywhere): no thermal signal")
    if scaling == "per_image":
        q = torch.quantile(x.flatten()[:: max(1, x.numel() // 200_000)], torch.tensor([0.01, 0.99]))
        low, high = float(q[0]), float(q[1])
        if high <= low:
            low, high = lo, hi
        x = ((x - low) / (high - low)).clamp(0, 1)
    return x


def thermal_input(
    source: bi.Source, scaling: str = "fixed", rgb_policy: str = "gray_only", min_size: int = 8, **_
) -> tuple[torch.Tensor, None]:
    """(raw values [1,H,W], no validity mask): every thermal pixel is a measurement."""
    return read_thermal(source, scaling, rgb_policy, int(min_size)), None


def conversion_options(options: dict) -> dict:
    merged = {**DEFAULTS, **options}
    return {k: merged[k] for k in STATS_KEYS}


def load(path, **options) -> torch.Tensor:
    """One thermal file -> the evaluation input [1, S, S]: centre crop, resize, normalise."""
    o = {**DEFAULTS, **options}
    normalise = sensor_normaliser("thermal", o)
    values, _ = thermal_input(Path(path), **o)
    return sensor_eval_input(values, o.get("image_size", 224), normalise)


# Unpaired augmentation of a finished input; paired datasets use PairedTransform instead.
augment = sensor_augment
