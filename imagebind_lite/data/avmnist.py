"""AV-MNIST-style world from real recordings: FSDD spoken digits paired with UCI handwritten
digit images of the same digit (a copy of both ships in ``assets/avmnist``, see ATTRIBUTION.md).

Splits: whole speakers are held out for the audio test set (``test_speakers``), and a fixed 20%
of the images (seed 0) is held out from the anchor's fine-tuning. Each training clip is paired
with a random training image of its digit, drawn again every time the clip is read, so the
audio encoder sees images only through the frozen anchor and never sees text.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..anchor import ASSETS
from .datasets import DatasetBundle, EpochRandom, register_dataset

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_TEMPLATES = [
    "a photo of the digit {}.",
    "the number {}.",
    "a handwritten {}.",
    "the digit {}.",
    "a drawing of the number {}.",
]
SPEAKERS = ["george", "jackson", "lucas", "nicolas", "theo", "yweweler"]
DEFAULT_TEST_SPEAKERS = ("george", "theo")
DEFAULT_ROOT = ASSETS / "avmnist"


def load_digit_images(root: Path = DEFAULT_ROOT) -> tuple[torch.Tensor, torch.Tensor]:
    """UCI digits -> (images [N, 8, 8] in [0, 1], labels [N])."""
    path = Path(root) / "digits.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"digit images not found: {path}")
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    images = torch.from_numpy(table[:, :64].reshape(-1, 8, 8) / 16.0)
    return images, torch.from_numpy(table[:, 64].astype(np.int64))


def image_split(num_images: int, held_out: float = 0.2, seed: int = 0) -> torch.Tensor:
    """Boolean mask of the training images; the same split for the anchor and for pairing."""
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    train = torch.ones(num_images, dtype=torch.bool)
    train[order[: int(round(num_images * held_out))]] = False
    return train


def digits_to_pixels(images: torch.Tensor, size: int = 32) -> torch.Tensor:
    """[N, 8, 8] in [0, 1] -> [N, 3, size, size] RGB pixels (white digit on black)."""
    up = F.interpolate(images.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
    return up.clamp(0, 1).expand(-1, 3, -1, -1).contiguous()


def audio_files(root: Path = DEFAULT_ROOT) -> list[tuple[Path, int, str]]:
    folder = Path(root) / "audio"
    files = sorted(folder.glob("*.flac")) + sorted(folder.glob("*.wav"))
    if not files:
        raise FileNotFoundError(f"no FSDD recordings (*.flac, *.wav) in {folder}")
    out = []
    for path in files:
        digit, speaker, _ = path.stem.split("_")
        out.append((path, int(digit), speaker))
    return out


class PairedAudioImages(EpochRandom, Dataset):
    """Clips paired with a random image of the same digit on every read."""

    def __init__(
        self,
        features,
        labels,
        ids,
        image_pixels,
        image_labels,
        modality,
        augment=None,
        seed: int = 0,
    ):
        self.seed = seed
        self.features, self.labels, self.ids = features, labels, ids
        self.images = image_pixels
        self.by_digit = {d: torch.nonzero(image_labels == d).flatten() for d in range(10)}
        self.modality = modality
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        g = self.generator(index)
        label = int(self.labels[index])
        choices = self.by_digit[label]
        image = self.images[choices[torch.randint(len(choices), (1,), generator=g)]].squeeze(0)
        feats = self.features[index]
        if self.augment is not None:
            feats = self.augment(feats, generator=g)
        return {"vision": image, self.modality: feats, "label": label, "id": self.ids[index]}


class ClipSet(Dataset):
    def __init__(self, features, labels, ids, modality):
        self.features, self.labels, self.ids, self.modality = features, labels, ids, modality

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {
            self.modality: self.features[index],
            "label": int(self.labels[index]),
            "id": self.ids[index],
        }


@register_dataset("avmnist")
def build_avmnist(cfg, anchor, spec) -> DatasetBundle:
    if spec.name != "audio":
        raise ValueError(f"dataset avmnist pairs images with audio, not {spec.name!r}")
    root = Path(cfg.data.root) if cfg.data.root else DEFAULT_ROOT
    test_speakers = tuple(cfg.data.options.get("test_speakers", DEFAULT_TEST_SPEAKERS))
    unknown = set(test_speakers) - set(SPEAKERS)
    if unknown:
        raise ValueError(f"data.options.test_speakers: unknown speakers {sorted(unknown)}")
    options = {**spec.preprocess, **cfg.data.preprocess}

    files = audio_files(root)
    feats = torch.stack([spec.load(path, **options) for path, _, _ in files])
    labels = torch.tensor([digit for _, digit, _ in files])
    ids = [path.stem for path, _, _ in files]
    is_test = torch.tensor([speaker in test_speakers for _, _, speaker in files])

    images, image_labels = load_digit_images(root)
    train_images = image_split(len(images))
    pixels = anchor.normalize_pixels(digits_to_pixels(images, anchor.image_size[0]))

    def augment(x, generator=None):
        return spec.augment(x, train=True, generator=generator, **options)

    def subset(mask):
        idx = torch.nonzero(mask).flatten()
        return feats[idx], labels[idx], [ids[i] for i in idx]

    train = PairedAudioImages(
        *subset(~is_test),
        pixels[train_images],
        image_labels[train_images],
        "audio",
        augment,
        seed=cfg.seed,
    )
    test = ClipSet(*subset(is_test), "audio")
    return DatasetBundle(
        train=train,
        eval=test,
        classnames=DIGIT_NAMES,
        templates=DIGIT_TEMPLATES,
        info={
            "test_speakers": list(test_speakers),
            "train_clips": len(train),
            "test_clips": len(test),
            "train_images": int(train_images.sum()),
        },
    )
