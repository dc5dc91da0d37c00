"""Adapters: standard dataset layouts -> :class:`Record` lists, and training datasets on top.

``read_layout(name, root, **opts) -> (records, classnames)``; ``classnames`` is None when the
layout has no class labels. Record paths are ``root / relative`` with ``root`` made absolute
(not resolved: the datasets refuse any that resolve outside the root). Layouts and their options:

``esc50``      ``meta/esc50.csv`` (filename, fold, target, category, esc10, src_file, take) and
               ``audio/<filename>``. Labels = ``target``; class names = categories in target
               order with ``_`` shown as a space ("chirping birds"). ``fold=`` keeps one fold (or
               a list). Records carry ``fold``; ``meta``: category, esc10, src_file, take.
``audioset``   ``{split}_segments.csv`` (``split=balanced_train`` default, ``unbalanced_train``,
               ``eval``; or ``segments=FILE``): ``#`` header lines, then ``YTID, start_seconds,
               end_seconds, "mid1,mid2"``; ``class_labels_indices.csv`` (index, mid,
               display_name) gives the 527 class names. Expected extracted files:
               ``audio/{YTID}_{start}.flac`` (or .wav/.ogg/.mp3) and ``frames/{YTID}_{start}.jpg``
               (or .png), where ``{start}`` is the start in whole seconds (``30``) or as written in
               the CSV (``30.000``); both are looked up. Labels are lists (multi-label).
``vggsound``   ``vggsound.csv`` rows ``ytid,start,label,split`` without header; files as for
               audioset with ``{start}`` as written (``1``) or zero-padded to 6 digits
               (``000001``, the common download naming). Class names: sorted labels (309).
               ``split=train|test`` filters (default: all, each record keeps its split).
``clotho``     ``clotho_captions_{split}.csv`` (file_name, caption_1..caption_5), audio in
               ``{split}/`` (``split=evaluation`` default, ``development``, ``validation``).
               Retrieval only: captions, no labels.
``audiocaps``  ``{split}.csv`` (audiocap_id, youtube_id, start_time, caption; ``split=test``
               default), rows of one clip grouped into one record with all its captions; audio
               at ``{split}/{youtube_id}_{start_time}.wav`` (or .flac), else
               ``{split}/{youtube_id}.wav``.
``sunrgbd``    any folder tree; every folder holding ``image/`` and ``depth_bfx/`` or ``depth/``
               is one frame (SUN RGB-D's own layout, as in the toy data), with ``intrinsics.txt``
               and ``scene.txt`` (the label). ``depth=depth_bfx`` (default: the hole-filled maps,
               falling back to ``depth/``) or ``depth=depth``. The sensor (kv1, kv2, realsense,
               xtion) is read from the path for the disparity baseline. Splits from
               ``split_file=`` (JSON ``{"train": [...], "test": [...]}`` of frame folders, or the
               toolbox's ``allsplit.mat`` with alltrain/alltest, read with scipy), or
               ``ROOT/split.json`` / ``ROOT/allsplit.mat`` when present; ``split=`` filters.
               A split asked of a root without a split file is refused
               (:class:`MissingSplitFile`); ``split=None`` or ``"all"`` reads every frame.
``nyud``       ``{split}/{id}/image.png|jpg``, ``{split}/{id}/depth.png`` (uint16 millimetres),
               ``{split}/{id}/scene.txt``, optional ``intrinsics.txt`` (default: NYU's colour
               camera, fx 518.86, Kinect v1 baseline) with ``split`` in train/test, as
               ``train/prepare_nyud.py`` writes it from the official ``.mat`` files. Records carry
               ``meta["layout"] = "mm"``. Class names: the scenes found (sorted), or
               ``classnames=`` (other scenes then get label None; ``meta["scene"]`` keeps the raw
               name for protocols that fold them into "other").
``llvip``      ``visible/{split}/*.jpg``, ``infrared/{split}/*.jpg`` (same names, pixel-aligned),
               ``Annotations/<name>.xml`` (VOC boxes). ``crops=both`` (default) gives one record
               per ``person`` box (label 1) and as many background boxes (label 0) per image,
               placed at random but deterministically (``seed=0``) so that they never touch a
               person; ``crops=person|background|none`` (none: whole frames, no labels).
               ``meta["box"]`` is the crop (x0, y0, x1, y1) in visible-image pixels, made square
               around the person where the image allows; ``meta["object_box"]`` the annotation.
               Class names ``["background", "person"]``.

All layouts take ``missing=drop|keep`` for records whose files are absent: audioset and
vggsound drop by default (downloads always lack some videos; the count is in the dataset's
info), the others keep them so that the bad-input policy reports them. ``require=`` names the
files a record needs (default: the layout's primary modality).

Registered training datasets (``data.dataset=NAME``, ``data.root=ROOT``; built in
``data/layout_datasets.py``) pair RGB with the modality: ``audioset`` and ``vggsound`` (frame +
audio), ``sunrgbd`` and ``nyud`` (RGB + depth), ``llvip`` (RGB + thermal, whole frames for
training, person/background crops for evaluation).
Options: ``train_split``, ``eval_split`` (null: no evaluation; SUN RGB-D without its split
file is refused unless both are null, which trains on every frame), ``layout_options`` (passed to
``read_layout``), ``eval_layout``/``eval_root``/``eval_layout_options`` (evaluate on another
layout, e.g. train on AudioSet and classify ESC-50 zero-shot), ``classnames``, ``templates``,
and the manifest options (``stats``, ``max_consecutive_bad``, ``max_logged_bad``). ESC-50,
Clotho and AudioCaps have no video frames, so they are evaluation layouts only.
"""

