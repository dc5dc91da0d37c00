"""IMU: accelerometer + gyroscope, [6, 2000] windows (ImageBind's Ego4D setting).

The worked example of a modality in one file (``docs/extending.md``): the stem, the sizes, the
file reader, the augmentation and the preprocessing defaults are all here, and the file uses only
the public API, so a copy of it outside the package (under another name, passed as
``modality_file=``) works the same way.

Input: a float tensor [channels, length] = [6, 2000] (ImageBind: 10 s at 200 Hz; the stem cuts
it into 250 windows of 8 steps, 48 values each). The channel order is the file's; keep it fixed
between training and use (Ego4D: accelerometer x, y, z, then gyroscope x, y, z).

Files (``load``): ``.npy`` holding [6, T] or [T, 6] (a [6, 6] array is read as channels
first), or ``.csv`` with 6 numeric columns (an optional header row; ``columns`` picks 6 out of
more, by header name or index). Every problem raises ``IMUReadError`` naming the file.

Preprocessing options (``data.preprocess``; saved with the model, so evaluation and reloading
read files the same way):

``channels``, ``length``  6, 2000
``input_rate``            Hz of the files; when set they are first resampled (linearly) to
``sample_rate``           (200 Hz). Null: the files are already at ``sample_rate``.
``fit``                   ``crop``: a longer recording keeps its centre ``length`` steps, a
                          shorter one is padded at the end; ``resample``: the whole recording
                          is stretched to ``length`` steps
``pad``                   ``zero`` or ``edge`` (repeat the last value), after normalising
``normalize``             ``none`` (ImageBind published none: raw units), ``channel`` (each
                          channel of each window to zero mean, unit std) or ``stats`` (the
                          dataset's per-channel ``mean`` and ``std`` lists)

Augmentation (training only; every draw from the ``generator`` a dataset passes, which
``EpochRandom`` seeds by (seed, epoch, index), so a sample is augmented the same way on every
rank and after a resume): ``scale`` (each channel times a factor in [1 - scale, 1 + scale]),
``jitter`` (Gaussian noise, std = jitter x the channel's std over the window), ``max_shift``
(the signal moves up to that many steps either way; the vacated steps repeat the edge value).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from imagebind_lite.modalities import (
    ImageBindBranch,
    ImageBindCheckpointError,
    ModalitySpec,
    register_modality,
)
from imagebind_lite.models.encoder import LinearWindowStem

PREPROCESS = dict(
    channels=6,
    length=2000,
    sample_rate=200,
    input_rate=None,
    fit="crop",
    pad="zero",
    normalize="none",
    mean=None,
    std=None,
    columns=None,
    # augmentation
    scale=0.1,
    jitter=0.02,
    max_shift=100,
)
FITS = ("crop", "resample")
PADS = ("zero", "edge")
NORMALIZE = ("none", "channel", "stats")


class IMUReadError(ValueError):
    """An IMU file that cannot become a [channels, length] window; the message names the file."""


# ------------------------------------------------------------------------------ stem and sizes


def build_stem(size: dict, options: dict) -> LinearWindowStem:
    return LinearWindowStem(
        in_chans=options["channels"],
        width=size["width"],
        length=options["length"],
        kernel=size["window"],
    )


SIZES = {
    # ImageBind's IMU encoder: 512 wide, 6 blocks, 8 heads, drop path 0.7 (19.6M parameters).
    "imagebind": dict(width=512, depth=6, heads=8, drop_path=0.7, window=8),
    # CPU-sized.
    "tiny": dict(width=64, depth=2, heads=2, mlp_ratio=2.0, window=8),
}


# ------------------------------------------------------------------------------ reading files


def _read_npy(path: Path, channels: int) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - numpy raises several types for damaged files
        why = f"{type(err).__name__}: {err}"
        raise IMUReadError(f"{path}: cannot be read as .npy ({why})") from None
    if array.ndim != 2:
        raise IMUReadError(
            f"{path}: expected a 2-D array [{channels}, T] or [T, {channels}], got shape "
            f"{list(array.shape)}"
        )
    if array.shape[0] == channels:
        return array
    if array.shape[1] == channels:
        return array.T
    raise IMUReadError(
        f"{path}: neither axis of shape {list(array.shape)} has the {channels} channels"
    )


def _as_float(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def _read_csv(path: Path, channels: int, columns=None) -> np.ndarray:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = [row for row in csv.reader(handle) if any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise IMUReadError(f"{path}: cannot be read as CSV ({err})") from None
    if not rows:
        raise IMUReadError(f"{path}: contains no rows")
    header = None
    if any(_as_float(c) is None for c in rows[0]):
        header, rows = [c.strip() for c in rows[0]], rows[1:]
    if not rows:
        raise IMUReadError(f"{path}: has a header but no samples")
    if columns is not None:
        picked = []
        for col in columns:
            if isinstance(col, int):
                picked.append(col)
            elif header is not None and str(col) in header:
                picked.append(header.index(str(col)))
            else:
                raise IMUReadError(
                    f"{path}: no column {col!r} (header: {', '.join(header or []) or 'none'})"
                )
        if len(picked) != channels:
            raise IMUReadError(f"{path}: columns names {len(picked)} columns, not {channels}")
    else:
        width = len(rows[0])
        if width != channels:
            raise IMUReadError(
                f"{path}: expected {channels} columns (accelerometer x, y, z, gyroscope x, y, z), "
                f"found {width}; choose them with data.preprocess.columns"
            )
        picked = list(range(channels))
    data = np.empty((len(rows), channels), dtype=np.float32)
    line0 = 2 if header is not None else 1
    for n, row in enumerate(rows):
        for j, col in enumerate(picked):
            value = _as_float(row[col]) if col < len(row) else None
            if value is None:
                cell = repr(row[col]) if col < len(row) else "nothing"
                raise IMUReadError(
                    f"{path}:{line0 + n}: column {col + 1} holds {cell}, not a number"
                )
            data[n, j] = value
    return data.T


def read_imu(path, channels: int = 6, columns=None) -> torch.Tensor:
    """A file -> float32 [channels, T] as recorded (no resampling, cropping or normalising)."""
    path = Path(path)
    if not path.is_file():
        raise IMUReadError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        array = _read_npy(path, channels)
    elif suffix in (".csv", ".txt"):
        array = _read_csv(path, channels, columns)
    else:
        raise IMUReadError(
            f"{path}: unsupported IMU file type {suffix!r} (.npy [{channels}, T] or "
            f"[T, {channels}], or .csv with {channels} columns)"
        )
    if array.shape[1] == 0:
        raise IMUReadError(f"{path}: contains no samples")
    if not np.issubdtype(array.dtype, np.number):
        raise IMUReadError(f"{path}: holds {array.dtype} values, not numbers")
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if not torch.isfinite(x).all():
        raise IMUReadError(f"{path}: contains NaN or infinite values")
    return x


def _stretch(x: torch.Tensor, steps: int) -> torch.Tensor:
    if x.shape[-1] == steps:
        return x
    if x.shape[-1] == 1:
        return x.expand(-1, steps).clone()
    return F.interpolate(x[None], size=steps, mode="linear", align_corners=True)[0]


def normalize(
    x: torch.Tensor, mode: str = "none", mean=None, std=None, where: str = ""
) -> torch.Tensor:
    if mode == "none":
        return x
    if mode == "channel":
        std = x.std(-1, correction=0, keepdim=True).clamp_min(1e-6)
        return (x - x.mean(-1, keepdim=True)) / std
    if mode == "stats":
        if mean is None or std is None:
            raise IMUReadError(f"{where}normalize=stats needs data.preprocess.mean and .std")
        mean = torch.as_tensor(mean, dtype=x.dtype).view(-1, 1)
        std = torch.as_tensor(std, dtype=x.dtype).view(-1, 1)
        if mean.shape[0] != x.shape[0] or std.shape[0] != x.shape[0]:
            raise IMUReadError(f"{where}mean and std need {x.shape[0]} values, one per channel")
        return (x - mean) / std.clamp_min(1e-12)
    raise IMUReadError(f"{where}normalize: expected one of {', '.join(NORMALIZE)}, got {mode!r}")


def to_window(
    x: torch.Tensor,
    length: int = 2000,
    sample_rate: float = 200,
    input_rate: float | None = None,
    fit: str = "crop",
    pad: str = "zero",
    normalize_mode: str = "none",
    mean=None,
    std=None,
    where: str = "",
) -> torch.Tensor:
    """A recording [C, T] -> the encoder's window [C, length]."""
    if fit not in FITS:
        raise IMUReadError(f"{where}fit: expected one of {', '.join(FITS)}, got {fit!r}")
    if pad not in PADS:
        raise IMUReadError(f"{where}pad: expected one of {', '.join(PADS)}, got {pad!r}")
    if input_rate is not None and float(input_rate) != float(sample_rate):
        x = _stretch(x, max(1, round(x.shape[-1] * float(sample_rate) / float(input_rate))))
    if fit == "resample":
        x = _stretch(x, length)
    elif x.shape[-1] > length:
        start = (x.shape[-1] - length) // 2
        x = x[:, start : start + length]
    # Normalised before padding: zero padding then sits at the channel mean, not at a step.
    x = normalize(x, normalize_mode, mean, std, where)
    missing = length - x.shape[-1]
    if missing > 0:
        x = F.pad(x[None], (0, missing), mode="replicate" if pad == "edge" else "constant")[0]
    return x.contiguous()


