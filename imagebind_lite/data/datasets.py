"""What every dataset shares: the bundle a builder returns, bad samples, per-sample randomness,
the evaluation mode, and batching. A leaf of the data layer (it imports only the dataset
registry, whose names it re-exports: ``register_dataset``, ``get_dataset_builder``,
``list_datasets``).

Every training sample is a dict: ``"vision"`` (the paired image, already in the anchor's input
form), the trained modality's tensor under its own name, ``"label"`` (int, -1 when unlabelled)
and ``"id"`` (a stable sample id, the key of the anchor cache). Evaluation samples carry the
modality tensor, ``"label"`` and ``"id"``, and optionally ``"vision"``.

Evaluation mode. Every dataset class implements ``eval_mode() -> Dataset``: the same samples as
evaluation reads them (no augmentation; no random flip, shift, warp or crop: centre crops), as a
new object that shares the data and leaves the dataset itself as it was, so a training split can
be embedded for a probe while it keeps training. A dataset without training randomness returns
itself; a wrapper returns a wrapper of its inner dataset's evaluation mode. Call it through
:func:`eval_mode`, which refuses a dataset that does not say how.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from .registry import dataset_modalities, get_dataset_builder, list_datasets, register_dataset

__all__ = [
    "BadSample",
    "DatasetBundle",
    "EpochRandom",
    "collate",
    "dataset_modalities",
    "eval_mode",
    "get_dataset_builder",
    "list_datasets",
    "register_dataset",
]


@dataclass
class DatasetBundle:
    train: Dataset
    eval: Dataset | None = None
    classnames: list[str] | None = None  # zero-shot classification; None means retrieval only
    templates: list[str] | None = None  # prompt templates with one "{}" for the class name
    info: dict = field(default_factory=dict)  # split rules, sizes: written to metrics.json


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


def eval_mode(dataset) -> Dataset:
    """``dataset.eval_mode()``: the dataset's samples as evaluation reads them (see above)."""
    method = getattr(dataset, "eval_mode", None)
    if not callable(method):
        raise TypeError(
            f"{type(dataset).__name__} has no eval_mode(): a dataset says how it is read for "
            f"evaluation (no augmentation, no random pairing draws that change the input) by "
            f"returning such a view of itself (imagebind_lite/data/datasets.py)"
        )
    return method()


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
