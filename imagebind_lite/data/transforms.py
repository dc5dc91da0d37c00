"""Spatially aligned transforms for an RGB image and a one-channel sensor image (depth, thermal),
and the sensor normalisation statistics (``stats.json``).

The two images of a pair cover the same field of view but may have different resolutions and
even different pixel aspect ratios (RoadScene: 1404x1026 RGB with a 500x329 infrared frame).
So every crop is a box in *relative* coordinates ``(top, left, height, width)`` in [0, 1],
sampled once and applied to both images by sampling each at the same relative positions
(``grid_sample`` at the output pixel centres). A pixel of the output therefore shows the same
scene point on both sides, exactly, whatever the two resolutions.

Training (ImageBind's depth/thermal recipe): RandomResizedCrop with scale (0.08, 1) and aspect
ratio (3/4, 4/3) measured on the RGB image, horizontal flip with p=0.5 on both, then RandomErase
(p=0.25, area 2-33%, aspect 0.3-3.3, value 0 = the normalised mean) on the sensor side only.
Evaluation: "resize the short side and centre-crop", i.e. the centred square box, identically.
All randomness comes from the ``torch.Generator`` passed in.

Resampling: when the box is larger than the output (a downscale), the image is first resized
with an antialiasing filter so that the box spans about the output size, then sampled
bilinearly; resizing keeps relative coordinates, so alignment is unaffected. Depth uses
validity-aware interpolation: holes (disparity 0) are interpolated as a mask and pixels that are
less than half valid stay holes, so missing depth never blends into fake far-away values.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..files import atomic_write_json

Box = tuple[float, float, float, float]  # top, left, height, width; relative to the image
FULL_BOX: Box = (0.0, 0.0, 1.0, 1.0)


def _pair(size) -> tuple[int, int]:
    if isinstance(size, (tuple, list)):
        return int(size[0]), int(size[1])
    return int(size), int(size)


def random_resized_box(
    height: int,
    width: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> Box:
    """torchvision's RandomResizedCrop sampling, continuous (no pixel rounding), as a relative
    box. ``height``/``width`` are the reference (RGB) image's pixels: area and aspect ratio are
    measured there."""
    area = float(height * width)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    for _ in range(attempts):
        target = area * uniform(scale[0], scale[1])
        aspect = math.exp(uniform(log_lo, log_hi))
        w = math.sqrt(target * aspect)
        h = math.sqrt(target / aspect)
        if 0 < w <= width and 0 < h <= height:
            top = uniform(0.0, height - h)
            left = uniform(0.0, width - w)
            return top / height, left / width, h / height, w / width
    # Fallback like torchvision: the largest centred box with the aspect ratio clamped to range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = float(width), width / ratio[0]
    elif in_ratio > ratio[1]:
        h, w = float(height), height * ratio[1]
    else:
        w, h = float(width), float(height)
    return (height - h) / 2 / height, (width - w) / 2 / width, h / height, w / width


def center_box(height: int, width: int, out_aspect: float = 1.0) -> Box:
    """Resize-the-short-side + centre-crop as a relative box (``out_aspect`` = out width/height)."""
    if width / height > out_aspect:
        h, w = float(height), height * out_aspect
    else:
        w, h = float(width), width / out_aspect
    return (height - h) / 2 / height, (width - w) / 2 / width, h / height, w / width


def compose_boxes(outer: Box, inner: Box) -> Box:
    """``inner`` is relative to the ``outer`` box; return it relative to the whole image."""
    top, left, h, w = outer
    return top + inner[0] * h, left + inner[1] * w, inner[2] * h, inner[3] * w


def pixel_box_to_relative(box, height: int, width: int) -> Box:
    """(x0, y0, x1, y1) in pixels -> a relative box, clipped to the image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = max(0.0, min(x0, x1)), min(float(width), max(x0, x1))
    y0, y1 = max(0.0, min(y0, y1)), min(float(height), max(y0, y1))
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        raise ValueError(f"box {box} is empty inside a {width}x{height} image")
    return y0 / height, x0 / width, (y1 - y0) / height, (x1 - x0) / width


def _sample(x: torch.Tensor, box: Box, size: tuple[int, int], flip: bool) -> torch.Tensor:
    """Bilinear samples of ``x`` [C,H,W] at the output pixel centres of ``box``."""
    out_h, out_w = size
    top, left, h, w = box
    ys = top + (torch.arange(out_h, dtype=torch.float64) + 0.5) / out_h * h
    fx = (torch.arange(out_w, dtype=torch.float64) + 0.5) / out_w
    xs = left + (1.0 - fx if flip else fx) * w
    # align_corners=False: normalised -1/+1 are the outer pixel edges, so relative r -> 2r - 1.
    grid = torch.stack(torch.meshgrid(2 * ys - 1, 2 * xs - 1, indexing="ij")[::-1], dim=-1)
    grid = grid.to(x.dtype).unsqueeze(0)
    return F.grid_sample(
        x.unsqueeze(0), grid, mode="bilinear", padding_mode="border", align_corners=False
    )[0]


