"""Depth: SUN RGB-D / NYU-D 16-bit PNGs -> metres -> disparity -> normalised [1, S, S].

Reading (``layout`` option, always explicit because the two formats are both plain uint16 PNGs):

``layout="sunrgbd"``  SUN RGB-D's bit layout: the stored uint16 ``d`` is rotated right by 3 bits,
                      ``((d >> 3) | (d << 13)) & 0xFFFF``, and the result is millimetres.
``layout="mm"``       millimetres as plain uint16 (NYU-D exports, most RealSense/Kinect tools).

``.npy`` files hold float depth in metres and ignore ``layout``. Depth is clamped to
``max_depth`` (8 m, the recipe's clamp: beyond it the sensors' error grows past usefulness). A 0
is a missing measurement (no return, shadow, out of range) and stays invalid throughout.

Disparity (``representation="disparity"``, the default, as in the ImageBind depth recipe):
``baseline * fx / depth`` in pixels, with ``fx`` from the scene's intrinsics (``intrinsics.txt``
beside the depth folder, SUN RGB-D's 3x3 matrix; or ``fx``/``intrinsics`` given per record) and
the baseline of the sensor: 0.075 m for Kinect v1/v2, 0.095 m for RealSense/Xtion.
``baseline="auto"`` reads the sensor from a path component (SUN RGB-D's ``kv1``, ``kv2``,
``realsense``, ``xtion`` folders) and otherwise uses 0.075 (Kinect: SUN RGB-D's bulk and all of
NYU-D). Invalid depth gives disparity 0, which no valid pixel can reach (the 8 m clamp bounds
valid disparity below by ``baseline * fx / 8``, about 4.9 px for a Kinect), so after
normalisation "no measurement" is a distinct value below every real one; resizing never blends
holes into their neighbours (see ``transforms``).
``representation="depth"`` feeds metres instead (invalid 0) for ablations.

Normalisation: ``(disparity - mean) / std`` with the mean and std of *valid* disparity pixels
over the training set, computed by ``train/compute_stats.py --modality depth`` into
``<root>/stats.json``. Why disparity statistics rather than log depth: disparity is the
quantity the encoder sees in the recipe this project follows (so it must be standardised in
those units); it is what structured-light and stereo sensors measure, so its noise is roughly
uniform, whereas depth noise grows with depth squared; and it is bounded on both sides once
depth is clamped, so mean/std are stable (log depth would need a floor for near-zero
readings). Data statistics rather than fixed constants, because the recipe's constants were
never published and an undocumented choice cost one replication 9 points on NYU-D. The
statistics are written into the trained model's ``preprocess`` (``mean``/``std``) so evaluation
normalises identically.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import torch

from . import bad_input as bi
from .datasets import BadSample
from .transforms import sensor_augment, sensor_eval_input, sensor_normaliser

LAYOUTS = ("sunrgbd", "mm")
REPRESENTATIONS = ("disparity", "depth")
SENSOR_BASELINES = {"kv1": 0.075, "kv2": 0.075, "realsense": 0.095, "xtion": 0.095}
DEFAULT_BASELINE = 0.075
# NYU Depth v2 colour camera (the depth maps are registered to it), from the dataset's toolbox.
NYU_FX = 518.8579
INTRINSICS_FILE = "intrinsics.txt"

DEFAULTS = dict(
    layout="sunrgbd",
    max_depth=8.0,
    representation="disparity",
    baseline="auto",
    fx=None,
    mean=None,
    std=None,
    min_size=8,
)

# Options that change the values the statistics are computed on.
STATS_KEYS = ("representation", "layout", "max_depth", "baseline")

_UINT16_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def decode_depth(raw: np.ndarray, layout: str = "sunrgbd") -> np.ndarray:
    """uint16 PNG values -> float32 metres (0 stays 0)."""
    if layout not in LAYOUTS:
        raise ValueError(f"depth layout must be one of {LAYOUTS}, got {layout!r}")
    d = raw.astype(np.uint32)
    if layout == "sunrgbd":
        d = ((d >> 3) | (d << 13)) & 0xFFFF
    return d.astype(np.float32) / 1000.0


def read_depth(
    source: bi.Source, layout: str = "sunrgbd", max_depth: float = 8.0, min_size: int = 8
) -> torch.Tensor:
    """A depth file -> [1, H, W] float32 metres, clamped to ``max_depth``; 0 where invalid."""
    name = bi.source_name(source)
    if name.lower().endswith(".npy"):
        try:
            array = np.load(io.BytesIO(bi.read_bytes(source)), allow_pickle=False)
        except BadSample:
            raise
        except Exception as err:  # noqa: BLE001 - any decoder failure means this file is unusable
            raise BadSample("unreadable", f"{name}: cannot be read as .npy ({err})") from None
        array = np.squeeze(np.asarray(array, dtype=np.float32))
        if array.ndim != 2:
            raise BadSample("wrong_shape", f"{name}: depth array has shape {array.shape}, not HxW")
        if not np.isfinite(array).all():
            raise BadSample("nan", f"{name}: contains NaN or infinite depth (store invalid as 0)")
        metres = np.where(array > 0, array, 0).astype(np.float32)
    else:
        image = bi.open_image(source)
        if image.mode in _UINT16_MODES:
            raw = np.array(image, dtype=np.uint16)
        elif image.mode == "I":
            raw = np.array(image)
            if raw.min() < 0 or raw.max() > 0xFFFF:
                raise BadSample("wrong_shape", f"{name}: values outside 16 bits in a depth image")
            raw = raw.astype(np.uint16)
        else:
            raise BadSample(
                "wrong_shape",
                f"{name}: a depth map must be a one-channel 16-bit image, got PIL mode "
                f"{image.mode} (an 8-bit or colour PNG is a visualisation, not metric depth)",
            )
        metres = decode_depth(raw, layout)
    bi.check_min_size(metres.shape[0], metres.shape[1], min_size, name)
    depth = torch.from_numpy(np.minimum(metres, np.float32(max_depth)))[None]
    if not bool((depth > 0).any()):
        raise BadSample("empty", f"{name}: no valid depth pixel (all zero)")
    return depth


def read_intrinsics(source: bi.Source) -> torch.Tensor:
    """SUN RGB-D ``intrinsics.txt``: 9 numbers (3x3, row-major: fx 0 cx / 0 fy cy / 0 0 1), or
    4 numbers ``fx fy cx cy``. Returns a 3x3 float64 matrix."""
    name = bi.source_name(source)
    text = bi.read_bytes(source).decode("utf-8", errors="replace")
    try:
        values = [float(v) for v in re.split(r"[\s,]+", text.strip()) if v]
    except ValueError:
        raise BadSample("unreadable", f"{name}: intrinsics must be numbers") from None
    if len(values) == 9:
        K = torch.tensor(values, dtype=torch.float64).view(3, 3)
        # SUN RGB-D's calibration files store the transpose ([[fx,0,0],[0,fy,0],[cx,cy,1]]).
        if K[2, 0] != 0 or K[2, 1] != 0:
            K = K.T
    elif len(values) == 4:
        fx, fy, cx, cy = values
        K = torch.tensor([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], dtype=torch.float64)
    else:
        raise BadSample("wrong_shape", f"{name}: expected 9 or 4 numbers, found {len(values)}")
    if not bool(torch.isfinite(K).all()) or not K[0, 0] > 0:
        raise BadSample("unreadable", f"{name}: focal length fx must be a positive number")
    return K


def find_intrinsics(depth_path: Path) -> Path | None:
    """``intrinsics.txt`` beside the depth file or one folder up (SUN RGB-D: ``<scene>/depth/``)."""
    for folder in (depth_path.parent, depth_path.parent.parent):
        candidate = folder / INTRINSICS_FILE
        if candidate.is_file():
            return candidate
    return None


def sensor_of(path) -> str | None:
    parts = {p.lower() for p in Path(str(path)).parts}
    return next((s for s in SENSOR_BASELINES if s in parts), None)


def resolve_baseline(baseline, path=None) -> float:
    if baseline in (None, "auto"):
        sensor = sensor_of(path) if path is not None else None
        return SENSOR_BASELINES[sensor] if sensor else DEFAULT_BASELINE
    if isinstance(baseline, str) and baseline in SENSOR_BASELINES:
        return SENSOR_BASELINES[baseline]
    value = float(baseline)
    if not value > 0:
        raise ValueError(f"depth baseline must be positive metres, got {baseline!r}")
    return value


def depth_to_disparity(depth: torch.Tensor, fx: float, baseline: float) -> torch.Tensor:
    """``baseline * fx / depth`` (pixels); 0 where depth is 0 (invalid)."""
    valid = depth > 0
    return torch.where(valid, baseline * fx / depth.clamp(min=1e-6), torch.zeros_like(depth))


def depth_input(
    source: bi.Source,
    intrinsics: bi.Source | None = None,
    fx: float | None = None,
    baseline="auto",
    layout: str = "sunrgbd",
    max_depth: float = 8.0,
    representation: str = "disparity",
    min_size: int = 8,
    **_,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A depth file -> (the encoder's raw values [1,H,W], valid mask [1,H,W]), before resizing
    and normalisation. ``fx`` wins over ``intrinsics``; without either, ``intrinsics.txt`` is
    looked up beside the file."""
    if representation not in REPRESENTATIONS:
        raise ValueError(f"depth representation must be one of {REPRESENTATIONS}")
    depth = read_depth(source, layout, float(max_depth), int(min_size))
    valid = depth > 0
    if representation != "disparity":  # metres, for ablations
        return depth, valid
    if fx is None:
        if intrinsics is None and not isinstance(source, bi.Blob):
            intrinsics = find_intrinsics(Path(source))
        if intrinsics is None:
            raise BadSample(
                "missing",
                f"{bi.source_name(source)}: no focal length for disparity (no {INTRINSICS_FILE} "
                f"beside it; give an intrinsics path or fx per record, or preprocess.fx)",
            )
        fx = float(read_intrinsics(intrinsics)[0, 0])
    if not float(fx) > 0:
        raise BadSample(
            "unreadable",
            f"{bi.source_name(source)}: focal length fx={fx} is not a positive number of pixels",
        )
    b = resolve_baseline(baseline, None if isinstance(source, bi.Blob) else source)
    return bi.check_finite(depth_to_disparity(depth, float(fx), b), bi.source_name(source)), valid


def conversion_options(options: dict) -> dict:
    """The options the statistics depend on, as recorded in ``stats.json``."""
    merged = {**DEFAULTS, **options}
    out = {k: merged[k] for k in STATS_KEYS}
    out["max_depth"] = float(out["max_depth"])
    if out["representation"] != "disparity":  # metres: no baseline involved
        out.pop("baseline")
    return out


def load(path, **options) -> torch.Tensor:
    """One depth file -> the evaluation input [1, S, S]: centre crop, resize, normalise.
    ``options`` are the modality's preprocess options (``mean``/``std`` required)."""
    o = {**DEFAULTS, **options}
    normalise = sensor_normaliser("depth", o)
    values, valid = depth_input(Path(path), **o)
    return sensor_eval_input(values, o.get("image_size", 224), normalise, valid)


# Unpaired augmentation of a finished input; paired datasets use PairedTransform instead.
augment = sensor_augment
