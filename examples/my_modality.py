"""my_sensor: a complete new modality in one file. Copy it, rename the modality, edit.

Train it without touching the library (``modality_file`` imports this file, which registers the
modality and its demo dataset):

    accelerate launch train/align.py modality_file=examples/my_modality.py modality=my_sensor \
        data.dataset=my_sensor_demo

and on your own recordings, one ``.npy`` file [channels, T] per sample, paired with an image, via
the generic manifest dataset (columns ``vision`` and ``my_sensor``, paths relative to the root):

    accelerate launch train/align.py modality_file=examples/my_modality.py modality=my_sensor \
        data.dataset=manifest data.root=DATA data.options.manifest=train.csv \
        data.options.eval_manifest=test.csv 'data.options.classnames=[walking, running]'

The saved model carries a copy of this file (``model/modality.py``), which
``imagebind_lite.checkpoint.load_run(RUN, trust_code=True)`` imports to rebuild the encoder (a
model folder's code never runs without ``trust_code``).

The parts: (1) preprocessing defaults, (2) the file reader, (3) augmentation, (4) the stem,
(5) the sizes and ``register_modality``, (6) optionally, a dataset (``register_dataset``) with
its evaluation mode. The trunk, the head (LayerNorm -> CLS -> Linear into the anchor's
dimension), the loss, the training loop, checkpoints, zero-shot evaluation, the report and its
linear probe come from the library.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from imagebind_lite.data import avmnist
from imagebind_lite.data.datasets import DatasetBundle, EpochRandom, register_dataset
from imagebind_lite.modalities import ModalitySpec, register_modality

NAME = "my_sensor"

# (1) Preprocessing defaults. Configs override any of them (data.preprocess.length=1024); the
# values used are saved with the model, so evaluation and reloading read files the same way.
PREPROCESS = dict(
    channels=3,  # e.g. a 3-axis vibration sensor
    length=512,  # samples per window
    zscore=True,  # each channel of each window to zero mean, unit variance
    # augmentation (training only)
    gain=0.2,  # each channel times a factor in [1 - gain, 1 + gain]
    noise=0.05,  # Gaussian noise, in units of the (normalised) signal
)


# (2) The reader: path -> one sample tensor. It runs in data-loader workers; raise with the file
# name in the message (the manifest dataset counts and logs unreadable files as bad input).
def fit_window(x: torch.Tensor, length: int, zscore: bool) -> torch.Tensor:
    """[channels, T] -> [channels, length]: the centre of a longer recording, a shorter one
    zero-padded at the end (after normalising, so the padding sits at the channel mean)."""
    if x.shape[-1] > length:
        start = (x.shape[-1] - length) // 2
        x = x[:, start : start + length]
    if zscore:
        x = (x - x.mean(-1, keepdim=True)) / x.std(-1, correction=0, keepdim=True).clamp_min(1e-6)
    return F.pad(x, (0, length - x.shape[-1])).contiguous()


def load(path, channels: int = 3, length: int = 512, zscore: bool = True, **_) -> torch.Tensor:
    path = Path(path)
    array = np.load(path, allow_pickle=False)  # never unpickle a data file
    if array.ndim != 2 or channels not in array.shape:
        raise ValueError(f"{path}: expected [{channels}, T] or [T, {channels}], got {array.shape}")
    if array.shape[0] != channels:
        array = array.T
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if x.shape[-1] == 0 or not torch.isfinite(x).all():
        raise ValueError(f"{path}: empty, or holds NaN/infinite values")
    return fit_window(x, length, zscore)


# (3) Augmentation: (tensor, train, generator, **options) -> tensor. Draw every random number
# from ``generator``: datasets pass one seeded by (seed, epoch, index) (EpochRandom), which makes
# augmentation identical on every rank and after a resume.
def augment(
    x: torch.Tensor,
    train: bool,
    generator: torch.Generator | None = None,
    gain: float = 0.2,
    noise: float = 0.05,
    **_,
) -> torch.Tensor:
    if not train:
        return x
    factors = 1 + gain * (2 * torch.rand(x.shape[-2], 1, generator=generator) - 1)
    return x * factors + noise * torch.randn(x.shape, generator=generator)


# (4) The stem: raw sample -> tokens [B, num_tokens, width]. It must expose ``num_tokens``: the
# encoder sizes its positional embedding from it.
class PatchStem1d(nn.Module):
    """Non-overlapping patches of ``patch`` steps through a Conv1d, then LayerNorm."""

    def __init__(self, channels: int, width: int, length: int, patch: int):
        super().__init__()
        if length % patch:
            raise ValueError(f"{NAME}: length {length} is not a multiple of the patch {patch}")
        self.channels, self.length = channels, length
        self.num_tokens = length // patch
        self.proj = nn.Conv1d(channels, width, kernel_size=patch, stride=patch, bias=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != (self.channels, self.length):
            raise ValueError(
                f"{NAME}: expected input [B, {self.channels}, {self.length}], got {list(x.shape)}"
            )
        return self.norm(self.proj(x).transpose(1, 2))


def build_stem(size: dict, options: dict) -> PatchStem1d:
    # ``size``: the named size's fields (with encoder.overrides); ``options``: the preprocessing.
    return PatchStem1d(options["channels"], size["width"], options["length"], size["patch"])


# (5) Sizes and registration. Each size needs width, depth, heads (mlp_ratio, drop_path
# optional) plus whatever build_stem reads; choose one with encoder.size=NAME.
register_modality(
    ModalitySpec(
        name=NAME,
        temperature=0.1,  # fixed InfoNCE temperature (ImageBind: 0.05 audio ... 0.2 depth/IMU)
        sizes={
            "tiny": dict(width=64, depth=2, heads=2, mlp_ratio=2.0, patch=16),  # CPU minutes
            "base": dict(width=512, depth=6, heads=8, drop_path=0.1, patch=16),
        },
        build_stem=build_stem,
        sample_ndim=2,  # one sample is [channels, length]
        preprocess=PREPROCESS,
        load=load,
        augment=augment,
        description="3-axis vibration windows (examples/my_modality.py)",
    )
)


# (6) Optional: a dataset of your own, when a manifest does not fit. A builder gets the config,
# the frozen anchor and this modality's spec, and returns a DatasetBundle. Training samples are
# dicts: "vision" (the paired image in the anchor's input form), the modality's tensor under its
# name, "label" (int, -1 if none) and "id". With classnames, evaluation is zero-shot
# classification against text prompts; without, retrieval against the evaluation images.
# A dataset says how evaluation reads it: ``eval_mode()`` returns a view of the same items
# without augmentation (the report's linear probe embeds the training split through it).
#
# This demo makes signals whose frequency says a digit and pairs each with a real handwritten
# digit image of the same digit (UCI digits, shipped with the package). The encoder never sees
# text, yet afterwards it names the digit of a signal through the anchor's text tower.
def synth_signal(digit: int, options: dict, g: torch.Generator) -> torch.Tensor:
    channels, length = options["channels"], options["length"]
    t = torch.arange(length, dtype=torch.float32) / length
    cycles = 6 + 4 * digit  # 6 .. 42 cycles per window
    phase = 2 * torch.pi * torch.rand(channels, 1, generator=g)
    amplitude = 0.5 + torch.rand(channels, 1, generator=g)
    x = amplitude * torch.sin(2 * torch.pi * cycles * t + phase)
    x = x + 0.3 * torch.randn(channels, length, generator=g)
    return fit_window(x, length, options["zscore"])


class DemoPairs(EpochRandom, Dataset):
    def __init__(
        self,
        size: int,
        options: dict,
        train: bool,
        seed: int,
        images: torch.Tensor | None = None,
        image_labels: torch.Tensor | None = None,
    ):
        self.size, self.options, self.train, self.seed = size, options, train, seed
        self.augmenting = train  # off in the evaluation mode of the training split
        self.images = images
        if images is not None:
            self.by_digit = [torch.nonzero(image_labels == d).flatten() for d in range(10)]

    def eval_mode(self) -> DemoPairs:
        """The same items without augmentation: each signal drawn once, never augmented."""
        view = copy.copy(self)
        view.augmenting = False
        return view

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        # Training draws new noise every epoch; evaluation samples are fixed (and the training
        # split's, in its evaluation mode, are others than the test split's).
        if self.augmenting:
            g = self.generator(index)
        else:
            g = torch.Generator().manual_seed((2 if self.train else 1) * 10**6 + index)
        digit = index % 10
        x = synth_signal(digit, self.options, g)
        sample = {
            NAME: augment(x, self.augmenting, generator=g, **self.options),
            "label": digit,
            "id": f"{'train' if self.train else 'test'}-{index}",
        }
        if self.images is not None:
            choices = self.by_digit[digit]
            pick = int(choices[torch.randint(len(choices), (1,), generator=g)])
            sample["vision"] = self.images[pick]
        return sample


@register_dataset("my_sensor_demo")
def build_demo(cfg, anchor, spec) -> DatasetBundle:
    options = {**spec.preprocess, **cfg.data.preprocess}
    train_size = int(cfg.data.options.get("train_size", 2000))
    test_size = int(cfg.data.options.get("test_size", 500))
    images, labels = avmnist.load_digit_images()
    # The same held-out images the shipped anchor was fine-tuned without; training pairs use
    # only the others.
    keep = avmnist.image_split(len(images))
    pixels = anchor.normalize_pixels(avmnist.digits_to_pixels(images[keep], anchor.image_size[0]))
    return DatasetBundle(
        train=DemoPairs(train_size, options, True, cfg.seed, pixels, labels[keep]),
        eval=DemoPairs(test_size, options, False, cfg.seed),
        classnames=avmnist.DIGIT_NAMES,
        templates=avmnist.DIGIT_TEMPLATES,
        info={"train_pairs": train_size, "test_signals": test_size, "synthetic_signals": True},
    )
