"""Bad input: classify unusable files, then skip (replace and count) or raise (``data.bad_input``).

Readers raise :class:`~imagebind_lite.data.datasets.BadSample` with one of these reasons, and a
message that starts with the file name:

``missing``       the file does not exist, or the manifest row has no path for a needed modality
``empty``         a zero-byte file; audio with no samples; a depth map without one valid pixel; a
                  constant (flat) thermal image, which carries no signal
``unreadable``    corrupt, truncated or undecodable (any decoder error)
``silent``        audio whose samples are all zero (digital silence: every fbank bin is the floor)
``nan``           NaN or infinite values, in the file or in the finished tensor
``wrong_shape``   a shape no sensible rule can fix: an image smaller than ``min_size`` pixels on a
                  side (default 8, e.g. a 1x1 placeholder), a 1-bit image given as thermal, an
                  8-bit or colour PNG given as 16-bit depth, a false-colour (palette-mapped)
                  thermal image. Cases with one obvious meaning are converted instead: a grey
                  image stored as RGB (the three channels equal, as thermal JPGs usually are)
                  becomes one channel; a grey or RGBA photo given as ``vision`` becomes RGB.
``outside_root``  a path that resolves outside the dataset root: ``../``, an absolute path
                  elsewhere, or a symlink pointing out. Refused, never read.

Policy (:class:`BadInputDataset`):

``skip``   the bad sample is replaced by another index drawn from the sample's
           :class:`EpochRandom` generator (so a resumed run replaces it identically), and the
           returned sample carries ``"skipped": {reason: count}``; the training loop sums these
           into ``metrics.json`` (``skipped``, ``skipped_total``). A file is counted each time it
           is drawn. The first ``max_logs`` bad files are logged by name (per process: each
           DataLoader worker logs its own). After ``max_consecutive`` bad samples in a row the
           dataset gives up with :class:`BadInputError`, so a broken dataset never loops forever.
``raise``  the first bad sample stops the run with :class:`BadInputError` naming the file, the
           reason and what is wrong.

Never silently train on garbage: every floating-point tensor of a finished sample is checked
for NaN/inf, whichever reader produced it. Exceptions that are not ``BadSample`` (bugs) are never
swallowed.
"""

from __future__ import annotations

import copy
import io
import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .datasets import BadSample, EpochRandom, eval_mode

REASONS = ("missing", "empty", "unreadable", "silent", "nan", "wrong_shape", "outside_root")
POLICIES = ("skip", "raise")

log = logging.getLogger("imagebind_lite.data")


