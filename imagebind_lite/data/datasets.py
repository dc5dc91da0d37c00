"""The dataset registry: a name in ``data.dataset`` -> a builder returning a ``DatasetBundle``.

Every training sample is a dict: ``"vision"`` (the paired image, already in the anchor's input
form), the trained modality's tensor under its own name, ``"label"`` (int, -1 when unlabelled)
and ``"id"`` (a stable sample id, the key of the anchor cache). Evaluation samples carry the
modality tensor, ``"label"`` and ``"id"``, and optionally ``"vision"``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset


@dataclass
class DatasetBundle:
    train: Dataset
    eval: Dataset | None = None
    classnames: list[str] | None = None  # zero-shot classification; None means retrieval only
    templates: list[str] | None = None  # prompt templates with one "{}" for the class name
    info: dict = field(default_factory=dict)  # split rules, sizes: written to metrics.json


_DATASETS: dict[str, Callable] = {}


def register_dataset(name: str):
    def wrap(builder: Callable) -> Callable:
        _DATASETS[name] = builder
        return builder

    return wrap


def get_dataset_builder(name: str) -> Callable:
    try:
        return _DATASETS[name]
    except KeyError:
        raise KeyError(
            f"unknown dataset {name!r}; registered: {', '.join(sorted(_DATASETS))}"
        ) from None


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


class BadSample(ValueError):
    """A sample that cannot be used; ``reason`` is a short category for the skip counts."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class EpochRandom:
    """Per-sample randomness (pairing, augmentation) drawn from a generator seeded by
    (seed, epoch, index): the same on every rank and worker, and after a resume."""

    seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def generator(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(
            (self.seed * 1_000_003 + self.epoch) * 10_000_019 + index
        )


def collate(samples: list[dict]) -> dict:
    """Stack tensors, keep ids as a list, and sum the skip counters of replaced samples."""
    batch: dict = {}
    skipped: Counter = Counter()
    for sample in samples:
        skipped.update(sample.get("skipped", {}))
    for key in samples[0]:
        if key == "skipped":
            continue
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], (int, float)):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    batch["skipped"] = dict(skipped)
    return batch


# Built-in datasets register themselves on import.
from . import adapters, avmnist, manifest, pendigits, scenes, shards  # noqa: E402,F401