from __future__ import annotations

import csv
import json
import os
import random
import warnings
import xml.etree.ElementTree as ET
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..files import AUDIO_EXTS, IMAGE_EXTS
from .depth import NYU_FX, SENSOR_BASELINES, resolve_baseline, sensor_of

# SUN RGB-D's depth folders of a frame: hole-filled maps, raw maps.
SUNRGBD_DEPTH_FOLDERS = ("depth_bfx", "depth")


@dataclass
class Record:
    id: str
    paths: dict[str, Path]
    label: int | list[int] | None = None
    captions: list[str] = field(default_factory=list)
    split: str | None = None
    fold: int | None = None
    meta: dict = field(default_factory=dict)


_LAYOUTS: dict[str, Callable] = {}


def _layout(name: str):
    def wrap(fn):
        _LAYOUTS[name] = fn
        return fn

    return wrap


def list_layouts() -> list[str]:
    return sorted(_LAYOUTS)


def read_layout_info(name: str, root, **opts) -> tuple[list[Record], list[str] | None, dict]:
    """Like :func:`read_layout`, plus an info dict (files dropped, split source, ...)."""
    if name not in _LAYOUTS:
        raise KeyError(f"unknown layout {name!r}; known: {', '.join(list_layouts())}")
    # Absolute (not resolved): the paths stay valid from any working directory, and a
    # relative root is not applied twice where the paths are resolved inside it.
    root = Path(root).absolute()
    if not root.is_dir():
        raise FileNotFoundError(f"{name}: dataset root not found: {root}")
    return _LAYOUTS[name](root, **opts)


def read_layout(name: str, root, **opts) -> tuple[list[Record], list[str] | None]:
    """A standard layout under ``root`` -> (records, class names or None)."""
    records, classnames, _ = read_layout_info(name, root, **opts)
    return records, classnames


# --------------------------------------------------------------------------------------------
# Helpers


class _Folder:
    """File names of one folder, listed once: existence checks for millions of records."""

    def __init__(self, folder: Path):
        self.folder = folder
        try:
            self.names = set(os.listdir(folder))
        except FileNotFoundError:
            self.names = set()

    def find(self, stems, exts) -> Path | None:
        for stem in stems:
            for ext in exts:
                if stem + ext in self.names:
                    return self.folder / (stem + ext)
        return None


