"""The record datasets at scale: webdataset tar shards.

Writing (``train/write_shards.py --manifest M --root R --out DIR --shard-size N``, or
:func:`write_shards`): every record becomes one tar sample, its files stored as raw bytes
(``000000042.vision.jpg``, ``000000042.depth.png``, ``000000042.intrinsics.txt``, ...) next to
``000000042.json`` with id, label, captions, split, fold and meta. Keys are running numbers,
because webdataset splits a member name at its first dot and ids may contain dots. Nothing is
decoded while writing: files outside the root, missing or empty are left out and counted;
corrupt content is caught by the bad-input policy when read. ``DIR/shards.json`` lists the
shards with their sample counts, the file keys, class names and the counts left out; the
root's ``stats.json`` (depth/thermal normalisation) is copied beside it. Feature shards
(``--features MODALITY``, :func:`feature_writer`) store that modality's fp16 model inputs
instead of its files, and are read without decoding (see the feature-shards functions below).

Reading: the registered dataset ``shards`` (``data.dataset=shards``, ``data.root=DIR`` or
``data.options.shards=DIR``) decodes samples with exactly the code of the manifest datasets
(``manifest.PairSampler``), so a sample read from shards equals the one read from files.
``data.options.access``:

``random`` (default)  map-style: a sample index -> (shard, position) through ``shards.json``
                      and each shard's member offsets (``SHARD.offsets.json``, written with the
                      shard; shards without one are scanned, once per worker), then one seek
                      and read per file. Works with the training loop's shuffling sampler,
                      gives exact resumption, and suits local disks and parallel file systems.
``stream``            webdataset's ``ResampledShards``: every rank and DataLoader worker draws
                      shards independently, with replacement, from a seed made of
                      (rank, worker, epoch, ``seed``), and streams their samples sequentially,
                      which is what object stores and network disks serve well. An epoch is
                      ``data.options.epoch_size`` samples (default: the shard total), mixed in a
                      ``shuffle_buffer`` of 1000 samples (0: off); the loop's
                      sample indices only feed per-sample augmentation, so a resumed run draws
                      other (equally random) samples than the interrupted one would have.

Anchor cache (``anchor.cache=DIR``, imagebind_lite/cache.py): both access modes implement the
protocol through :class:`ShardAccess`; view ids are ``SHARD@SIZE:MTIME_NS/KEY`` (see there).

Evaluation: ``data.options.eval_shards=DIR2`` (random access) or ``eval_manifest`` (files under
``data.options.eval_root``). DataLoader workers (``data.num_workers``) decode in parallel; the
loop pins memory on GPUs and forks its workers afresh each epoch (per-sample randomness is
seeded by epoch), so each worker opens the shards it reads, and reads their offsets, anew.
"""

from __future__ import annotations

import bisect
import copy
import io
import json
import os
import shutil
import tarfile
import warnings
import zlib
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from . import bad_input as bi
from . import manifest as mf
from .adapters import Record
from .datasets import BadSample, DatasetBundle, EpochRandom, register_dataset
from .transforms import STATS_FILE

INDEX_FILE = "shards.json"
OFFSETS_EXT = ".offsets.json"  # beside each shard: its members' offsets, so readers need no scan
META_KEY = "json"
FEATURE_EXT = ".features.npy"
MAX_TAR_ERRORS = 100


def member_key(number: int) -> str:
    """The tar key of the ``number``-th sample written (running over all shards of a folder)."""
    return f"{number:09d}"


def _webdataset():
    try:
        import webdataset
    except ImportError:
        raise ImportError("tar shards need webdataset: pip install webdataset") from None
    return webdataset