class BadInputError(RuntimeError):
    """A bad sample under ``data.bad_input=raise``, or too many bad samples in a row."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Blob:
    """File contents that did not come from the file system (e.g. a tar shard member)."""

    name: str  # for messages and format detection by extension
    data: bytes


Source = Path | Blob


def source_name(source: Source) -> str:
    return source.name if isinstance(source, Blob) else str(source)


def read_bytes(source: Source) -> bytes:
    """All bytes of a file or blob; ``missing`` and ``empty`` are told apart from ``unreadable``."""
    if isinstance(source, Blob):
        data = source.data
    else:
        try:
            data = Path(source).read_bytes()
        except FileNotFoundError:
            raise BadSample("missing", f"{source}: file not found") from None
        except IsADirectoryError:
            raise BadSample("unreadable", f"{source}: is a folder, not a file") from None
        except OSError as err:
            raise BadSample("unreadable", f"{source}: cannot be read ({err})") from None
    if not data:
        raise BadSample("empty", f"{source_name(source)}: empty file (0 bytes)")
    return data


def open_stream(source: Source) -> BinaryIO:
    return io.BytesIO(read_bytes(source))


def open_image(source: Source):
    """A fully decoded PIL image. Truncated or undecodable data is ``unreadable``."""
    data = read_bytes(source)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decoding is lazy: a truncated file only fails here
    # PIL raises UnidentifiedImageError (an OSError) for unknown formats, OSError for truncated
    # data, and SyntaxError/ValueError/struct errors from some plugins on corrupt headers.
    except Exception as err:  # noqa: BLE001 - any decoder failure means this file is unusable
        # PIL's message for an unknown format names the in-memory stream, not the file.
        why = "not a known image format" if isinstance(err, UnidentifiedImageError) else err
        raise BadSample(
            "unreadable", f"{source_name(source)}: cannot be decoded as an image ({why})"
        ) from None
    return image


def check_min_size(height: int, width: int, min_size: int, name: str) -> None:
    if height < min_size or width < min_size:
        raise BadSample(
            "wrong_shape",
            f"{name}: image is {width}x{height}, smaller than the minimum {min_size} pixels a side",
        )


def check_finite(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise BadSample("nan", f"{name}: contains NaN or infinite values")
    return x


def resolve_inside(root: Path, path: str | Path) -> Path:
    """``root / path`` with symlinks resolved; ``outside_root`` unless it stays under ``root``."""
    root = Path(root).resolve()
    candidate = Path(path)
    full = candidate if candidate.is_absolute() else root / candidate
    # resolve() follows every symlink on the way, so a link inside root that points out is caught.
    resolved = full.resolve()
    if not resolved.is_relative_to(root):
        raise BadSample(
            "outside_root", f"{path}: resolves to {resolved}, outside the dataset root {root}"
        )
    return resolved


CACHE_PROTOCOL = ("anchor_view_ids", "anchor_input", "use_anchor_views", "max_anchor_views")


class BadInputDataset(EpochRandom, Dataset):
    """Apply the bad-input policy to a map-style dataset whose ``__getitem__`` may raise
    ``BadSample``. ``set_epoch`` is passed on so that the inner augmentation follows the epoch."""

    def __init__(
        self,
        dataset: Dataset,
        policy: str = "skip",
        seed: int = 0,
        max_consecutive: int = 50,
        max_logs: int = 20,
        name: str = "train",
        remember_bad: bool = True,
    ):
        if policy not in POLICIES:
            raise ValueError(f"bad-input policy must be one of {POLICIES}, got {policy!r}")
        self.dataset = dataset
        self.policy = policy
        self.seed = seed
        self.max_consecutive = int(max_consecutive)
        self.max_logs = int(max_logs)
        self.name = name
        # Counts of every replacement this process made; the eval split reports them in
        # metrics.json through DatasetBundle.info (eval runs in the main process).
        self.counts: Counter = Counter()
        self._logged = 0
        # A bad index stays bad: remember it so that a corrupt file is not decoded again.
        # Replacement draws do not depend on this cache, so results stay deterministic.
        self._known_bad: dict[int, BadSample] = {}
        # Off for streams, where an index names no fixed sample.
        self.remember_bad = remember_bad

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def eval_mode(self) -> BadInputDataset:
        """The same policy over the inner dataset's evaluation mode. Replacements are still
        drawn and counted (into the same ``counts``); bad indices are remembered afresh."""
        view = copy.copy(self)
        view.dataset = eval_mode(self.dataset)
        view._known_bad = {}
        return view

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        # The anchor-cache protocol (imagebind_lite/cache.py) is the wrapped dataset's, when
        # it has one; anything else missing is missing.
        inner = self.__dict__.get("dataset")
        if name in CACHE_PROTOCOL and inner is not None:
            return getattr(inner, name)
        raise AttributeError(name)

    def _get(self, index: int) -> dict:
        if index in self._known_bad:
            raise self._known_bad[index]
        try:
            sample = self.dataset[index]
            name = str(sample.get("id", index))
            for key, value in sample.items():
                if isinstance(value, torch.Tensor):
                    check_finite(value, f"sample {name} ({key})")
        except BadSample as err:
            if self.remember_bad and len(self._known_bad) < 100_000:
                self._known_bad[index] = err
            raise
        return sample

    def _log(self, err: BadSample) -> None:
        if self._logged < self.max_logs:
            self._logged += 1
            suffix = (
                " (further bad inputs are counted, not logged)"
                if (self._logged == self.max_logs)
                else ""
            )
            log.warning("%s: skipping bad input [%s] %s%s", self.name, err.reason, err, suffix)

    def __getitem__(self, index: int) -> dict:
        if self.policy == "raise":
            try:
                return self._get(index)
            except BadSample as err:
                raise BadInputError(
                    f"bad input [{err.reason}] {err} (data.bad_input=raise; use skip to replace "
                    f"and count bad samples)",
                    err.reason,
                ) from None
        skipped: Counter = Counter()
        tried = {index}
        current, g = index, None
        last: BadSample | None = None
        for _ in range(self.max_consecutive + 1):
            try:
                sample = self._get(current)
            except BadSample as err:
                last = err
                skipped[err.reason] += 1
                self.counts[err.reason] += 1
                self._log(err)
                if g is None:
                    g = self.generator(index)
                current = self._draw(g, tried)
                if current is None:
                    break
                tried.add(current)
                continue
            if skipped:
                merged = Counter(sample.get("skipped", {}))
                merged.update(skipped)
                sample["skipped"] = dict(merged)
            return sample
        reasons = ", ".join(f"{k}: {v}" for k, v in skipped.most_common())
        raise BadInputError(
            f"{self.name}: gave up after {sum(skipped.values())} bad samples in a row ({reasons}); "
            f"last: {last}. The dataset looks broken: check data.root and the manifest paths.",
            last.reason if last else None,
        )

    def _draw(self, g: torch.Generator, tried: set[int]) -> int | None:
        n = len(self.dataset)
        if len(tried) >= n:
            return None
        # Rejection keeps the draw a pure function of the generator; with few untried indices
        # left the loop still ends quickly because ``tried`` is capped by max_consecutive.
        for _ in range(max(64, 4 * int(math.log2(n + 1)))):
            j = int(torch.randint(n, (1,), generator=g))
            if j not in tried:
                return j
        return next(j for j in range(n) if j not in tried)