def _select_files(records_files, require, missing, name):
    """Keep or drop records whose required files are absent; returns (records, dropped)."""
    if missing not in ("drop", "keep"):
        raise ValueError(f"{name}: missing must be drop or keep, got {missing!r}")
    out, dropped = [], 0
    for record, found, expected in records_files:
        absent = [k for k in require if found.get(k) is None]
        if absent and missing == "drop":
            dropped += 1
            continue
        record.paths = {
            k: (found.get(k) or expected[k])
            for k in expected
            if found.get(k) is not None or k in require
        }
        out.append(record)
    if dropped:
        warnings.warn(f"{name}: dropped {dropped} records whose files are missing", stacklevel=3)
    return out, dropped


def _display(name: str) -> str:
    return name.replace("_", " ").strip()


def _start_strings(start: str) -> list[str]:
    text = start.strip()
    out = [text]
    try:
        value = float(text)
    except ValueError:
        return out
    if value.is_integer():
        out += [str(int(value)), f"{int(value):06d}"]
    out += [f"{value:.1f}", f"{value:.3f}"]
    return list(dict.fromkeys(out))


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple, set)) else [value]


# --------------------------------------------------------------------------------------------
# Audio layouts


@_layout("esc50")
def _esc50(root: Path, fold=None, missing: str = "keep", require=("audio",)):
    table = root / "meta" / "esc50.csv"
    if not table.is_file():
        raise FileNotFoundError(f"esc50: {table} not found (expected ESC-50's meta/esc50.csv)")
    with table.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    names = {int(r["target"]): r["category"] for r in rows}
    classnames = [_display(names[t]) for t in range(max(names) + 1)] if names else []
    folds = {int(f) for f in _as_list(fold)}
    audio = _Folder(root / "audio")
    items = []
    for r in rows:
        if folds and int(r["fold"]) not in folds:
            continue
        record = Record(
            id=Path(r["filename"]).stem,
            paths={},
            label=int(r["target"]),
            split=None,
            fold=int(r["fold"]),
            meta={
                "category": r["category"],
                "esc10": r.get("esc10", "").strip() == "True",
                "src_file": r.get("src_file"),
                "take": r.get("take"),
            },
        )
        found = audio.find([Path(r["filename"]).stem], [Path(r["filename"]).suffix or ".wav"])
        items.append((record, {"audio": found}, {"audio": root / "audio" / r["filename"]}))
    records, dropped = _select_files(items, require, missing, "esc50")
    return records, classnames, {"dropped_missing": dropped}


def _audioset_classes(root: Path) -> tuple[list[str], dict[str, int]]:
    path = root / "class_labels_indices.csv"
    if not path.is_file():
        raise FileNotFoundError(f"audioset: {path} not found")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    rows.sort(key=lambda r: int(r["index"]))
    return [r["display_name"] for r in rows], {r["mid"]: int(r["index"]) for r in rows}


def _av_items(root: Path, ytid: str, starts: list[str], folders):
    audio, frames = folders
    stems = [f"{ytid}_{s}" for s in starts]
    found = {"audio": audio.find(stems, AUDIO_EXTS), "vision": frames.find(stems, IMAGE_EXTS)}
    expected = {
        "audio": root / "audio" / f"{stems[0]}.flac",
        "vision": root / "frames" / f"{stems[0]}.jpg",
    }
    return found, expected