def write_shards(
    records: Iterable[Record],
    root: str | Path,
    out: str | Path,
    shard_size: int = 1000,
    keys: Iterable[str] | None = None,
    classnames: list[str] | None = None,
    templates: list[str] | None = None,
    source: str | None = None,
    prefix: str = "shard",
    features: dict | None = None,
) -> dict:
    """Write records (files under ``root``) as tar shards into ``out``; returns the index.

    ``features`` (from :func:`feature_writer`): store that key's features instead of its file.
    """
    wds = _webdataset()
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    root, out = Path(root), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = set(keys) if keys is not None else None
    skipped: Counter = Counter()
    counts: list[int] = []
    stored_keys: set[str] = set()
    n = 0
    pattern = str(out / f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=int(shard_size), verbose=0) as writer:
        for record in records:
            sample = {"__key__": member_key(n)}
            try:
                for key, path in record.paths.items():
                    if wanted is not None and key not in wanted:
                        continue
                    resolved = bi.resolve_inside(root, path)
                    if features is not None and key == features["key"]:
                        sample[f"{key}{FEATURE_EXT}"] = features["encode"](resolved)
                        continue
                    ext = resolved.suffix.lower() or ".bin"
                    sample[f"{key}{ext}"] = bi.read_bytes(resolved)
            except BadSample as err:
                skipped[err.reason] += 1
                continue
            meta = {
                "id": record.id,
                "label": record.label,
                "captions": record.captions,
                "split": record.split,
                "fold": record.fold,
                "meta": record.meta,
            }
            sample[META_KEY] = json.dumps(meta, default=str).encode()
            writer.write(sample)
            stored_keys.update(k.split(".", 1)[0] for k in sample if k not in ("__key__", META_KEY))
            shard = writer.shard - 1  # ShardWriter counts up after opening a shard
            while len(counts) <= shard:
                counts.append(0)
            counts[shard] += 1
            n += 1
    index = {
        "version": 1,
        "shards": [Path(pattern % i).name for i in range(len(counts))],
        "counts": counts,
        "num_samples": n,
        "keys": sorted(stored_keys),
        "classnames": classnames,
        "templates": templates,
        "skipped": dict(skipped),
        "source": source,
    }
    if features is not None:
        index["features"] = {k: features[k] for k in ("key", "dtype", "preprocess")}
    for name in index["shards"]:
        write_offsets(out / name)
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
    stats = root / STATS_FILE
    if stats.is_file() and stats.resolve() != (out / STATS_FILE).resolve():
        shutil.copyfile(stats, out / STATS_FILE)
    return index


def read_index(directory: str | Path) -> dict:
    path = Path(directory) / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no shard index {path}; write shards with train/write_shards.py")
    index = json.loads(path.read_text())
    missing = [s for s in index["shards"] if not (Path(directory) / s).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{directory}: {len(missing)} shards listed in {INDEX_FILE} are "
            f"missing, e.g. {missing[0]}"
        )
    return index


