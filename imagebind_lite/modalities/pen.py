"""Pen: handwriting trajectories (a tablet's x, y points, stroke by stroke) as [5, 64] series.

A modality in one file, shaped like ``imu.py``: the stem, the sizes, the file reader, the
preprocessing defaults and the augmentation are here. The reader of the UNIPEN text format is
``imagebind_lite.data.pendigits.read_unipen``; the shipped data set is UCI pendigits
(``data.dataset=pendigits``).

Input: a float tensor [channels, length] = [5, 64]. The strokes' points are concatenated in
writing order, centred on their mean, divided by their largest absolute coordinate (the aspect
ratio is kept, the digit fits in [-1, 1]), and resampled linearly to ``length`` steps. Channels:
x, y, ``delta_scale`` x the step-to-step change of x and of y (0 at the first step), and a pen-lift
flag: 1 at the step where each stroke after the first begins, else 0.

Files (``load``): a UNIPEN file (plain or gzip) holding one digit; a problem raises
``UnipenError`` (a ``ValueError``) naming the file.

Preprocessing options (``data.preprocess``; saved with the model):

``length``       64 time steps
``resample``     ``time``: steps equally spaced in time (the tablet samples every 100 ms: in
                 point order); ``arc``: equally spaced along the pen's path (speed-invariant)
``delta_scale``  10: the deltas of a 64-step digit are of order 0.05; x10 puts them near x, y

Augmentation (training only; every draw from the ``generator`` the dataset passes, which
``EpochRandom`` seeds by (seed, epoch, index), so resume and multi-process runs stay
deterministic): a random linear map of the plane applied to (x, y) and to the deltas alike (the
deltas of a linearly mapped path are the mapped deltas): ``scale`` (x and y each times a factor in
[1 - scale, 1 + scale]), ``rotate`` (degrees either way), ``shear`` (x += s y, s in [-shear,
shear]); then Gaussian ``noise`` (std, in the normalised units) on the four coordinate channels.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from imagebind_lite.data.pendigits import UnipenError, read_unipen, to_tensor
from imagebind_lite.modalities import ModalitySpec, register_modality
from imagebind_lite.models.encoder import LinearWindowStem

CHANNELS = 5  # x, y, dx, dy, pen lift
PREPROCESS = dict(
    length=64,
    resample="time",
    delta_scale=10.0,
    # augmentation
    scale=0.0,
    rotate=0.0,
    shear=0.0,
    noise=0.02,
)


# ------------------------------------------------------------------------------ stem and sizes


class ConvSeriesStem(nn.Module):
    """Conv1d layers (kernel ``kernel``, GELU) over a [B, C, T] series, then a 1x1 projection to
    the width and LayerNorm: T / prod(strides) tokens that each see a stretch of the stroke."""

    def __init__(self, in_chans, width, length, channels, strides, kernel=5):
        super().__init__()
        if len(channels) != len(strides):
            raise ValueError(f"conv_channels {channels} and conv_strides {strides} differ in size")
        self.in_chans, self.length = in_chans, length
        layers, prev, steps = [], in_chans, length
        for ch, stride in zip(channels, strides):
            layers += [nn.Conv1d(prev, ch, kernel, stride=stride, padding=kernel // 2), nn.GELU()]
            prev, steps = ch, (steps + 2 * (kernel // 2) - kernel) // stride + 1
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv1d(prev, width, 1)
        self.norm = nn.LayerNorm(width, eps=1e-5)
        self.num_tokens = steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != (self.in_chans, self.length):
            raise ValueError(
                f"expected input of shape [B, {self.in_chans}, {self.length}], got {list(x.shape)}"
            )
        return self.norm(self.proj(self.convs(x)).transpose(1, 2))


def build_stem(size: dict, options: dict) -> nn.Module:
    # IMU's stem fits too (size field ``window``: 4 steps -> 16 tokens). On pendigits it scored
    # one point lower for 25% less compute; the convolutions are the default.
    if "window" in size:
        return LinearWindowStem(CHANNELS, size["width"], options["length"], size["window"])
    return ConvSeriesStem(
        CHANNELS,
        size["width"],
        options["length"],
        list(size["conv_channels"]),
        list(size["conv_strides"]),
        size.get("conv_kernel", 5),
    )


SIZES = {
    # CPU-sized: one epoch of pendigits takes seconds on two cores; 64 steps -> 16 tokens.
    "tiny": dict(
        width=128, depth=2, heads=4, mlp_ratio=2.0, conv_channels=[128, 128], conv_strides=[2, 2]
    ),
    "base": dict(
        width=256,
        depth=6,
        heads=8,
        drop_path=0.1,
        conv_channels=[128, 256, 256],
        conv_strides=[1, 2, 2],
    ),
}


# ------------------------------------------------------------------------------ preprocessing


def load(path, **options) -> torch.Tensor:
    """``ModalitySpec.load``: a UNIPEN file holding one digit -> [5, length]."""
    digits = read_unipen(path)
    if len(digits) != 1:
        raise UnipenError(f"{path}: holds {len(digits)} digits; a pen sample file holds one")
    return to_tensor(digits[0].strokes, **options)


# ------------------------------------------------------------------------------ augmentation


def _uniform(generator, bound: float) -> float:
    return bound * (2 * float(torch.rand((), generator=generator)) - 1)


def augment(
    x: torch.Tensor,
    train: bool,
    generator: torch.Generator | None = None,
    scale: float = 0.0,
    rotate: float = 0.0,
    shear: float = 0.0,
    noise: float = 0.02,
    **_,
) -> torch.Tensor:
    """``ModalitySpec.augment``: random linear map of the plane, then noise (training only)."""
    if not train:
        return x
    x = x.float().clone()
    if scale or rotate or shear:
        sx, sy = 1 + _uniform(generator, scale), 1 + _uniform(generator, scale)
        angle = math.radians(_uniform(generator, rotate))
        s = _uniform(generator, shear)
        cos, sin = math.cos(angle), math.sin(angle)
        # rotation @ shear @ scale
        m = torch.tensor([[cos, -sin], [sin, cos]]) @ torch.tensor([[1.0, s], [0.0, 1.0]])
        m = m @ torch.diag(torch.tensor([sx, sy]))
        x[0:2] = m @ x[0:2]
        x[2:4] = m @ x[2:4]
    if noise:
        x[0:4] += noise * torch.randn((4, x.shape[-1]), generator=generator)
    return x


register_modality(
    ModalitySpec(
        name="pen",
        # 0.05 saturates the softmax while pen embeddings sit at cosine ~0.5 from their digit's
        # images: zero-shot still works, but pen and audio then retrieve each other poorly
        # through the anchor (docs/evaluation.md, "One space").
        temperature=0.1,
        sizes=SIZES,
        build_stem=build_stem,
        sample_ndim=2,
        preprocess=dict(PREPROCESS),
        load=load,
        augment=augment,
        description="pen trajectories: x, y, deltas, pen lift, resampled to 64 steps",
    )
)