@_layout("audioset")
def _audioset(
    root: Path,
    split: str | None = "balanced_train",
    segments: str | None = None,
    missing: str = "drop",
    require=("audio",),
):
    if not (split or segments):
        raise ValueError(
            "audioset: give split= (balanced_train, unbalanced_train, eval) or segments=FILE"
        )
    classnames, mids = _audioset_classes(root)
    table = root / (segments or f"{split}_segments.csv")
    if not table.is_file():
        raise FileNotFoundError(f"audioset: segment list {table} not found")
    folders = (_Folder(root / "audio"), _Folder(root / "frames"))
    items, unknown = [], Counter()
    with table.open(newline="", encoding="utf-8") as handle:
        for line in handle:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            row = next(csv.reader([line], skipinitialspace=True))
            if len(row) < 4:
                raise ValueError(f"audioset: {table}: malformed row {line.strip()!r}")
            ytid, start, end, positive = row[0].strip(), row[1], row[2], row[3]
            labels = []
            for mid in positive.split(","):
                mid = mid.strip()
                if mid in mids:
                    labels.append(mids[mid])
                elif mid:
                    unknown[mid] += 1
            starts = _start_strings(start)
            # Whole seconds (all of AudioSet) name files and ids without the ".000".
            short = starts[1] if len(starts) > 1 and starts[1].isdigit() else starts[0]
            record = Record(
                id=f"{ytid}_{short}",
                paths={},
                label=labels,
                split=split,
                meta={"ytid": ytid, "start": start.strip(), "end": end.strip()},
            )
            found, expected = _av_items(root, ytid, [short] + starts, folders)
            items.append((record, found, expected))
    if unknown:
        warnings.warn(
            f"audioset: {sum(unknown.values())} labels not in class_labels_indices.csv",
            stacklevel=2,
        )
    records, dropped = _select_files(items, require, missing, "audioset")
    return records, classnames, {"dropped_missing": dropped, "segments": str(table)}


@_layout("vggsound")
def _vggsound(root: Path, split: str | None = None, missing: str = "drop", require=("audio",)):
    table = root / "vggsound.csv"
    if not table.is_file():
        raise FileNotFoundError(f"vggsound: {table} not found")
    with table.open(newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.reader(handle) if r]
    for r in rows:
        if len(r) < 4:
            raise ValueError(f"vggsound: {table}: expected ytid,start,label,split, got {r}")
    classnames = sorted({r[2].strip() for r in rows})
    index = {name: i for i, name in enumerate(classnames)}
    folders = (_Folder(root / "audio"), _Folder(root / "frames"))
    items = []
    for ytid, start, label, row_split, *_ in rows:
        row_split = row_split.strip()
        if split is not None and row_split != split:
            continue
        starts = _start_strings(start)
        record = Record(
            id=f"{ytid}_{starts[0]}",
            paths={},
            label=index[label.strip()],
            split=row_split,
            meta={"ytid": ytid, "start": start.strip()},
        )
        found, expected = _av_items(root, ytid, starts, folders)
        items.append((record, found, expected))
    records, dropped = _select_files(items, require, missing, "vggsound")
    return records, classnames, {"dropped_missing": dropped}


@_layout("clotho")
def _clotho(root: Path, split: str = "evaluation", missing: str = "keep", require=("audio",)):
    table = root / f"clotho_captions_{split}.csv"
    if not table.is_file():
        raise FileNotFoundError(f"clotho: {table} not found")
    with table.open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    folder = _Folder(root / split)
    items = []
    for r in rows:
        keys = sorted((k for k in r if k and k.startswith("caption_")), key=lambda k: int(k[8:]))
        captions = [r[k].strip() for k in keys if r[k] and r[k].strip()]
        name = r["file_name"]
        record = Record(id=Path(name).stem, paths={}, captions=captions, split=split)
        found = folder.find([Path(name).stem], [Path(name).suffix or ".wav"])
        items.append((record, {"audio": found}, {"audio": root / split / name}))
    records, dropped = _select_files(items, require, missing, "clotho")
    return records, None, {"dropped_missing": dropped}