def scan_tar_keyed(path: str | Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """Samples of a tar in order: (key, {field: (data offset, size)}), grouped like webdataset."""
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    last_key = None
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = os.path.basename(member.name)
            if "." not in base:
                continue
            key, field = base.split(".", 1)
            key = os.path.join(os.path.dirname(member.name), key)
            if key != last_key:
                samples.append((key, {}))
                last_key = key
            samples[-1][1][field] = (member.offset_data, member.size)
    return samples


def write_offsets(path: Path) -> Path:
    """Scan a tar once (just written, so from the page cache) into ``TAR.offsets.json``: a
    reader's random access then costs one small JSON per shard instead of a tarfile scan of
    its headers in every DataLoader worker of every epoch (docs/scale.md)."""
    samples = scan_tar_keyed(path)
    out = path.with_name(path.name + OFFSETS_EXT)
    out.write_text(json.dumps({"size": path.stat().st_size, "samples": samples}))
    return out


def read_offsets(path: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """``scan_tar_keyed(path)``, from the offsets file written with the shard when it is there
    and was written for a tar of this size (else the tar is scanned)."""
    offsets = path.with_name(path.name + OFFSETS_EXT)
    if offsets.is_file():
        recorded = json.loads(offsets.read_text())
        if recorded.get("size") == path.stat().st_size:
            return [
                (key, {f: tuple(v) for f, v in fields.items()})
                for key, fields in recorded["samples"]
            ]
    return scan_tar_keyed(path)


def scan_tar(path: str | Path) -> list[dict[str, tuple[int, int]]]:
    """Samples of a tar in order: {field: (data offset, size)}, grouped by key like webdataset."""
    return [fields for _, fields in scan_tar_keyed(path)]


def fields_to_sample(fields: dict[str, bytes], where: str):
    """Tar fields of one sample -> (Record with blobs instead of paths, blobs by key)."""
    if META_KEY not in fields:
        raise BadSample("unreadable", f"{where}: shard sample without {META_KEY}")
    try:
        meta = json.loads(fields[META_KEY])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadSample("unreadable", f"{where}: bad {META_KEY} ({err})") from None
    blobs = {}
    for field, data in fields.items():
        if field == META_KEY or field.startswith("__"):
            continue
        key = field.split(".", 1)[0]
        blobs[key] = bi.Blob(f"{where}.{field}", bytes(data))
    record = Record(
        str(meta["id"]),
        {},
        meta.get("label"),
        meta.get("captions") or [],
        meta.get("split"),
        meta.get("fold"),
        meta.get("meta") or {},
    )
    return record, blobs


def _sources(sampler, record: Record, blobs: dict, vision: bool) -> dict:
    sources = {}
    for key in sampler.needs(vision):
        if key not in blobs:
            raise BadSample("missing", f"sample {record.id}: no {key} file in the shard")
        sources[key] = blobs[key]
    for key in mf.EXTRA_PATHS:
        if key in blobs:
            sources[key] = blobs[key]
    return sources


def _finish(sample: dict, record: Record) -> dict:
    sample["label"] = record.label if isinstance(record.label, int) else -1
    sample["id"] = record.id
    return sample


def _decode(
    sampler, record: Record, blobs: dict, train: bool, generator, vision: bool = True
) -> dict:
    sources = _sources(sampler, record, blobs, vision or train)
    return _finish(sampler(sources, record.meta, train, generator), record)


class ShardAccess:
    """Random access to single samples of the shards of ``self.directory`` (file handles and
    header scans per process), and on it the anchor-cache protocol (imagebind_lite/cache.py)
    that both access modes share.

    A view id names the anchor's input as ``SHARD@SIZE:MTIME_NS/KEY``: the shard file, its size
    and modification time, and the sample's tar key (``#k`` appended for the K seeded views of
    crops aligned with a depth/thermal image). A rewritten shard gets new ids for all its
    samples, so a cache of the old one is refused, while the ids are enumerated from
    ``shards.json`` and one ``stat`` per shard, without reading any tar: cheap at AudioSet scale,
    where hashing member contents would read every byte of every shard at each start. Random
    access and streams give the same ids, so one cache serves both. The keys enumerated are
    ``write_shards``' running numbers (:func:`member_key`); a shard keyed otherwise fails at
    caching, in ``anchor_input``, naming the key it lacks.
    """

    directory: Path
    index: dict

    def _init_access(self, sampler) -> None:
        self.max_anchor_views = 1 if sampler.paired is None else None
        self.anchor_views: int | None = None
        self._pid = None
        self._identities: dict[int, str] = {}

    def _state(self):
        # Open files and header scans belong to one process: a forked worker starts afresh.
        if self._pid != os.getpid():
            self._pid, self._members, self._files, self._positions = os.getpid(), {}, {}, {}
        return self._members, self._files

    def _scan(self, shard: int) -> list[tuple[str, dict[str, tuple[int, int]]]]:
        members, _ = self._state()
        if shard not in members:
            name = self.index["shards"][shard]
            members[shard] = read_offsets(self.directory / name)
            if len(members[shard]) != self.index["counts"][shard]:
                raise RuntimeError(
                    f"{name}: {len(members[shard])} samples, but {INDEX_FILE} "
                    f"says {self.index['counts'][shard]}; rewrite the shards"
                )
        return members[shard]

    def _fields(self, shard: int, position: int) -> tuple[str, dict[str, bytes]]:
        key, offsets = self._scan(shard)[position]
        _, files = self._state()
        if shard not in files:
            if len(files) >= 16:
                files.pop(next(iter(files))).close()
            name = self.index["shards"][shard]
            files[shard] = open(self.directory / name, "rb")  # noqa: SIM115 - cached handle
        handle = files[shard]
        out = {}
        for field, (offset, size) in offsets.items():
            handle.seek(offset)
            out[field] = handle.read(size)
        return key, out

    # ---------------------------------------------------------------- the anchor-cache protocol

    def _shard_identity(self, shard: int) -> str:
        """``SHARD@SIZE:MTIME_NS``, taken once per dataset (``anchor_view_ids`` refreshes it)."""
        if shard not in self._identities:
            name = self.index["shards"][shard]
            stat = (self.directory / name).stat()
            self._identities[shard] = f"{name}@{stat.st_size}:{stat.st_mtime_ns}"
        return self._identities[shard]

    def _shard_number(self, name: str) -> int | None:
        if not hasattr(self, "_numbers"):
            self._numbers = {n: i for i, n in enumerate(self.index["shards"])}
        return self._numbers.get(name)

    def _view_generator(self, name: str, key: str, view: int) -> torch.Generator:
        sample = zlib.crc32(f"{name}/{key}".encode())
        return torch.Generator().manual_seed((self.seed * 1_000_003 + sample) * 1_009 + view)

    def use_anchor_views(self, views: int | None) -> None:
        self.anchor_views = views

    def anchor_view_ids(self, views: int = 1) -> list[str]:
        """Every sample of every shard, in shard order (cache shards then cover consecutive tar
        shards, so the processes of cache_anchor.py read disjoint runs of tar files)."""
        self._identities = {}
        ids, number = [], 0
        for shard, count in enumerate(self.index["counts"]):
            identity = self._shard_identity(shard)
            for _ in range(count):
                base = f"{identity}/{member_key(number)}"
                number += 1
                ids.extend(
                    [base] if self.max_anchor_views == 1 else [f"{base}#{k}" for k in range(views)]
                )
        return ids

    def anchor_input(self, view_id: str) -> torch.Tensor:
        base, _, view = view_id.partition("#")
        identity, _, key = base.rpartition("/")
        name = identity.rpartition("@")[0]
        shard = self._shard_number(name)
        if shard is None or self._shard_identity(shard) != identity:
            raise KeyError(
                f"{self.directory}: no shard {identity} (the shard was rewritten or is gone)"
            )
        self._state()
        if shard not in self._positions:
            self._positions[shard] = {k: i for i, (k, _) in enumerate(self._scan(shard))}
        position = self._positions[shard].get(key)
        if position is None:
            raise KeyError(f"{self.directory / name}: no sample with key {key!r}")
        record, blobs = fields_to_sample(self._fields(shard, position)[1], f"{name}#{key}")
        if self.max_anchor_views == 1:
            return self.sampler._vision(_sources(self.sampler, record, blobs, True)["vision"])
        sources = _sources(self.sampler, record, blobs, True)
        generator = self._view_generator(name, key, int(view))
        return self.sampler(sources, record.meta, True, generator)["vision"]

    def _cached_view_sample(self, shard: int, key: str, record: Record, blobs: dict, generator):
        """Cache mode: the modality side as training draws it, and the id of the anchor view
        it pairs with (one of K seeded views per sample for aligned crops)."""
        name = self.index["shards"][shard]
        identity = f"{self._shard_identity(shard)}/{key}"
        sources = _sources(self.sampler, record, blobs, True)
        if self.max_anchor_views == 1:
            # The same draws as the uncached read, which takes the modality's first.
            modality = self.sampler.modality
            x = self.sampler._modality(sources[modality], True, generator)
            sample = {modality: x, "view_id": identity}
        else:
            view = int(torch.randint(self.anchor_views, (), generator=generator))
            generator = self._view_generator(name, key, view)
            sample = self.sampler(sources, record.meta, True, generator)
            sample.pop("vision")
            sample["view_id"] = f"{identity}#{view}"
        return _finish(sample, record)


class ShardDataset(ShardAccess, EpochRandom, Dataset):
    """Random access into tar shards (map-style)."""

    def __init__(self, directory: str | Path, sampler, train: bool, seed: int = 0):
        self.directory = Path(directory)
        self.index = read_index(self.directory)
        self.starts = [0]
        for count in self.index["counts"]:
            self.starts.append(self.starts[-1] + count)
        self.sampler, self.train, self.seed = sampler, train, seed
        self.vision = "vision" in self.index["keys"]
        self._init_access(sampler)

    def eval_mode(self) -> ShardDataset:
        """The same samples read as evaluation reads them (no augmentation, centre crops)."""
        view = copy.copy(self)
        view.train, view._pid = False, None  # its own file handles
        return view

    def __len__(self) -> int:
        return self.index["num_samples"]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        shard = bisect.bisect_right(self.starts, index) - 1
        position = index - self.starts[shard]
        where = f"{self.index['shards'][shard]}#{position}"
        key, fields = self._fields(shard, position)
        record, blobs = fields_to_sample(fields, where)
        generator = self.generator(index) if self.train else None
        if self.anchor_views is not None and self.train:
            return self._cached_view_sample(shard, key, record, blobs, generator)
        return _decode(self.sampler, record, blobs, self.train, generator, self.vision)


class ShardStream(ShardAccess, EpochRandom, Dataset):
    """Resampled shards streamed per rank and worker, behind the map-style interface the loop
    needs (``len`` and indices): ``__getitem__`` returns the next streamed sample, using the
    index only for its augmentation generator."""

    def __init__(
        self,
        directory: str | Path,
        sampler,
        train: bool,
        seed: int = 0,
        epoch_size: int | None = None,
        shuffle_buffer: int = 1000,
    ):
        self.directory = Path(directory)
        self.shuffle_buffer = int(shuffle_buffer)
        self.index = read_index(self.directory)
        self.urls = [str(self.directory / s) for s in self.index["shards"]]
        self.sampler, self.train, self.seed = sampler, train, seed
        self.epoch_size = int(epoch_size or self.index["num_samples"])
        self._stream_key = None
        self._failures = 0
        self._init_access(sampler)

    def _tar_error(self, exn: Exception) -> bool:
        """webdataset's handler for unreadable tar data: warn and go on, but not forever."""
        self._failures += 1
        if self._failures > MAX_TAR_ERRORS:
            raise RuntimeError(
                f"{self.directory}: {MAX_TAR_ERRORS} tar read errors in a row "
                f"(last: {exn}); the shards look broken"
            ) from exn
        warnings.warn(f"{self.directory}: skipping unreadable tar data ({exn})", stacklevel=2)
        return True

    def eval_mode(self) -> ShardStream:
        """The stream's samples without augmentation (still resampled: a stream has no fixed
        order), from a stream of its own."""
        view = copy.copy(self)
        view.train, view._stream_key, view._failures, view._pid = False, None, 0, None
        return view

    def __len__(self) -> int:
        return self.epoch_size

    def _stream(self):
        key = (os.getpid(), self.epoch)
        if self._stream_key != key:
            wds = _webdataset()
            # deterministic=True: the shard draws depend only on (rank, worker) through
            # webdataset's worker seed, and on the seed given here (run seed and epoch).
            seed = self.seed * 1_000_003 + self.epoch
            stages = [
                wds.ResampledShards(self.urls, seed=seed, deterministic=True),
                wds.tarfile_to_samples(handler=self._tar_error),
            ]
            if self.shuffle_buffer > 1:
                # Shards hold consecutive records: mix samples of several shards in a buffer.
                worker = wds.utils.pytorch_worker_seed()
                stages.append(
                    wds.shuffle(
                        self.shuffle_buffer,
                        min(100, self.shuffle_buffer),
                        seed=seed * 10_007 + worker,
                    )
                )
            pipeline = wds.DataPipeline(*stages)
            self._iterator, self._stream_key = iter(pipeline), key
        return self._iterator

    def __getitem__(self, index: int) -> dict:
        fields = next(self._stream())
        self._failures = 0
        where = f"{os.path.basename(fields.get('__url__', 'shard'))}#{fields.get('__key__')}"
        record, blobs = fields_to_sample(
            {k: v for k, v in fields.items() if not k.startswith("__")}, where
        )
        generator = self.generator(index) if self.train else None
        if self.anchor_views is not None and self.train:
            shard = self._shard_number(os.path.basename(fields.get("__url__", "")))
            if shard is None:
                raise RuntimeError(f"{where}: streamed from a shard not in {INDEX_FILE}")
            return self._cached_view_sample(shard, fields["__key__"], record, blobs, generator)
        return _decode(self.sampler, record, blobs, self.train, generator)


# --------------------------------------------------------------------------- feature shards
# ``write_shards.py --features MODALITY``: that modality's model inputs, computed once by the
# worker pipeline without augmentation and stored as fp16 .npy; training on such shards skips
# decoding and applies only the augmentation (spec.augment). The index records the options the
# features depend on (spec.feature_options); a run with other options is refused.


def feature_writer(spec, preprocess: dict) -> dict:
    """``write_shards(features=...)`` for ``spec``'s inputs under ``preprocess`` options."""
    if spec.feature_options is None or spec.load_source is None:
        raise ValueError(f"--features {spec.name}: this modality's features cannot be stored")
    options = {**spec.preprocess, **preprocess}
    if (options.get("features_on") or "worker") != "worker":
        raise ValueError("--features: stored features are worker features; drop features_on")

    def encode(path) -> bytes:
        x = torch.as_tensor(spec.load_source(path, options))  # no augmentation
        buffer = io.BytesIO()
        np.save(buffer, x.numpy().astype(np.float16), allow_pickle=False)
        return buffer.getvalue()

    recorded = json.loads(json.dumps(spec.feature_options(options), default=str))
    return {"key": spec.name, "dtype": "float16", "preprocess": recorded, "encode": encode}


def read_feature_blob(source) -> torch.Tensor:
    """A stored feature member -> float32 tensor; a damaged one is bad input."""
    try:
        array = np.load(io.BytesIO(bi.read_bytes(source)), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise BadSample("unreadable", f"{bi.source_name(source)}: bad features ({err})") from None
    return torch.from_numpy(array.astype(np.float32))


def check_feature_shards(index: dict, spec, preprocess: dict, directory) -> None:
    """Refuse feature shards written for another modality or other preprocessing options."""
    stored = index["features"]
    if stored["key"] != spec.name:
        raise ValueError(f"{directory}: feature shards of {stored['key']!r}, not {spec.name!r}")
    options = {**spec.preprocess, **preprocess}
    if (options.get("features_on") or "worker") != "worker":
        raise ValueError(
            f"{directory}: feature shards hold finished features; drop data.preprocess.features_on"
        )
    now = json.loads(json.dumps(spec.feature_options(options), default=str))
    diff = sorted(
        k for k in set(now) | set(stored["preprocess"]) if now.get(k) != stored["preprocess"].get(k)
    )
    if diff:
        pairs = ", ".join(
            f"{k}={now.get(k)!r} (shards: {stored['preprocess'].get(k)!r})" for k in diff
        )
        raise ValueError(
            f"{directory}: feature shards were written with other data.preprocess: {pairs}; "
            "rewrite them with train/write_shards.py --features or match the options"
        )


class FeatureSampler(mf.PairSampler):
    """PairSampler whose modality side is read from stored features, then augmented."""

    def _modality(self, source, train: bool, generator) -> torch.Tensor:
        x = read_feature_blob(source)
        if train and self.spec.augment is not None:
            x = self.spec.augment(x, train=True, generator=generator, **self.preprocess)
        return x


def sampler_for(index: dict, spec, preprocess: dict, anchor, directory) -> mf.PairSampler:
    """The sampler for a shard folder: feature shards are checked and read as features."""
    if index.get("features") is None:
        return mf.PairSampler(spec, preprocess, anchor)
    check_feature_shards(index, spec, preprocess, directory)
    return FeatureSampler(spec, preprocess, anchor)


@register_dataset("shards")
def build_shards(cfg, anchor, spec) -> DatasetBundle:
    opts = cfg.data.options
    directory = Path(opts.get("shards") or cfg.data.root or "")
    if not str(directory) or not (directory / INDEX_FILE).is_file():
        raise ValueError(
            f"dataset shards: no {INDEX_FILE} in {directory or '(unset)'}; set "
            f"data.root or data.options.shards to a folder from write_shards.py"
        )
    index = read_index(directory)
    for key in ("vision", spec.name):
        if key not in index["keys"]:
            raise ValueError(f"{directory}: the shards hold {index['keys']}, no {key!r} files")
    access = opts.get("access", "random")
    if access not in ("random", "stream"):
        raise ValueError(f"data.options.access: expected random or stream, got {access!r}")
    info = {"shards": str(directory), "num_shards": len(index["shards"]), "access": access}
    normalisation = mf.resolve_sensor_stats(
        cfg, spec, directory, index.get("source") or "--manifest MANIFEST"
    )
    if normalisation:
        info["normalisation"] = normalisation
    preprocess = {**spec.preprocess, **cfg.data.preprocess}
    sampler = sampler_for(index, spec, preprocess, anchor, directory)
    classnames = opts.get("classnames") or index.get("classnames")
    templates = opts.get("templates") or index.get("templates")

    def wrap(dataset, name, remember_bad=True):
        return bi.BadInputDataset(
            dataset,
            cfg.data.bad_input,
            cfg.seed,
            int(opts.get("max_consecutive_bad", 50)),
            int(opts.get("max_logged_bad", 20)),
            name,
            remember_bad=remember_bad,
        )

    if access == "stream":
        stream = ShardStream(
            directory,
            sampler,
            True,
            cfg.seed,
            opts.get("epoch_size"),
            int(opts.get("shuffle_buffer", 1000)),
        )
        train = wrap(stream, "train", remember_bad=False)
    else:
        train = wrap(ShardDataset(directory, sampler, True, cfg.seed), "train")
    evaluation = None
    if opts.get("eval_shards"):
        eval_index = read_index(opts["eval_shards"])
        # Evaluation reads finished features whatever the training batches carry.
        eval_options = {k: v for k, v in preprocess.items() if k != "features_on"}
        eval_sampler = sampler_for(eval_index, spec, eval_options, anchor, opts["eval_shards"])
        evaluation = wrap(ShardDataset(opts["eval_shards"], eval_sampler, False, cfg.seed), "eval")
    elif opts.get("eval_manifest"):
        eval_root = Path(opts.get("eval_root") or directory)
        path = mf._find(eval_root, opts["eval_manifest"])
        records, names = mf.read_manifest(path, eval_root, classnames)
        classnames = classnames or names
        vision = all("vision" in r.paths for r in records)
        evaluation = wrap(
            mf.RecordDataset(records, eval_root, sampler, False, cfg.seed, vision), "eval"
        )
    if evaluation is not None:
        info["eval_skipped"] = evaluation.counts
        info["eval_samples"] = len(evaluation)
    info["train_samples"] = len(train)
    return DatasetBundle(
        train=train,
        eval=evaluation,
        classnames=classnames,
        templates=list(templates or spec.templates) if classnames else templates,
        info=info,
    )
