"""Manifest datasets: one CSV or JSONL row per pair of files under a dataset root, for any
registered modality.

Columns (CSV header / JSONL keys):

``id``            optional stable sample id (the anchor-cache key); default: the row index
``vision``, ``audio``, ``depth``, ``thermal``, ... one path column per registered modality
``intrinsics``    optional path to a camera matrix (depth: the focal length for disparity)
``label``         optional: an int, a class name, or several (``a;b`` in CSV, a list in JSONL)
``caption``       optional text (``caption_1`` .. ``caption_N`` columns or a JSONL list also work)
``split``, ``fold``  optional: which rows train and which evaluate
``fx``, ``baseline``, ``box``  optional per-row numbers (depth focal length in pixels, sensor
                  baseline in metres or a sensor name, a crop box ``x0 y0 x1 y1`` in pixels of
                  the RGB image); any other column is kept in ``Record.meta`` as text

Paths are relative to the dataset root and must resolve inside it (``../``, absolute paths
elsewhere and symlinks pointing out are refused as ``outside_root`` bad input). Class names
come from ``data.options.classnames``, else ``classes.txt`` beside the manifest (one per line),
else the sorted set of the string labels found; integer labels index the class list.

The registered dataset ``manifest``::

    data.dataset=manifest data.root=ROOT data.options.manifest=train.csv
    data.options.eval_manifest=test.csv          # or rows with split / fold, see below
    data.options.classnames=[...]  data.options.templates=["a photo of a {}."]

Options: ``manifest`` (required), ``eval_manifest``, ``train_split``/``eval_split`` (defaults
``train``/``test``, used when rows carry a split), ``eval_fold`` (rows of that fold evaluate, the
others train), ``classnames``, ``templates``, ``stats`` (depth/thermal statistics file, default
``ROOT/stats.json``), ``max_consecutive_bad`` (50), ``max_logged_bad`` (20).

Samples: vision is the anchor's input form. A modality whose spec has ``read_aligned`` (depth,
thermal: an image aligned with the RGB frame) is loaded together with the RGB image and both are
cropped/flipped identically (``transforms.PairedTransform``), the sensor side standardised by the
spec's ``normaliser`` with the training-set statistics (``stats_options``; also written into
``data.preprocess`` so the saved model carries them). Any other modality goes through its spec's
``load_source(source, preprocess)`` when it has one (audio: bad-input reasons, silence), else
``load(path, **preprocess)``, and, in training, ``augment``; vision through ``anchor.preprocess``.
Every sample passes the bad-input policy of ``data.bad_input`` (``bad_input.py``).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import Dataset

from ..files import parse_key_values  # noqa: F401 - the scripts' KEY=VALUE options
from ..registry import get_modality, list_modalities
from . import audio as audio_data
from . import bad_input as bi
from .adapters import Record, read_layout
from .datasets import BadSample, DatasetBundle, EpochRandom, register_dataset
from .transforms import (
    FULL_BOX,
    STATS_FILE,
    PairedTransform,
    RunningStats,
    pixel_box_to_relative,
    read_stats,
    stats_command,
)

CLASSES_FILE = "classes.txt"
EXTRA_PATHS = ("intrinsics",)
_FIELDS = ("id", "label", "caption", "captions", "split", "fold")


# --------------------------------------------------------------------------------------------
# Reading manifests


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """CSV (header row) or JSONL (one object per line) -> list of dicts."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not a JSON object ({err})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
        return rows
    # utf-8-sig: spreadsheet exports often start with a byte-order mark.
    with path.open(newline="", encoding="utf-8-sig") as handle:
        dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
        # DictReader files cells beyond the header under the key None: drop them.
        return [
            {k: v for k, v in row.items() if k is not None}
            for row in csv.DictReader(handle, dialect=dialect)
        ]