@_layout("audiocaps")
def _audiocaps(root: Path, split: str = "test", missing: str = "keep", require=("audio",)):
    table = root / f"{split}.csv"
    if not table.is_file():
        raise FileNotFoundError(f"audiocaps: {table} not found")
    with table.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    grouped: dict[tuple[str, str], Record] = {}
    for r in rows:
        key = (r["youtube_id"].strip(), r["start_time"].strip())
        if key not in grouped:
            grouped[key] = Record(
                id=f"{key[0]}_{key[1]}",
                paths={},
                split=split,
                meta={"youtube_id": key[0], "start_time": float(key[1]), "audiocap_ids": []},
            )
        grouped[key].captions.append(r["caption"].strip())
        grouped[key].meta["audiocap_ids"].append(r["audiocap_id"])
    folder = _Folder(root / split)
    items = []
    for (ytid, start), record in grouped.items():
        found = folder.find([f"{ytid}_{s}" for s in _start_strings(start)] + [ytid], AUDIO_EXTS)
        items.append((record, {"audio": found}, {"audio": root / split / f"{ytid}_{start}.wav"}))
    records, dropped = _select_files(items, require, missing, "audiocaps")
    return records, None, {"dropped_missing": dropped}


# --------------------------------------------------------------------------------------------
# Depth layouts


def _first_file(folder: Path, exts) -> Path | None:
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in exts)
    return files[0] if files else None


def _read_text(path: Path) -> str | None:
    return path.read_text(encoding="utf-8", errors="replace").strip() if path.is_file() else None


def _sunrgbd_key(path: str) -> str:
    """A frame folder as SUN RGB-D names it: the part after ``SUNRGBD/``, no slashes at the ends."""
    text = path.replace("\\", "/").strip("/")
    marker = "SUNRGBD/"
    return text[text.index(marker) + len(marker) :] if marker in text else text


class MissingSplitFile(FileNotFoundError):
    """A train/test split was asked of a dataset whose split file is absent."""


def sunrgbd_missing_split(root, asked: str, no_split: str = "split='all'") -> str:
    """The one line that refuses a SUN RGB-D split without a split file: what is missing,
    where it comes from, and how to read every frame instead."""
    return (
        f"sunrgbd: {asked} needs SUN RGB-D's train/test split, but {root} has no split.json "
        "or allsplit.mat: copy allsplit.mat from the SUN RGB-D toolbox "
        "(SUNRGBDtoolbox/traintestSUNRGBD/allsplit.mat, rgbd.cs.princeton.edu/data) into it, "
        'or give split_file= (allsplit.mat, or a split.json {"train": [...], "test": [...]} '
        f"of frame folders); {no_split} reads every frame without a split"
    )


def _sunrgbd_splits(root: Path, split_file) -> tuple[dict[str, str], str | None]:
    candidates = [Path(split_file)] if split_file else [root / "split.json", root / "allsplit.mat"]
    for path in candidates:
        if not path.is_absolute() and not path.exists():
            path = root / path
        if not path.is_file():
            if split_file:
                raise FileNotFoundError(f"sunrgbd: split file not found: {path}")
            continue
        if path.suffix == ".json":
            data = json.loads(path.read_text())
        else:
            try:
                from scipy.io import loadmat
            except ImportError:
                raise ImportError(
                    "sunrgbd: reading allsplit.mat needs scipy (pip install scipy)"
                    " or give the split as JSON"
                ) from None
            mat = loadmat(str(path), squeeze_me=True)
            data = {"train": list(mat["alltrain"]), "test": list(mat["alltest"])}
        out = {}
        for name, entries in data.items():
            for entry in entries:
                out[_sunrgbd_key(str(entry))] = name
        return out, str(path)
    return {}, None


def _label_scenes(records: list[Record], classnames):
    """Scene names -> labels: the given class list, else the sorted scenes found."""
    if classnames is None:
        classnames = sorted({_display(r.meta["scene"]) for r in records if r.meta.get("scene")})
    index = {name: i for i, name in enumerate(classnames)}
    for r in records:
        scene = r.meta.get("scene")
        r.label = index.get(_display(scene)) if scene else None
    return list(classnames)