def _prefilter(x: torch.Tensor, box: Box, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased downscale of the whole image so the box spans about ``size`` pixels."""
    H, W = x.shape[-2:]
    new_h = min(H, max(1, round(H * size[0] / max(box[2] * H, 1e-6))))
    new_w = min(W, max(1, round(W * size[1] / max(box[3] * W, 1e-6))))
    if new_h >= H and new_w >= W:
        return x
    return F.interpolate(
        x.unsqueeze(0), size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False
    )[0]


def resized_crop(
    x: torch.Tensor, box: Box, size, flip: bool = False, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Crop the relative ``box`` of ``x`` [C,H,W] and resize it to ``size``, optionally
    mirrored. With ``valid`` (a [1,H,W] mask) invalid pixels are left out of the interpolation and
    output pixels that are less than half valid are 0."""
    size = _pair(size)
    x = x.float()
    if valid is None:
        return _sample(_prefilter(x, box, size), box, size, flip)
    m = valid.to(x.dtype)
    both = torch.cat([x * m, m])
    out = _sample(_prefilter(both, box, size), box, size, flip)
    values, weight = out[:-1], out[-1:]
    return torch.where(weight >= 0.5, values / weight.clamp(min=1e-6), torch.zeros_like(values))


def random_erase(
    x: torch.Tensor,
    generator: torch.Generator,
    p: float = 0.25,
    scale: tuple[float, float] = (0.02, 0.33),
    ratio: tuple[float, float] = (0.3, 3.3),
    value: float = 0.0,
) -> torch.Tensor:
    """torchvision's RandomErasing, drawing from ``generator``; returns a new tensor."""
    if p <= 0 or float(torch.rand((), generator=generator)) >= p:
        return x
    H, W = x.shape[-2:]
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    for _ in range(10):
        area = H * W * uniform(scale[0], scale[1])
        aspect = math.exp(uniform(log_lo, log_hi))
        h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < h < H and 0 < w < W:
            i = int(torch.randint(0, H - h + 1, (1,), generator=generator))
            j = int(torch.randint(0, W - w + 1, (1,), generator=generator))
            out = x.clone()
            out[..., i : i + h, j : j + w] = value
            return out
    return x


@dataclass
class PairedTransform:
    """The same crop and flip on an RGB image and a one-channel sensor image; erase on the
    sensor only. ``rgb_size`` is the anchor's input size, ``sensor_size`` the encoder's."""

    rgb_size: tuple[int, int]
    sensor_size: tuple[int, int]
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    erase_p: float = 0.25

    def boxes(
        self,
        rgb_hw: tuple[int, int],
        train: bool,
        generator: torch.Generator | None,
        region: Box = FULL_BOX,
    ) -> tuple[Box, bool]:
        """(box relative to the whole image, flip). ``region`` restricts the crop (LLVIP boxes)."""
        h = max(1, round(region[2] * rgb_hw[0]))
        w = max(1, round(region[3] * rgb_hw[1]))
        if train:
            if generator is None:
                raise ValueError("training transforms need a torch.Generator")
            inner = random_resized_box(
                h, w, generator, tuple(self.crop_scale), tuple(self.crop_ratio)
            )
            flip = float(torch.rand((), generator=generator)) < self.flip_p
        else:
            inner = center_box(h, w, self.sensor_size[1] / self.sensor_size[0])
            flip = False
        return compose_boxes(region, inner), flip

    def __call__(
        self,
        rgb: torch.Tensor | None,
        sensor: torch.Tensor,
        train: bool,
        generator: torch.Generator | None = None,
        region: Box = FULL_BOX,
        sensor_valid: torch.Tensor | None = None,
        normalise=None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``rgb`` [3,H,W] in [0,1] -> [3,*rgb_size] in [0,1]; ``sensor`` [1,h,w] raw ->
        [1,*sensor_size], passed through ``normalise`` (if given) before erasing. Without an
        RGB image (evaluation of the sensor alone) crop areas are measured on the sensor."""
        reference = sensor if rgb is None else rgb
        box, flip = self.boxes(tuple(reference.shape[-2:]), train, generator, region)
        rgb_out = None if rgb is None else resized_crop(rgb, box, self.rgb_size, flip).clamp(0, 1)
        sensor_out = resized_crop(sensor, box, self.sensor_size, flip, valid=sensor_valid)
        if normalise is not None:
            sensor_out = normalise(sensor_out)
        if train and self.erase_p > 0:
            sensor_out = random_erase(sensor_out, generator, self.erase_p)
        return rgb_out, sensor_out


def augment_sensor(
    x: torch.Tensor,
    generator: torch.Generator,
    size=None,
    crop_scale=(0.08, 1.0),
    crop_ratio=(3 / 4, 4 / 3),
    flip_p: float = 0.5,
    erase_p: float = 0.25,
) -> torch.Tensor:
    """The training augmentation on a sensor tensor alone (no RGB partner to align with)."""
    size = _pair(size or tuple(x.shape[-2:]))
    box = random_resized_box(
        x.shape[-2], x.shape[-1], generator, tuple(crop_scale), tuple(crop_ratio)
    )
    flip = float(torch.rand((), generator=generator)) < flip_p
    return random_erase(resized_crop(x, box, size, flip), generator, erase_p)


# --------------------------------------------------------------------------------------------
# Normalisation statistics: ``stats.json`` beside the data, one entry per modality.

STATS_FILE = "stats.json"


class RunningStats:
    """Streaming mean/std in float64 over any number of value tensors."""

    def __init__(self):
        self.count, self.total, self.total_sq = 0, 0.0, 0.0
        self.minimum, self.maximum = math.inf, -math.inf
        self.shift: float | None = None

    def update(self, values: torch.Tensor) -> None:
        v = values.detach().double().flatten()
        if v.numel() == 0:
            return
        if self.shift is None:
            # Squares of values shifted by a typical value keep float64 precision for the std.
            self.shift = float(v[0])
        d = v - self.shift
        self.count += v.numel()
        self.total += float(v.sum())
        self.total_sq += float((d * d).sum())
        self.minimum = min(self.minimum, float(v.min()))
        self.maximum = max(self.maximum, float(v.max()))

    def result(self) -> dict:
        if self.count == 0:
            raise ValueError("no values to compute statistics from")
        mean = self.total / self.count
        var = self.total_sq / self.count - (mean - self.shift) ** 2
        return {
            "mean": mean,
            "std": math.sqrt(max(var, 0.0)),
            "count": self.count,
            "min": self.minimum,
            "max": self.maximum,
        }


def stats_command(modality: str, root, source: str = "--manifest MANIFEST") -> str:
    """The command that writes the statistics; ``source`` is ``--manifest M`` or ``--layout L``.
    A dataset folder that cannot be written to (a shared, read-only copy) gets them elsewhere."""
    command = f"python train/compute_stats.py --modality {modality} {source} --root {root}"
    if Path(root).is_dir() and not os.access(root, os.W_OK):
        command += (
            f" --out STATS.json (read-only {root}), then train with data.options.stats=STATS.json"
        )
    return command


def write_stats(path, modality: str, entry: dict) -> Path:
    """Merge ``entry`` into ``path`` under ``modality`` (other modalities' entries are kept)."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[modality] = {
        **entry,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return atomic_write_json(path, data, sort_keys=True)


def read_stats(path, modality: str, expected: dict | None = None, command: str = "") -> dict:
    """The ``modality`` entry of a stats file; errors name the command that computes it and
    refuse statistics computed under different conversion options."""
    path = Path(path)
    hint = f"; compute it with: {command}" if command else ""
    if not path.is_file():
        raise FileNotFoundError(f"{modality} normalisation statistics not found: {path}{hint}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}){hint}") from None
    if modality not in data:
        raise KeyError(f"{path} has no {modality!r} statistics{hint}")
    entry = data[modality]
    for key, value in (expected or {}).items():
        saved = entry.get("options", {}).get(key)
        if saved != value:
            raise ValueError(
                f"{path}: {modality} statistics were computed with {key}={saved!r} but the data "
                f"is read with {key}={value!r}; recompute them{hint}"
            )
    if not entry.get("std", 0) > 0:
        raise ValueError(f"{path}: {modality} std must be positive, got {entry.get('std')!r}")
    return entry


def sensor_normaliser(modality: str, options: dict):
    """``x -> (x - mean) / std`` from the preprocessing options; a clear error without them."""
    mean, std = options.get("mean"), options.get("std")
    if mean is None or std is None:
        raise ValueError(
            f"{modality}: normalisation statistics are not set (preprocess mean/std). Compute "
            f"them from the training set with: {stats_command(modality, 'ROOT')}; datasets read "
            f"ROOT/{STATS_FILE} (data.options.stats) and store them in the model's preprocess"
        )
    mean, std = float(mean), float(std)
    if not std > 0:
        raise ValueError(f"{modality}: preprocess std must be positive, got {std}")

    def normalise(x: torch.Tensor) -> torch.Tensor:
        return (x - mean) / std

    return normalise


def sensor_eval_input(values: torch.Tensor, size, normalise, valid: torch.Tensor | None = None):
    """Evaluation input of a sensor image alone: centre square, resized, normalised."""
    size = _pair(size)
    box = center_box(values.shape[-2], values.shape[-1], size[1] / size[0])
    return normalise(resized_crop(values, box, size, valid=valid))


def sensor_augment(
    x: torch.Tensor, train: bool, generator: torch.Generator | None = None, **options
) -> torch.Tensor:
    """``ModalitySpec.augment`` of depth/thermal: the training augmentation of a finished
    [1,S,S] input with no RGB partner (random resized crop, flip, erase); identity in eval."""
    if not train:
        return x
    if generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(2**31, (1,))))
    return augment_sensor(
        x,
        generator,
        None,
        options.get("crop_scale", (0.08, 1.0)),
        options.get("crop_ratio", (3 / 4, 4 / 3)),
        options.get("flip_p", 0.5),
        options.get("erase_p", 0.25),
    )