def read_classnames(path: str | Path) -> list[str]:
    return [
        line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def _blank(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _raw_labels(value) -> list | None:
    if _blank(value):
        return None
    if isinstance(value, list):
        return value
    if isinstance(value, str) and ";" in value:
        return [v.strip() for v in value.split(";") if v.strip()]
    return [value]


def _as_int(value):
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def _captions(row: dict) -> list[str]:
    out: list[str] = []
    for key in ("caption", "captions"):
        value = row.get(key)
        if isinstance(value, list):
            out.extend(str(v) for v in value if not _blank(v))
        elif not _blank(value):
            out.append(str(value))
    numbered = sorted(
        (k for k in row if k.startswith("caption_") and k[8:].isdigit()), key=lambda k: int(k[8:])
    )
    out.extend(str(row[k]) for k in numbered if not _blank(row[k]))
    return out


def _meta_value(key: str, value):
    if key == "box":
        parts = value if isinstance(value, list) else str(value).replace(",", " ").split()
        box = [float(v) for v in parts]
        if len(box) != 4:
            raise ValueError(f"box needs 4 numbers x0 y0 x1 y1, got {value!r}")
        return box
    if key == "fx":
        return float(value)
    if key == "baseline":
        try:
            return float(value)
        except ValueError:
            return str(value)  # a sensor name (kv1, realsense, ...)
    return value


def rows_to_records(
    rows: Sequence[dict],
    root: str | Path,
    classnames: list[str] | None = None,
    modalities: Sequence[str] | None = None,
    where: str = "manifest",
) -> tuple[list[Record], list[str] | None]:
    """Manifest rows -> (records with paths under ``root``, class names)."""
    # Absolute: a relative root would be joined again by resolve_inside (root/root/file).
    root = Path(root).absolute()
    path_keys = set(modalities or list_modalities()) | set(EXTRA_PATHS)
    raw = [_raw_labels(row.get("label")) for row in rows]
    if classnames is None:
        names = {v for labels in raw if labels for v in labels if _as_int(v) is None}
        classnames = sorted(str(v) for v in names) or None
    index = {name: i for i, name in enumerate(classnames or [])}
    records, seen = [], set()
    for n, (row, labels) in enumerate(zip(rows, raw)):
        rid = str(row["id"]) if not _blank(row.get("id")) else str(n)
        if rid in seen:
            raise ValueError(f"{where}: duplicate id {rid!r} (row {n}); ids must be unique")
        seen.add(rid)
        ints = []
        for value in labels or []:
            i = _as_int(value)
            if i is not None and i < 0:
                continue  # -1: unlabelled, as in the training samples
            if i is None:
                if str(value) not in index:
                    raise ValueError(
                        f"{where}: row {n} ({rid}): label {value!r} is not one of "
                        f"the {len(index)} class names"
                    )
                i = index[str(value)]
            elif classnames is not None and not 0 <= i < len(classnames):
                raise ValueError(
                    f"{where}: row {n} ({rid}): label {i} is outside the {len(classnames)} classes"
                )
            ints.append(i)
        multi = isinstance(row.get("label"), list) or ";" in str(row.get("label"))
        label = (ints if multi else ints[0]) if ints else None
        paths = {k: root / str(v) for k, v in row.items() if k in path_keys and not _blank(v)}
        meta = {}
        for key, value in row.items():
            if key in path_keys or key in _FIELDS or key.startswith("caption_") or _blank(value):
                continue
            try:
                meta[key] = _meta_value(key, value)
            except ValueError as err:
                raise ValueError(f"{where}: row {n} ({rid}): {key}: {err}") from None
        fold = _as_int(row.get("fold"))
        split = None if _blank(row.get("split")) else str(row["split"]).strip()
        records.append(Record(rid, paths, label, _captions(row), split, fold, meta))
    return records, classnames


def read_manifest(
    path: str | Path,
    root: str | Path | None = None,
    classnames: list[str] | None = None,
    modalities: Sequence[str] | None = None,
) -> tuple[list[Record], list[str] | None]:
    """A manifest file -> (records, class names). ``root`` defaults to the manifest's folder;
    ``classnames`` default to ``classes.txt`` beside the manifest."""
    path = Path(path)
    if classnames is None and (path.parent / CLASSES_FILE).is_file():
        classnames = read_classnames(path.parent / CLASSES_FILE)
    return rows_to_records(
        read_rows(path),
        root if root is not None else path.parent,
        classnames,
        modalities,
        where=str(path),
    )


# --------------------------------------------------------------------------------------------
# Turning a record's files into a sample


def image_to_tensor(image) -> torch.Tensor:
    """PIL image -> [3, H, W] float in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def _audio_reason(message: str) -> str:
    text = message.lower()
    if "no samples" in text:
        return "empty"
    if "nan" in text or "infinite" in text:
        return "nan"
    return "unreadable"


def read_waveform(source: bi.Source) -> tuple[torch.Tensor, int]:
    """Audio file or blob -> (waveform [channels, samples], rate) with bad-input reasons."""
    if isinstance(source, Path):
        if not source.exists():
            raise BadSample("missing", f"{source}: file not found")
        if source.is_file() and source.stat().st_size == 0:
            raise BadSample("empty", f"{source}: empty file (0 bytes)")
        try:
            return audio_data.read_audio(source)
        except audio_data.AudioReadError as err:
            raise BadSample(_audio_reason(str(err)), str(err)) from None
    data = bi.read_bytes(source)
    try:
        array, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as err:  # noqa: BLE001 - any decoder failure means this file is unusable
        raise BadSample("unreadable", f"{source.name}: cannot be read as audio ({err})") from None
    if array.size == 0:
        raise BadSample("empty", f"{source.name}: contains no samples")
    wav = bi.check_finite(torch.from_numpy(array.T.copy()), source.name)
    return wav, int(rate)


def sensor_values(modality: str, sources: dict, meta: dict, options: dict):
    """The raw values [1,H,W] and validity mask (or None) of one record's image aligned with
    the RGB frame (``ModalitySpec.read_aligned``: depth, thermal), with the record's own
    options (depth: ``fx``, ``baseline``, ``layout``) overriding ``options``."""
    spec = get_modality(modality)
    if spec.read_aligned is None:
        aligned = [n for n in list_modalities() if get_modality(n).read_aligned is not None]
        raise ValueError(
            f"{modality!r} is not an image aligned with the RGB frame ({', '.join(aligned)})"
        )
    return spec.read_aligned(sources, meta, options)


def compute_sensor_stats(
    modality: str,
    records: Sequence[Record],
    root: str | Path,
    options: dict | None = None,
    max_files: int | None = None,
    seed: int = 0,
) -> dict:
    """Mean/std of the raw depth/thermal values of ``records`` (valid pixels only), for
    ``stats.json``. Bad files are left out and counted; ``max_files`` takes a seeded subset."""
    spec = get_modality(modality)
    if spec.stats_options is None or spec.read_aligned is None:
        raise ValueError(f"modality {modality!r} takes no training-set statistics")
    options = {**spec.preprocess, **(options or {})}
    chosen = [r for r in records if modality in r.paths]
    if max_files is not None and len(chosen) > max_files:
        order = torch.randperm(len(chosen), generator=torch.Generator().manual_seed(seed))
        chosen = [chosen[int(i)] for i in order[:max_files]]
    if not chosen:
        raise ValueError(f"no records with {modality} files to compute statistics from")
    root = Path(root).resolve()
    stats, skipped, files = RunningStats(), {}, 0
    for record in chosen:
        try:
            sources = {
                k: bi.resolve_inside(root, p)
                for k, p in record.paths.items()
                if k in (modality, *EXTRA_PATHS)
            }
            values, valid = sensor_values(modality, sources, record.meta, options)
        except BadSample as err:
            skipped[err.reason] = skipped.get(err.reason, 0) + 1
            continue
        stats.update(values[valid] if valid is not None else values)
        files += 1
    if files == 0:
        raise ValueError(f"none of the {len(chosen)} {modality} files could be read: {skipped}")
    result = stats.result()
    return {
        "mean": result["mean"],
        "std": result["std"],
        "min": result["min"],
        "max": result["max"],
        "pixels": result["count"],
        "files": files,
        "skipped": skipped,
        "options": spec.stats_options(options),
    }


class PairSampler:
    """Loads the (vision, modality) pair of one record into tensors. Holds only what workers
    need from the anchor (its image transform, size and normalisation), not its weights."""

    def __init__(self, spec, preprocess: dict, anchor):
        self.spec = spec
        self.modality = spec.name
        self.preprocess = dict(preprocess)
        self.eval_preprocess = {k: v for k, v in self.preprocess.items() if k != "features_on"}
        self.vision_transform = anchor.preprocess
        self.rgb_size = tuple(anchor.image_size)
        self.rgb_mean = anchor.image_mean.view(3, 1, 1).clone()
        self.rgb_std = anchor.image_std.view(3, 1, 1).clone()
        self.min_size = int(self.preprocess.get("min_size", 8))
        self.paired = None
        if spec.read_aligned is not None:
            self.normalise = spec.normaliser(self.preprocess) if spec.normaliser else None
            size = int(self.preprocess.get("image_size", 224))
            self.paired = PairedTransform(
                self.rgb_size,
                (size, size),
                crop_scale=tuple(self.preprocess.get("crop_scale", (0.08, 1.0))),
                crop_ratio=tuple(self.preprocess.get("crop_ratio", (3 / 4, 4 / 3))),
                flip_p=float(self.preprocess.get("flip_p", 0.5)),
                erase_p=float(self.preprocess.get("erase_p", 0.25)),
            )

    def needs(self, vision: bool = True) -> tuple[str, ...]:
        return ("vision", self.modality) if vision else (self.modality,)

    def _rgb(self, source: bi.Source) -> torch.Tensor:
        image = bi.open_image(source)
        bi.check_min_size(image.height, image.width, self.min_size, bi.source_name(source))
        return image_to_tensor(image)

    def _vision(self, source: bi.Source) -> torch.Tensor:
        image = bi.open_image(source)
        bi.check_min_size(image.height, image.width, self.min_size, bi.source_name(source))
        return self.vision_transform(image.convert("RGB"))

    def _sensor(self, sources: dict, meta: dict):
        return self.spec.read_aligned(sources, meta, self.preprocess)

    def _modality(self, source: bi.Source, train: bool, generator) -> torch.Tensor:
        if self.spec.load_source is not None:
            # features_on: device applies to training batches; evaluation gets finished inputs.
            options = self.preprocess if train else self.eval_preprocess
            x = self.spec.load_source(source, options)
        else:
            x = self._spec_load(source)
        if train and self.spec.augment is not None:
            x = self.spec.augment(x, train=True, generator=generator, **self.preprocess)
        return x

    def _spec_load(self, source: bi.Source) -> torch.Tensor:
        if self.spec.load is None:
            raise ValueError(f"modality {self.modality!r} has no file reader (spec.load)")
        if isinstance(source, Path) and not source.exists():
            raise BadSample("missing", f"{source}: file not found")
        tmp = None
        try:
            if isinstance(source, bi.Blob):
                # spec.load reads paths; a shard member goes through a temporary file.
                fd, tmp = tempfile.mkstemp(suffix=Path(source.name).suffix)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(bi.read_bytes(source))
                path = Path(tmp)
            else:
                if source.is_file() and source.stat().st_size == 0:
                    raise BadSample("empty", f"{source}: empty file (0 bytes)")
                path = source
            return torch.as_tensor(self.spec.load(path, **self.preprocess))
        except BadSample:
            raise
        except Exception as err:  # noqa: BLE001 - a user reader failing on one file = bad input
            raise BadSample(
                "unreadable",
                f"{bi.source_name(source)}: {self.modality} reader "
                f"failed ({type(err).__name__}: {err})",
            ) from None
        finally:
            if tmp is not None:
                os.unlink(tmp)

    def __call__(
        self,
        sources: dict[str, bi.Source],
        meta: dict,
        train: bool,
        generator: torch.Generator | None,
    ) -> dict:
        """Tensors of one pair; ``vision`` only when ``sources`` has it (evaluation may not)."""
        if train and "vision" not in sources:
            raise ValueError("training samples need a vision file")
        if self.paired is None:
            out = {self.modality: self._modality(sources[self.modality], train, generator)}
            if "vision" in sources:
                out["vision"] = self._vision(sources["vision"])
            return out
        rgb = self._rgb(sources["vision"]) if "vision" in sources else None
        values, valid = self._sensor(sources, meta)
        region = FULL_BOX
        if meta.get("box") is not None:
            # Boxes are in pixels of the RGB image (LLVIP's visible and infrared share a size).
            ref = rgb if rgb is not None else values
            try:
                region = pixel_box_to_relative(meta["box"], ref.shape[-2], ref.shape[-1])
            except ValueError as err:
                name = bi.source_name(sources.get("vision", sources[self.modality]))
                raise BadSample("wrong_shape", f"{name}: {err}") from None
        rgb_out, sensor = self.paired(rgb, values, train, generator, region, valid, self.normalise)
        out = {self.modality: sensor}
        if rgb_out is not None:
            out["vision"] = (rgb_out - self.rgb_mean) / self.rgb_std
        return out


class RecordDataset(EpochRandom, Dataset):
    """Records -> samples. ``train`` switches augmentation on (drawn from the EpochRandom
    generator of the index). Bad files raise ``BadSample``; wrap in ``BadInputDataset``."""

    def __init__(
        self,
        records: list[Record],
        root: str | Path,
        sampler: PairSampler,
        train: bool,
        seed: int = 0,
        vision: bool = True,
    ):
        self.records = records
        self.root = Path(root).resolve()
        self.sampler = sampler
        self.train = train
        self.seed = seed
        # Every sample has the same keys (collate stacks them): with or without vision.
        self.keys = sampler.needs(vision or train)
        # The anchor-cache protocol (imagebind_lite/cache.py). A plain image transform gives one
        # anchor input per record; crops aligned with a depth/thermal image come from a
        # continuum, so a cache holds K seeded views of each.
        self.max_anchor_views = 1 if sampler.paired is None else None
        self.anchor_views: int | None = None

    def eval_mode(self) -> RecordDataset:
        """The same records read as evaluation reads them: no augmentation, centre crops."""
        view = copy.copy(self)
        view.train = False
        return view

    def __len__(self) -> int:
        return len(self.records)

    def _sources(self, record: Record, keys: Sequence[str]) -> dict[str, bi.Source]:
        sources: dict[str, bi.Source] = {}
        for key in keys:
            path = record.paths.get(key)
            if path is None:
                raise BadSample("missing", f"record {record.id}: no {key} file in the manifest")
            sources[key] = bi.resolve_inside(self.root, path)
        for key in EXTRA_PATHS:
            if record.paths.get(key) is not None:
                sources[key] = bi.resolve_inside(self.root, record.paths[key])
        return sources

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        if self.anchor_views is not None and self.train:
            return self._cached_view_sample(index, record)
        generator = self.generator(index) if self.train else None
        sample = self.sampler(self._sources(record, self.keys), record.meta, self.train, generator)
        sample["label"] = record.label if isinstance(record.label, int) else -1
        sample["id"] = record.id
        return sample

    # ---------------------------------------------------------------- the anchor-cache protocol

    def _image_identity(self, record: Record) -> str:
        """What the anchor's input of a record depends on: its image file by path (relative to
        the root), size and modification time, so an edited image is a new, uncached view."""
        path = self._sources(record, ("vision",))["vision"]
        try:
            stat = path.stat()
        except OSError:
            raise BadSample("missing", f"{path}: file not found") from None
        return f"{path.relative_to(self.root).as_posix()}@{stat.st_size}:{stat.st_mtime_ns}"

    def _view_generator(self, index: int, view: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + index) * 1_009 + view)

    def use_anchor_views(self, views: int | None) -> None:
        self.anchor_views = views

    def anchor_view_ids(self, views: int = 1) -> list[str]:
        ids = []
        for record in self.records:
            try:
                identity = self._image_identity(record)
            except BadSample:
                continue  # a missing image is bad input at training time, not a view
            if self.max_anchor_views == 1:
                ids.append(identity)
            else:
                ids.extend(f"{identity}#{k}" for k in range(views))
        return ids

    def anchor_input(self, view_id: str) -> torch.Tensor:
        identity, _, view = view_id.partition("#")
        if not hasattr(self, "_by_identity"):
            self._by_identity = {self._image_identity(r): i for i, r in enumerate(self.records)}
        index = self._by_identity.get(identity)
        if index is None:
            raise KeyError(f"no record's image is {identity!r} (the file changed or is gone)")
        record = self.records[index]
        if self.max_anchor_views == 1:
            return self.sampler._vision(self._sources(record, ("vision",))["vision"])
        generator = self._view_generator(index, int(view))
        sample = self.sampler(self._sources(record, self.keys), record.meta, True, generator)
        return sample["vision"]

    def _cached_view_sample(self, index: int, record: Record) -> dict:
        """Cache mode: the modality side as training draws it, and the id of the anchor view
        it pairs with (one of K seeded views per record for aligned crops)."""
        identity = self._image_identity(record)
        sources = self._sources(record, self.keys)
        if self.max_anchor_views == 1:
            # The same draws as the uncached read, which takes the modality's first.
            modality = self.sampler.modality
            x = self.sampler._modality(sources[modality], True, self.generator(index))
            sample = {modality: x, "view_id": identity}
        else:
            view = int(torch.randint(self.anchor_views, (), generator=self.generator(index)))
            sample = self.sampler(sources, record.meta, True, self._view_generator(index, view))
            sample.pop("vision")
            sample["view_id"] = f"{identity}#{view}"
        sample["label"] = record.label if isinstance(record.label, int) else -1
        sample["id"] = record.id
        return sample


# --------------------------------------------------------------------------------------------
# Building bundles


def resolve_sensor_stats(cfg, spec, root: Path, source: str = "--manifest MANIFEST") -> dict:
    """A modality with training-set statistics (``ModalitySpec.stats_options``: depth,
    thermal): put the mean/std into ``cfg.data.preprocess`` (explicit values win) and return
    what was used, for ``DatasetBundle.info``."""
    if spec.stats_options is None:
        return {}
    pre = {**spec.preprocess, **cfg.data.preprocess}
    if pre.get("mean") is not None and pre.get("std") is not None:
        return {"mean": float(pre["mean"]), "std": float(pre["std"]), "source": "data.preprocess"}
    given = cfg.data.options.get("stats")
    path = Path(given) if given else Path(root) / STATS_FILE
    if given and not path.is_absolute() and not path.exists():
        path = Path(root) / given
    entry = read_stats(
        path, spec.name, spec.stats_options(pre), stats_command(spec.name, root, source)
    )
    # Stored in the config's preprocess so that model/config.json (and evaluation) carries them.
    cfg.data.preprocess = {**cfg.data.preprocess, "mean": entry["mean"], "std": entry["std"]}
    return {"mean": entry["mean"], "std": entry["std"], "source": str(path)}


def check_records(records: list[Record], keys: Sequence[str], where: str) -> None:
    for key in keys:
        if records and not any(key in r.paths for r in records):
            have = sorted({k for r in records for k in r.paths})
            raise ValueError(f"{where}: no {key!r} files (the records have: {', '.join(have)})")


def build_from_records(
    cfg,
    anchor,
    spec,
    root: str | Path,
    train_records: list[Record],
    eval_records: list[Record] | None,
    classnames: list[str] | None,
    templates: list[str] | None = None,
    info: dict | None = None,
    where: str = "manifest",
    stats_hint: str = "--manifest MANIFEST",
    eval_root: str | Path | None = None,
) -> DatasetBundle:
    """The common builder of record-based datasets (manifests and layout adapters). Every file
    must resolve inside ``root`` (``eval_root`` for the evaluation records, default ``root``)."""
    if not train_records:
        raise ValueError(f"{where}: no training records")
    root = Path(root)
    check_records(train_records, ("vision", spec.name), where)
    info = dict(info or {})
    normalisation = resolve_sensor_stats(cfg, spec, root, stats_hint)
    if normalisation:
        info["normalisation"] = normalisation
    preprocess = {**spec.preprocess, **cfg.data.preprocess}
    sampler = PairSampler(spec, preprocess, anchor)
    opts = cfg.data.options

    def wrap(records, train, name, vision=True):
        dataset = RecordDataset(
            records, root if train else Path(eval_root or root), sampler, train, cfg.seed, vision
        )
        return bi.BadInputDataset(
            dataset,
            cfg.data.bad_input,
            cfg.seed,
            int(opts.get("max_consecutive_bad", 50)),
            int(opts.get("max_logged_bad", 20)),
            name,
        )

    train = wrap(train_records, True, "train")
    evaluation = None
    if eval_records:
        check_records(eval_records, (spec.name,), where)
        # Classification needs only the modality; retrieval also needs every record's image.
        vision = all("vision" in r.paths for r in eval_records)
        if classnames is None and not vision:
            raise ValueError(
                f"{where}: evaluation without class names is retrieval against "
                f"the images, but some evaluation records have no vision file"
            )
        evaluation = wrap(eval_records, False, "eval", vision)
        # Filled while evaluating (main process), before metrics.json is written.
        info["eval_skipped"] = evaluation.counts
    info.update(train_samples=len(train_records), eval_samples=len(eval_records or []))
    if classnames is not None:
        info["num_classes"] = len(classnames)
    return DatasetBundle(
        train=train,
        eval=evaluation,
        classnames=classnames,
        templates=list(templates or spec.templates) if classnames else templates,
        info=info,
    )


def _find(root: Path, value: str) -> Path:
    """A file option: relative to the dataset root first, then to the working directory."""
    path = Path(value)
    if path.is_absolute() or (root / path).exists() or not path.exists():
        return path if path.is_absolute() else root / path
    return path


def split_records(records: list[Record], opts: dict) -> tuple[list[Record], list[Record], dict]:
    """Train/eval by ``eval_fold`` or by the rows' ``split`` (``train_split``/``eval_split``)."""
    if opts.get("eval_fold") is not None:
        fold = int(opts["eval_fold"])
        return (
            [r for r in records if r.fold != fold],
            [r for r in records if r.fold == fold],
            {"eval_fold": fold},
        )
    if any(r.split is not None for r in records):
        train_split, eval_split = opts.get("train_split", "train"), opts.get("eval_split", "test")
        return (
            [r for r in records if r.split == train_split],
            [r for r in records if r.split == eval_split] if eval_split else [],
            {"train_split": train_split, "eval_split": eval_split},
        )
    return list(records), [], {}


@register_dataset("manifest")
def build_manifest(cfg, anchor, spec) -> DatasetBundle:
    opts = cfg.data.options
    if not cfg.data.root:
        raise ValueError("dataset manifest: set data.root (manifest paths are relative to it)")
    if not opts.get("manifest"):
        raise ValueError("dataset manifest: set data.options.manifest (a CSV or JSONL file)")
    root = Path(cfg.data.root)
    manifest = _find(root, opts["manifest"])
    classnames = opts.get("classnames")
    records, classnames = read_manifest(manifest, root, classnames)
    info = {"manifest": str(manifest)}
    if opts.get("eval_manifest"):
        eval_path = _find(root, opts["eval_manifest"])
        train_records = records
        eval_records, eval_names = read_manifest(eval_path, root, classnames)
        if classnames is None and eval_names:
            raise ValueError(
                f"{eval_path}: labels are class names but the training manifest "
                f"has none; give data.options.classnames"
            )
        info["eval_manifest"] = str(eval_path)
    else:
        train_records, eval_records, rule = split_records(records, opts)
        info.update(rule)
    return build_from_records(
        cfg,
        anchor,
        spec,
        root,
        train_records,
        eval_records,
        classnames,
        opts.get("templates"),
        info,
        str(manifest),
        f"--manifest {manifest}",
    )


def load_records(
    root: str | Path,
    manifest: str | Path | None = None,
    layout: str | None = None,
    split: str | None = None,
    layout_options: dict | None = None,
) -> tuple[list[Record], list[str] | None, str]:
    """Records of a manifest or a layout for the data scripts -> (records, class names, the
    source as a command-line fragment). ``split`` keeps rows of that split when rows carry
    one (for a layout it is passed to ``read_layout``)."""
    root = Path(root)
    if (manifest is None) == (layout is None):
        raise ValueError("give exactly one of a manifest or a layout")
    if layout is not None:
        opts = dict(layout_options or {})
        if split is not None:
            opts["split"] = split
        records, classnames = read_layout(layout, root, **opts)
        return records, classnames, f"--layout {layout}"
    path = _find(root, str(manifest))
    records, classnames = read_manifest(path, root)
    if split is not None and any(r.split is not None for r in records):
        records = [r for r in records if r.split == split]
    return records, classnames, f"--manifest {manifest}"