@_layout("sunrgbd")
def _sunrgbd(
    root: Path,
    split: str | None = None,
    depth: str = "depth_bfx",
    split_file=None,
    classnames=None,
    missing: str = "keep",
):
    if depth not in SUNRGBD_DEPTH_FOLDERS:
        raise ValueError(f"sunrgbd: depth must be depth_bfx or depth, got {depth!r}")
    split = None if split == "all" else split
    splits, split_source = _sunrgbd_splits(root, split_file)
    if split is not None and not splits:
        # Never a silent fallback to every frame: test frames would train and be scored.
        raise MissingSplitFile(sunrgbd_missing_split(root, f"split={split!r}"))
    records, dropped = [], 0
    for folder, dirs, _ in os.walk(root, followlinks=False):
        dirs.sort()
        if "image" not in dirs or not (set(SUNRGBD_DEPTH_FOLDERS) & set(dirs)):
            continue
        dirs[:] = []  # a frame folder holds no further frames
        scene_dir = Path(folder)
        depth_dir = scene_dir / (depth if (scene_dir / depth).is_dir() else "depth")
        rel = scene_dir.relative_to(root).as_posix()
        paths = {
            "vision": _first_file(scene_dir / "image", IMAGE_EXTS),
            "depth": _first_file(depth_dir, (".png",)),
        }
        if any(p is None for p in paths.values()):
            if missing == "drop":
                dropped += 1
                continue
            paths = {k: v for k, v in paths.items() if v is not None}
        if (scene_dir / "intrinsics.txt").is_file():
            paths["intrinsics"] = scene_dir / "intrinsics.txt"
        sensor = sensor_of(rel)
        meta = {
            "scene": _read_text(scene_dir / "scene.txt"),
            "sensor": sensor,
            "baseline": resolve_baseline("auto", rel),
            "depth_dir": depth_dir.name,
            "layout": "sunrgbd",
        }
        record_split = splits.get(_sunrgbd_key(rel)) if splits else None
        if split is not None and record_split != split:
            continue
        records.append(Record(rel, paths, None, [], record_split, None, meta))
    names = _label_scenes(records, classnames)
    return records, names, {"split_source": split_source, "dropped_missing": dropped}


@_layout("nyud")
def _nyud(
    root: Path,
    split: str | None = None,
    classnames=None,
    fx: float | None = None,
    missing: str = "keep",
):
    splits = [split] if split else sorted(p.name for p in root.iterdir() if p.is_dir())
    records, dropped = [], 0
    for name in splits:
        base = root / name
        if not base.is_dir():
            raise FileNotFoundError(f"nyud: split folder not found: {base}")
        for frame in sorted(p for p in base.iterdir() if p.is_dir()):
            image = next(
                (frame / f"image{e}" for e in IMAGE_EXTS if (frame / f"image{e}").is_file()), None
            )
            depth = frame / "depth.png"
            if (image is None or not depth.is_file()) and missing == "drop":
                dropped += 1
                continue
            paths = {"vision": image or frame / "image.png", "depth": depth}
            meta = {
                "scene": _read_text(frame / "scene.txt"),
                "layout": "mm",
                "sensor": "kv1",
                "baseline": SENSOR_BASELINES["kv1"],
            }
            if (frame / "intrinsics.txt").is_file():
                paths["intrinsics"] = frame / "intrinsics.txt"
            else:
                meta["fx"] = float(fx or NYU_FX)
            records.append(Record(f"{name}/{frame.name}", paths, None, [], name, None, meta))
    names = _label_scenes(records, classnames)
    return records, names, {"dropped_missing": dropped}


# --------------------------------------------------------------------------------------------
# Thermal layout


