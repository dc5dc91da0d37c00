"""AV-MNIST-style world from real recordings: FSDD spoken digits paired with UCI handwritten
digit images of the same digit (a copy of both ships in ``assets/avmnist``, see ATTRIBUTION.md).

Splits: whole speakers are held out for the audio test set (``test_speakers``), and a fixed 20%
of the images (seed 0) is held out from the anchor's fine-tuning. Each training clip is paired
with a random training image of its digit, drawn again every time the clip is read, so the
audio encoder sees images only through the frozen anchor and never sees text. The images are
not augmented, so the builder embeds each once with the anchor (``EmbeddedImages``;
``data.options.embed_images: false`` sends pixels to the anchor every step instead).
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import weakref
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..anchor import ASSETS
from .audio import load_and_transform_audio
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


def valid_frames(path: Path, options: dict) -> int:
    """Number of real (not padded) fbank frames of a file's first clip."""
    info = sf.info(str(path))
    seconds = min(info.frames / info.samplerate, options["clip_duration"])
    samples = int(seconds * options["sample_rate"])
    return max(1, min(options["target_length"], 1 + (samples - 400) // 160))


def time_shift(
    feats: torch.Tensor, frames: int, max_shift: int, g: torch.Generator
) -> torch.Tensor:
    """Move the recording right by a random number of frames within its padding."""
    room = min(max_shift, feats.shape[-1] - frames)
    if room <= 0:
        return feats
    shift = int(torch.randint(0, room + 1, (1,), generator=g))
    return torch.roll(feats, shifts=shift, dims=-1)


def warp(
    feats: torch.Tensor, frames: int, max_freq: float, max_time: float, g: torch.Generator
) -> torch.Tensor:
    """Stretch the mel axis (vocal tract length perturbation) and the time axis (speaking rate)
    by random factors in [1 - max, 1 + max]: the variation between speakers that five training
    speakers cannot cover. Sizes are kept: the mel axis is cropped/padded at the top, the time
    axis within the padding."""
    bins, length = feats.shape[-2:]
    out = feats.reshape(-1, 1, bins, length)[..., :frames]
    alpha = 1 + max_freq * (2 * float(torch.rand((), generator=g)) - 1)
    beta = 1 + max_time * (2 * float(torch.rand((), generator=g)) - 1)
    new_bins = max(2, round(bins * alpha))
    new_frames = max(1, min(length, round(frames * beta)))
    out = torch.nn.functional.interpolate(
        out, size=(new_bins, new_frames), mode="bilinear", align_corners=False
    )
    out = out[..., :bins, :]
    out = torch.nn.functional.pad(out, (0, length - new_frames, 0, bins - out.shape[-2]))
    return out.reshape(feats.shape)


class PairedAudioImages(EpochRandom, Dataset):
    """Clips paired with a random image of the same digit on every read.

    Anchor-cache mode (``imagebind_lite.cache``): the images are not augmented, so each image is
    one view, keyed by ``image_ids``; in that mode a sample names its image under ``"view_id"``
    instead of carrying it under ``"vision"``, with the same random pairing.
    """

    max_anchor_views = 1
    anchor_views: int | None = None  # None: emit "vision"; an int: cache mode

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
        image_ids=None,
        frames=None,
        max_shift: int = 0,
        warp: tuple[float, float] = (0.0, 0.0),
    ):
        self.seed, self.frames, self.max_shift, self.warp = seed, frames, max_shift, warp
        self.features, self.labels, self.ids = features, labels, ids
        self.images = image_pixels
        self.by_digit = {d: torch.nonzero(image_labels == d).flatten() for d in range(10)}
        self.modality = modality
        self.augment = augment
        self.image_ids = list(image_ids or (f"image-{i}" for i in range(len(image_pixels))))
        self._image_row = {image_id: row for row, image_id in enumerate(self.image_ids)}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        g = self.generator(index)
        label = int(self.labels[index])
        choices = self.by_digit[label]
        pick = choices[torch.randint(len(choices), (1,), generator=g)]
        feats = self.features[index]
        if any(self.warp) and self.frames is not None:
            feats = warp(feats, int(self.frames[index]), *self.warp, g)
        if self.max_shift and self.frames is not None:
            feats = time_shift(feats, int(self.frames[index]), self.max_shift, g)
        if self.augment is not None:
            feats = self.augment(feats, generator=g)
        if self.anchor_views is not None:
            view = self.image_ids[int(pick)]
            return {self.modality: feats, "label": label, "id": self.ids[index], "view_id": view}
        image = self.images[pick].squeeze(0)
        return {"vision": image, self.modality: feats, "label": label, "id": self.ids[index]}

    def eval_mode(self) -> PairedAudioImages:
        """The clips as recorded: no warp, time shift or augmentation (the image pairing is
        still drawn per read, from the frozen epoch's generator)."""
        view = copy.copy(self)
        view.augment, view.max_shift, view.warp = None, 0, (0.0, 0.0)
        return view

    def use_anchor_views(self, views: int | None) -> None:
        self.anchor_views = views

    def anchor_view_ids(self, views: int = 1) -> list[str]:
        return list(self.image_ids)

    def anchor_input(self, view_id: str) -> torch.Tensor:
        return self.images[self._image_row[view_id]]


_EMBEDDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # anchor -> {key: embeddings}


def embed_images(anchor, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The frozen anchor's embeddings of ``pixels`` [N, 3, H, W] (float32, on the CPU), computed
    once per anchor: a bind run's audio and pen datasets pair with the same digit images, and
    the second asks for what the first computed (keyed by the pixels' bytes)."""
    key = hashlib.sha1(pixels.contiguous().numpy().tobytes()).hexdigest()
    done = _EMBEDDED.setdefault(anchor, {})
    if key not in done:
        chunks, device = [], next(anchor.model.parameters()).device
        with torch.no_grad():
            for i in range(0, len(pixels), batch_size):
                chunk = pixels[i : i + batch_size].to(device)
                chunks.append(anchor.encode_image(chunk).float().cpu())
        done[key] = torch.cat(chunks)
    return done[key]


class EmbeddedImages(Dataset):
    """A paired training set whose images are replaced by the frozen anchor's embeddings of them,
    computed once when the dataset is built (an in-memory anchor cache): the images are never
    augmented, so each has one embedding, and the anchor's image tower leaves the loop (two
    thirds of a CPU training step of the pen demo, a seventh of the audio demo's). Samples
    carry ``"anchor_embedding"`` instead of ``"vision"``; the pairing draws are the wrapped
    set's. It keeps the cache protocol of
    ``imagebind_lite.cache``, so ``train/cache_anchor.py`` and ``anchor.cache`` still work: once
    an on-disk cache takes over (``use_anchor_views``), samples name their view instead."""

    max_anchor_views = 1

    def __init__(self, dataset, anchor, batch_size: int = 256):
        self.dataset = dataset
        views = list(dataset.anchor_view_ids(1))
        self.row = {view: i for i, view in enumerate(views)}
        pixels = torch.stack([dataset.anchor_input(v) for v in views])
        self.embeddings = embed_images(anchor, pixels, batch_size)
        dataset.use_anchor_views(1)
        self.external = False

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def eval_mode(self) -> EmbeddedImages:
        view = copy.copy(self)
        view.dataset = self.dataset.eval_mode()
        return view

    def __getitem__(self, index: int) -> dict:
        sample = self.dataset[index]
        if not self.external:
            sample["anchor_embedding"] = self.embeddings[self.row[sample.pop("view_id")]]
        return sample

    def anchor_view_ids(self, views: int = 1) -> list[str]:
        return self.dataset.anchor_view_ids(views)

    def anchor_input(self, view_id: str) -> torch.Tensor:
        return self.dataset.anchor_input(view_id)

    def use_anchor_views(self, views: int | None) -> None:
        self.external = views is not None
        self.dataset.use_anchor_views(views if self.external else 1)


class ClipSet(Dataset):
    def __init__(self, features, labels, ids, modality):
        self.features, self.labels, self.ids, self.modality = features, labels, ids, modality

    def __len__(self) -> int:
        return len(self.labels)

    def eval_mode(self) -> ClipSet:
        return self  # fixed clips, nothing random

    def __getitem__(self, index: int) -> dict:
        return {
            self.modality: self.features[index],
            "label": int(self.labels[index]),
            "id": self.ids[index],
        }


# The clips are FSDD recordings read as fbank features (``valid_frames`` counts their frames).
@register_dataset("avmnist", modalities=("audio",))
def build_avmnist(cfg, anchor, spec) -> DatasetBundle:
    root = Path(cfg.data.root) if cfg.data.root else DEFAULT_ROOT
    test_speakers = tuple(cfg.data.options.get("test_speakers", DEFAULT_TEST_SPEAKERS))
    unknown = set(test_speakers) - set(SPEAKERS)
    if unknown:
        raise ValueError(f"data.options.test_speakers: unknown speakers {sorted(unknown)}")
    options = {**spec.preprocess, **cfg.data.preprocess}
    if (options.get("features_on") or "worker") != "worker":
        raise ValueError(
            "dataset avmnist: data.preprocess.features_on must be worker: it computes every "
            "clip's features once into memory (and its time_shift/freq_warp act on them), so "
            "there is no decoding to move to the device"
        )

    files = audio_files(root)
    # All files at once: the engine's thread pool (within torch's thread budget) decodes and
    # featurises them in parallel, with the same output as one file at a time.
    feats = load_and_transform_audio([path for path, _, _ in files], **options)
    frames = torch.tensor([valid_frames(path, options) for path, _, _ in files])
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
        return feats[idx], labels[idx], [ids[i] for i in idx], frames[idx]

    tr_feats, tr_labels, tr_ids, tr_frames = subset(~is_test)
    train = PairedAudioImages(
        tr_feats,
        tr_labels,
        tr_ids,
        pixels[train_images],
        image_labels[train_images],
        spec.name,
        augment,
        seed=cfg.seed,
        # Rows of the whole digit table: stable anchor-cache keys whatever the split.
        image_ids=[f"digit-image-{int(i)}" for i in torch.nonzero(train_images).flatten()],
        frames=tr_frames,
        max_shift=int(cfg.data.options.get("time_shift", 0)),
        warp=(
            float(cfg.data.options.get("freq_warp", 0)),
            float(cfg.data.options.get("time_warp", 0)),
        ),
    )
    if not cfg.anchor.cache and cfg.data.options.get("embed_images", True):
        train = EmbeddedImages(train, anchor)  # with anchor.cache, the trainer reads that cache
    test = ClipSet(*subset(is_test)[:3], spec.name)
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