def load(
    path,
    channels=6,
    length=2000,
    sample_rate=200,
    input_rate=None,
    fit="crop",
    pad="zero",
    normalize="none",
    mean=None,
    std=None,
    columns=None,
    **_,
) -> torch.Tensor:
    """``ModalitySpec.load``: a file -> [channels, length] with the preprocessing options."""
    x = read_imu(path, channels, columns)
    return to_window(
        x, length, sample_rate, input_rate, fit, pad, normalize, mean, std, where=f"{path}: "
    )


# ------------------------------------------------------------------------------ augmentation


def time_shift(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Move the signal by ``shift`` steps (right if positive); vacated steps repeat the edge."""
    if shift == 0:
        return x
    out = torch.empty_like(x)
    if shift > 0:
        out[..., shift:] = x[..., :-shift]
        out[..., :shift] = x[..., :1]
    else:
        out[..., :shift] = x[..., -shift:]
        out[..., shift:] = x[..., -1:]
    return out


def augment(
    x: torch.Tensor,
    train: bool,
    generator: torch.Generator | None = None,
    scale: float = 0.1,
    jitter: float = 0.02,
    max_shift: int = 100,
    **_,
) -> torch.Tensor:
    """``ModalitySpec.augment``: random per-channel scaling, jitter and time shift (training)."""
    if not train:
        return x
    x = x.float()
    channels = x.shape[-2]
    if scale:
        factors = 1 + scale * (2 * torch.rand(channels, generator=generator) - 1)
        x = x * factors.view(channels, 1)
    if jitter:
        noise = torch.randn(x.shape, generator=generator)
        x = x + noise * jitter * x.std(-1, correction=0, keepdim=True)
    max_shift = min(int(max_shift), x.shape[-1] - 1)
    if max_shift > 0:
        x = time_shift(x, int(torch.randint(-max_shift, max_shift + 1, (1,), generator=generator)))
    return x


# ------------------------------------------------------------------------------ ImageBind


def stem_from_weights(name: str, proj, proj_key: str, tokens: int, preprocess, stride):
    """ImageBind's IMU stem: a Linear over windows of C channels x ``window`` steps."""
    if proj.ndim != 2:
        raise ImageBindCheckpointError(
            f"{name}: {proj_key} has shape {list(proj.shape)}; expected a Linear [width, C*window]"
        )
    channels = int(preprocess.get("channels", PREPROCESS["channels"]))
    if proj.shape[1] % channels:
        raise ImageBindCheckpointError(
            f"{name}: {proj_key} takes {proj.shape[1]} values per window, not a multiple of "
            f"{channels} channels; pass preprocess={{'{name}': {{'channels': ...}}}}"
        )
    window = proj.shape[1] // channels
    length = int(preprocess.get("length", tokens * window))
    if length % window or length // window != tokens:
        raise ImageBindCheckpointError(
            f"{name}: length {length} in windows of {window} gives {length // window} tokens; "
            f"the checkpoint's position table has {tokens}"
        )
    return {"window": window}, {"channels": channels, "length": length}


register_modality(
    ModalitySpec(
        name="imu",
        temperature=0.2,
        sizes=SIZES,
        build_stem=build_stem,
        sample_ndim=2,
        head_dropout=0.5,
        preprocess=dict(PREPROCESS),
        load=load,
        augment=augment,
        description="6-axis IMU, 250 windows of 8 steps",
        imagebind=ImageBindBranch(
            stem="imu_stem",
            heads=8,
            stem_type=LinearWindowStem,
            stem_from_weights=stem_from_weights,
            head_index=3,  # after a Dropout
            # ImageBind's IMU preprocessor owns its positional table; ports that route it
            # through the helper module of the other modalities re-save it under that name.
            pos_embed="pos_embed",
            pos_embed_aliases=("pos_embedding_helper.pos_embed",),
        ),
    )
)