def _voc_objects(path: Path) -> tuple[list[tuple[str, list[float]]], tuple[int, int] | None]:
    tree = ET.parse(path)
    size = tree.find("size")
    wh = None
    if size is not None and size.findtext("width") and size.findtext("height"):
        wh = (int(float(size.findtext("width"))), int(float(size.findtext("height"))))
    objects = []
    for obj in tree.iter("object"):
        box = obj.find("bndbox")
        if box is None:
            continue
        coords = [float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
        objects.append(((obj.findtext("name") or "").strip().lower(), coords))
    return objects, wh


def _square_box(box, width: int, height: int) -> list[float]:
    x0, y0, x1, y1 = box
    side = min(max(x1 - x0, y1 - y0), width, height)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = min(max(cx - side / 2, 0.0), width - side)
    top = min(max(cy - side / 2, 0.0), height - side)
    return [left, top, left + side, top + side]


def _overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _background_boxes(persons, width, height, count, rng: random.Random) -> list[list[float]]:
    sides = [max(b[2] - b[0], b[3] - b[1]) for b in persons] or [min(width, height) / 4]
    lo = max(32.0, min(sides))
    hi = max(lo, min(max(sides), min(width, height) / 2))
    out = []
    for _ in range(count):
        for _ in range(100):
            side = min(rng.uniform(lo, hi), width, height)
            x0, y0 = rng.uniform(0, width - side), rng.uniform(0, height - side)
            box = [x0, y0, x0 + side, y0 + side]
            if not any(_overlaps(box, p) for p in persons):
                out.append(box)
                break
    return out


@_layout("llvip")
def _llvip(
    root: Path,
    split: str = "test",
    crops: str = "both",
    seed: int = 0,
    backgrounds_per_image: int | None = None,
    missing: str = "keep",
):
    if crops not in ("both", "person", "background", "none"):
        raise ValueError(f"llvip: crops must be both, person, background or none, got {crops!r}")
    visible, infrared = root / "visible" / split, root / "infrared" / split
    if not visible.is_dir():
        raise FileNotFoundError(f"llvip: {visible} not found")
    ir_names = _Folder(infrared)
    records, no_annotation, dropped = [], 0, 0
    for image in sorted(p for p in visible.iterdir() if p.suffix.lower() in IMAGE_EXTS):
        thermal = infrared / image.name
        if image.name not in ir_names.names and missing == "drop":
            dropped += 1
            continue
        paths = {"vision": image, "thermal": thermal}
        if crops == "none":
            records.append(Record(image.stem, paths, None, [], split, None, {}))
            continue
        xml = root / "Annotations" / f"{image.stem}.xml"
        if not xml.is_file():
            no_annotation += 1
            continue
        objects, wh = _voc_objects(xml)
        if wh is None:
            with Image.open(image) as im:
                wh = im.size
        width, height = wh
        persons = [b for name, b in objects if name == "person"]
        if crops in ("both", "person"):
            for k, box in enumerate(persons):
                records.append(
                    Record(
                        f"{image.stem}_person{k}",
                        dict(paths),
                        1,
                        [],
                        split,
                        None,
                        {
                            "box": _square_box(box, width, height),
                            "object_box": box,
                            "image_size": [width, height],
                        },
                    )
                )
        if crops in ("both", "background"):
            count = (
                backgrounds_per_image if backgrounds_per_image is not None else max(1, len(persons))
            )
            # Seeded by the image name: the same boxes whatever the order or subset read.
            rng = random.Random(int(seed) * 1_000_003 + zlib.crc32(image.stem.encode()))
            for k, box in enumerate(_background_boxes(persons, width, height, count, rng)):
                records.append(
                    Record(
                        f"{image.stem}_bg{k}",
                        dict(paths),
                        0,
                        [],
                        split,
                        None,
                        {"box": box, "image_size": [width, height]},
                    )
                )
    if no_annotation:
        warnings.warn(
            f"llvip: {no_annotation} images without an annotation file were left out of the crops",
            stacklevel=3,
        )
    classnames = None if crops == "none" else ["background", "person"]
    return records, classnames, {"no_annotation": no_annotation, "dropped_missing": dropped}
