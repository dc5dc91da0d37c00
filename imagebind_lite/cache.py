"""Caches of the frozen anchor's outputs: image embeddings for training, class-prompt embeddings
for zero-shot evaluation.

Image side. The anchor is frozen, so the embedding of a given image is a constant: computing it
once (``train/cache_anchor.py``) removes image decoding and the anchor forward from every
training step. A cache is a folder::

    manifest.json            anchor identity, dtype, dataset, plan, shard list, complete flag
    shard-00000.safetensors  "embeddings" [n, D], "input_stats" [n, 2]; ids in the metadata
    shard-00001.safetensors  ...

Entries are keyed by *view id*, not sample id: a training sample is paired with one anchor
input, and that input need not be fixed per sample. AV-MNIST pairs each clip with a random image
of its digit every epoch, so its views are the images (``digit-image-123``); the synthetic scenes
flip RGB and depth together, so each scene has two views (``scene-train-7`` and
``scene-train-7/flip``). Training with ``anchor.cache=DIR`` puts the dataset in cache mode: it
draws its pairing and augmentation exactly as before but emits ``"view_id"`` instead of
``"vision"``, and the wrapper below swaps the id for the cached embedding. With every view cached,
cached training sees the same pairs as uncached training and follows the same loss curve.

The trade-off: a cache holds a finite set of views. Augmentations of the image alone (random
resized crops, colour jitter) and crops that must stay aligned between RGB and a depth/thermal
image are drawn from a continuum, so they cannot all be cached. Either keep them on the fly (no
cache), or cache K views per image (``--views K``): the dataset then draws one of K fixed,
seeded augmentations per epoch, identically on both sides of the pair, which trades augmentation
diversity for speed. Datasets with a small finite view set (the flips above) are cached exactly.

A dataset supports caching by implementing::

    max_anchor_views: int | None        views per image it can draw (None: unbounded, needs K)
    anchor_view_ids(views) -> list[str] every view id training may pair, with ``views`` per image
    anchor_input(view_id) -> Tensor     the anchor's input (normalised pixels) for one view
    use_anchor_views(views | None)      int: emit "view_id", not "vision"; None: normal mode

A cache is valid only for the anchor that wrote it (model, weights, preprocessing): a different
anchor is refused with one line. Shards are written atomically (temporary file, fsync, rename)
and each carries the digest of the whole plan, so an interrupted run resumes by skipping the
shards that are complete and valid and recomputing the rest. Several processes
(``accelerate launch``) take shards round-robin.

Text side. ``cached_class_text_embeddings`` stores the prompt-ensembled class embeddings keyed
by the anchor's identity and a hash of class names and templates, under
``$IMAGEBIND_LITE_CACHE`` (default ``~/.cache/imagebind_lite``) or a given folder.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import struct
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ._version import __version__
from .config import ConfigError
from .data.bad_input import CACHE_PROTOCOL
from .data.datasets import eval_mode
from .evaluation.zero_shot import class_text_embeddings
from .files import atomic_write, atomic_write_json

CACHE_FORMAT = "imagebind_lite.anchor_cache/1"
TEXT_CACHE_FORMAT = "imagebind_lite.text_cache/1"
MANIFEST = "manifest.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CACHE_ENV = "IMAGEBIND_LITE_CACHE"


class StaleCacheError(ConfigError):
    """The cache was written for another anchor (or other data) than the one configured."""


# ----------------------------------------------------------------------------- anchor identity


def _weights_digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def anchor_fingerprint(anchor) -> dict:
    """What must match for cached anchor outputs to be reused: architecture, weights, image
    preprocessing. Weights are named by checkpoint sha256, else by open_clip tag; a random
    anchor (``pretrained=null``) is named by a digest of its weights, which differs every build."""
    ident = anchor.identity()
    if ident.get("sha256"):
        weights = f"sha256:{ident['sha256']}"
    elif anchor.pretrained is not None:
        weights = f"tag:{anchor.pretrained}"
    else:
        weights = f"random:{_weights_digest(anchor.model)}"
    return {
        "model": ident["model"],
        "weights": weights,
        "image_size": list(ident["image_size"]),
        "image_mean": [round(float(v), 8) for v in ident["image_mean"]],
        "image_std": [round(float(v), 8) for v in ident["image_std"]],
        "embed_dim": int(anchor.embed_dim),
    }


def _describe(fp: dict) -> str:
    size = "x".join(str(v) for v in fp.get("image_size", ["?"]))
    return f"{fp.get('model', '?')} ({fp.get('weights', '?')}, {size})"


def check_anchor(
    manifest: dict,
    anchor,
    where: str,
    fingerprint: dict | None = None,
    fix: str = "rebuild it with train/cache_anchor.py",
) -> None:
    """Refuse, in one line, a cache written by a different anchor."""
    cached = manifest.get("anchor_fingerprint") or {}
    current = fingerprint or anchor_fingerprint(anchor)
    if cached == current:
        return
    hint = ""
    if current["weights"].startswith("random:"):
        hint = " (anchor.pretrained is null: a random anchor differs on every build)"
    raise StaleCacheError(
        f"{where}: stale anchor cache: written for {_describe(cached)} but the configured "
        f"anchor is {_describe(current)} ({', '.join(_diff(cached, current))} differ){hint}; "
        f"{fix}"
    )


def _diff(a: dict, b: dict) -> list[str]:
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


# ----------------------------------------------------------------------------- dataset protocol


def require_cacheable(dataset, where: str = "anchor.cache") -> None:
    missing = [name for name in CACHE_PROTOCOL if not hasattr(dataset, name)]
    if missing:
        raise ConfigError(
            f"{where}: the training set {type(dataset).__name__} does not support anchor "
            f"caching (it lacks {', '.join(missing)}; see imagebind_lite/cache.py)"
        )


def resolve_views(dataset, views: int | None) -> int:
    """Views per image to cache: all the dataset can draw by default, at most that many."""
    most = dataset.max_anchor_views
    if views is None:
        if most is None:
            raise ConfigError(
                f"--views: {type(dataset).__name__} draws image augmentations from a continuum; "
                "choose how many fixed views per image to cache (--views K)"
            )
        return int(most)
    if views < 1:
        raise ConfigError(f"--views: must be at least 1, got {views}")
    return int(views) if most is None else min(int(views), int(most))


def input_stats(pixels: torch.Tensor) -> torch.Tensor:
    """A cheap content check of one anchor input: (mean, std) in float64."""
    flat = pixels.detach().double().flatten()
    return torch.stack([flat.mean(), flat.std(correction=0)])


# ----------------------------------------------------------------------------- shard files


def _plan_digest(view_ids: Sequence[str], shard_size: int, dtype: str, fp: dict) -> str:
    payload = json.dumps(
        {"ids": list(view_ids), "shard_size": shard_size, "dtype": dtype, "anchor": fp},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _read_shard(path: Path) -> tuple[dict, dict[str, torch.Tensor], str]:
    """(metadata, tensors, sha256) of a shard; raises ValueError on any damage."""
    data = path.read_bytes()
    if len(data) < 8:
        raise ValueError("truncated header")
    (header_len,) = struct.unpack("<Q", data[:8])
    if 8 + header_len > len(data):
        raise ValueError("truncated header")
    try:
        header = json.loads(data[8 : 8 + header_len])
        tensors = load_safetensors(data)
    except Exception as err:  # safetensors raises its own error types on damaged buffers
        raise ValueError(str(err)) from None
    return header.get("__metadata__", {}), tensors, hashlib.sha256(data).hexdigest()[:16]


def _shard_digest(path: Path, plan: str, ids: list[str]) -> str | None:
    """The sha256 of a complete shard of this plan holding exactly ``ids``, else None."""
    if not path.is_file():
        return None
    try:
        meta, tensors, digest = _read_shard(path)
    except (ValueError, OSError):
        return None
    ok = (
        meta.get("plan") == plan
        and json.loads(meta.get("ids", "null")) == ids
        and "embeddings" in tensors
        and tensors["embeddings"].shape[0] == len(ids)
    )
    return digest if ok else None


def _atomic_write_shard(path: Path, tensors: dict, metadata: dict) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


class _ViewInputs(Dataset):
    def __init__(self, dataset, view_ids: list[str]):
        self.dataset, self.view_ids = dataset, view_ids

    def __len__(self) -> int:
        return len(self.view_ids)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.dataset.anchor_input(self.view_ids[index])


class _SingleProcess:
    """The few Accelerator members the writer uses, for calls without Accelerate."""

    process_index, num_processes, is_main_process = 0, 1, True

    def __init__(self, device):
        self.device = torch.device(device)

    def wait_for_everyone(self) -> None:
        pass


# ----------------------------------------------------------------------------- writing


def write_anchor_cache(
    anchor,
    dataset,
    out_dir: str | Path,
    *,
    views: int | None = None,
    dataset_info: dict | None = None,
    batch_size: int = 256,
    shard_size: int = 4096,
    dtype: str = "float32",
    num_workers: int = 0,
    accelerator=None,
    overwrite: bool = False,
    max_shards: int | None = None,
    progress: bool = False,
) -> dict:
    """Embed every anchor view of ``dataset`` into ``out_dir``; resumable, split over processes.

    Returns a report: ``computed`` and ``skipped`` shard indices of this process, ``shards``,
    ``entries``, ``views``, ``complete``. ``max_shards`` stops this process after computing that
    many shards (an interruption, for tests); the cache then stays incomplete.
    """
    require_cacheable(dataset, "train/cache_anchor.py")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if shard_size < 1 or batch_size < 1:
        raise ConfigError("--shard-size and --batch-size must be at least 1")
    acc = accelerator or _SingleProcess(next(anchor.model.parameters()).device)
    out = Path(out_dir)
    requested, views = views, resolve_views(dataset, views)
    view_ids = list(dataset.anchor_view_ids(views))
    if len(set(view_ids)) != len(view_ids):
        raise ValueError(f"{type(dataset).__name__}.anchor_view_ids returned duplicate ids")
    fp = anchor_fingerprint(anchor)
    plan = _plan_digest(view_ids, shard_size, dtype, fp)
    shards = [view_ids[i : i + shard_size] for i in range(0, len(view_ids), shard_size)]
    manifest = {
        "format": CACHE_FORMAT,
        "complete": False,
        "anchor": anchor.identity(),
        "anchor_fingerprint": fp,
        "dtype": dtype,
        "compute_dtype": "float32",
        "embed_dim": int(anchor.embed_dim),
        "dataset": dict(dataset_info or {}, type=type(dataset).__name__),
        "views_requested": requested,  # None: all the dataset can draw
        "views": views,
        "num_entries": len(view_ids),
        "shard_size": shard_size,
        "plan": plan,
        "shards": [{"file": shard_name(i), "count": len(ids)} for i, ids in enumerate(shards)],
        "world_size": acc.num_processes,
        "versions": _versions(),
    }
    _open_cache_folder(out, manifest, anchor, acc, overwrite)
    embed = _ShardWriter(anchor, dataset, out, plan, dtype, batch_size, num_workers, acc)
    computed, skipped = embed.my_shards(shards, max_shards, progress)
    return {
        "out": str(out),
        "shards": len(shards),
        "entries": len(view_ids),
        "views": views,
        "computed": computed,
        "skipped": skipped,
        "complete": _finish_manifest(out, manifest, shards, acc),
    }


def _open_cache_folder(out: Path, manifest: dict, anchor, acc, overwrite: bool) -> None:
    """Refuse a folder holding another cache (unless ``overwrite``), then (main process) clear
    the debris of interrupted writes and write the incomplete manifest."""
    plan, manifest_path = manifest["plan"], out / MANIFEST
    previous = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    # Every process reaches the same verdict from the same file, so none waits on a crashed peer.
    if previous is not None and not overwrite:
        fp = manifest["anchor_fingerprint"]
        check_anchor(previous, anchor, f"--out {out}", fp, "use another --out or --overwrite")
        if previous.get("plan") != plan:
            raise ConfigError(
                f"--out {out}: holds a cache of other views ({previous.get('num_entries')} "
                f"entries, {previous.get('views')} view(s) per image, "
                f"dataset {previous.get('dataset', {}).get('name')}); use another folder "
                "or --overwrite"
            )
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        for leftover in out.glob(".*.tmp-*"):  # debris of an interrupted write
            leftover.unlink(missing_ok=True)
        if previous is not None and overwrite and previous.get("plan") != plan:
            for old in out.glob("shard-*.safetensors"):
                old.unlink()
        atomic_write_json(manifest_path, manifest)
    acc.wait_for_everyone()


class _ShardWriter:
    """Computes and writes this process's shards (round-robin over processes)."""

    def __init__(self, anchor, dataset, out, plan, dtype, batch_size, num_workers, acc):
        self.anchor, self.dataset, self.out, self.plan = anchor, dataset, out, plan
        self.dtype, self.batch_size, self.num_workers, self.acc = (
            dtype,
            batch_size,
            num_workers,
            acc,
        )

    def my_shards(self, shards: list, max_shards: int | None, progress: bool):
        """(computed, skipped) shard indices; complete valid shards are skipped."""

        acc = self.acc
        computed, skipped = [], []
        mine = list(range(acc.process_index, len(shards), acc.num_processes))
        bar = tqdm(total=len(mine), disable=not progress, desc=f"cache rank {acc.process_index}")
        for index in mine:
            if _shard_digest(self.out / shard_name(index), self.plan, shards[index]):
                skipped.append(index)
            elif max_shards is not None and len(computed) >= max_shards:
                break
            else:
                self.write(index, shards[index])
                computed.append(index)
            bar.update(1)
        bar.close()
        acc.wait_for_everyone()
        return computed, skipped

    def write(self, index: int, ids: list[str]) -> None:
        acc = self.acc
        embeddings, stats = _embed_views(
            self.anchor, self.dataset, ids, self.batch_size, self.num_workers, acc
        )
        tensors = {
            "embeddings": embeddings.to(DTYPES[self.dtype]).contiguous(),
            "input_stats": stats,
        }
        meta = {
            "format": CACHE_FORMAT,
            "plan": self.plan,
            "shard": str(index),
            "rank": str(acc.process_index),
            "ids": json.dumps(ids),
        }
        _atomic_write_shard(self.out / shard_name(index), tensors, meta)


def _finish_manifest(out: Path, manifest: dict, shards: list, acc) -> bool:
    """When every shard is complete, record their digests and mark the cache complete."""
    manifest_path, plan = out / MANIFEST, manifest["plan"]
    if acc.is_main_process:
        digests = [_shard_digest(out / shard_name(i), plan, ids) for i, ids in enumerate(shards)]
        if all(digests):
            for entry, digest in zip(manifest["shards"], digests):
                entry["sha256"] = digest
            manifest["complete"] = True
            atomic_write_json(manifest_path, manifest)
    acc.wait_for_everyone()
    return bool(json.loads(manifest_path.read_text()).get("complete"))


@torch.no_grad()
def _embed_views(anchor, dataset, ids, batch_size, num_workers, acc):
    loader = DataLoader(
        _ViewInputs(dataset, ids), batch_size=batch_size, shuffle=False, num_workers=num_workers
    )
    embeddings, stats = [], []
    for pixels in loader:
        stats.append(torch.stack([input_stats(p) for p in pixels]))
        embeddings.append(anchor.encode_image(pixels.to(acc.device)).float().cpu())
    return torch.cat(embeddings), torch.cat(stats)


def _versions() -> dict:
    import open_clip  # all of torchvision (~2 s): only when a cache is written (the anchor has it)

    return {
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "imagebind_lite": __version__,
    }


# ----------------------------------------------------------------------------- reading


class AnchorCache:
    """A complete cache folder loaded into memory: ``embeddings`` [N, D] and ``index`` id -> row."""

    def __init__(self, folder: str | Path, manifest: dict, ids: list[str], embeddings, stats):
        self.folder, self.manifest = Path(folder), manifest
        self.ids = ids
        self.index = {view_id: row for row, view_id in enumerate(ids)}
        self.embeddings, self.stats = embeddings, stats

    @property
    def views(self) -> int:
        return int(self.manifest["views"])

    @classmethod
    def open(cls, folder: str | Path, where: str = "anchor.cache") -> AnchorCache:
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise ConfigError(f"{where}: no anchor cache at {folder} ({MANIFEST} not found)")
        manifest = json.loads(path.read_text())
        if manifest.get("format") != CACHE_FORMAT:
            raise ConfigError(f"{where}: {path} has unknown format {manifest.get('format')!r}")
        done = [s for s in manifest["shards"] if (folder / s["file"]).is_file()]
        if not manifest.get("complete"):
            raise ConfigError(
                f"{where}: the cache at {folder} is incomplete ({len(done)}/"
                f"{len(manifest['shards'])} shards); rerun train/cache_anchor.py with the same "
                "arguments to finish it"
            )
        ids, embeddings, stats = [], [], []
        for entry in manifest["shards"]:
            try:
                meta, tensors, digest = _read_shard(folder / entry["file"])
            except (ValueError, OSError) as err:
                raise ConfigError(
                    f"{where}: shard {entry['file']} of {folder} is unreadable ({err}); rerun "
                    "train/cache_anchor.py with the same arguments to rewrite it"
                ) from None
            if digest != entry.get("sha256") or meta.get("plan") != manifest["plan"]:
                raise ConfigError(
                    f"{where}: shard {entry['file']} of {folder} does not match its manifest; "
                    "rerun train/cache_anchor.py with the same arguments to rewrite it"
                )
            ids.extend(json.loads(meta["ids"]))
            embeddings.append(tensors["embeddings"])
            stats.append(tensors["input_stats"])
        return cls(folder, manifest, ids, torch.cat(embeddings), torch.cat(stats))


class CachedAnchorDataset(Dataset):
    """A training set in cache mode whose samples carry ``"anchor_embedding"`` (float32)."""

    def __init__(self, dataset, cache: AnchorCache):
        self.dataset, self.cache = dataset, cache
        dataset.use_anchor_views(cache.views)

    def __len__(self) -> int:
        return len(self.dataset)

    def eval_mode(self) -> CachedAnchorDataset:
        """The cached pairs over the inner dataset's evaluation mode (still in cache mode)."""
        view = copy.copy(self)
        view.dataset = eval_mode(self.dataset)
        return view

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict:
        sample = self.dataset[index]
        sample.pop("vision", None)
        row = self.cache.index[sample.pop("view_id")]
        sample["anchor_embedding"] = self.cache.embeddings[row].float()
        return sample


def attach_anchor_cache(
    dataset, folder: str | Path, anchor, dataset_name: str | None = None, spot_checks: int = 4
) -> CachedAnchorDataset:
    """Check a cache against the anchor and the dataset, then wrap the dataset to read it.

    Refused (``ConfigError``, one line): a missing, incomplete or damaged cache; another anchor;
    another dataset; a view the dataset can draw that is not cached; and anchor inputs that no
    longer match what was cached (a few views are recomputed and compared by mean and std).
    """
    where = "anchor.cache"
    require_cacheable(dataset, where)
    cache = AnchorCache.open(folder, where)
    check_anchor(cache.manifest, anchor, where)
    cached_name = cache.manifest.get("dataset", {}).get("name")
    if dataset_name is not None and cached_name not in (None, dataset_name):
        raise StaleCacheError(
            f"{where}: {folder} caches dataset {cached_name!r}, not {dataset_name!r}"
        )
    needed = list(dataset.anchor_view_ids(cache.views))
    missing = [view_id for view_id in needed if view_id not in cache.index]
    if missing:
        raise StaleCacheError(
            f"{where}: {folder} lacks {len(missing)} of the {len(needed)} views this training "
            f"set draws (e.g. {missing[0]!r}); it was written for other data options; "
            "rebuild it with train/cache_anchor.py"
        )
    step = max(1, len(needed) // max(1, spot_checks))
    for view_id in needed[::step][:spot_checks]:
        now = input_stats(dataset.anchor_input(view_id))
        then = cache.stats[cache.index[view_id]]
        if not torch.allclose(now, then, rtol=1e-4, atol=1e-6):
            raise StaleCacheError(
                f"{where}: the anchor input of {view_id!r} differs from the cached one (mean/std "
                f"{now.tolist()} vs {then.tolist()}): the data or its preprocessing changed; "
                "rebuild it with train/cache_anchor.py"
            )
    return CachedAnchorDataset(dataset, cache)


# ----------------------------------------------------------------------------- text side


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "imagebind_lite")


def text_cache_key(anchor, classnames: Sequence[str], templates: Sequence[str]) -> str:
    payload = {
        "format": TEXT_CACHE_FORMAT,
        "anchor": anchor_fingerprint(anchor),
        "classnames": list(classnames),
        "templates": list(templates),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def cached_class_text_embeddings(
    anchor,
    classnames: Sequence[str],
    templates: Sequence[str],
    cache_dir: str | Path | None = None,
) -> torch.Tensor:
    """``class_text_embeddings(anchor.encode_text, ...)``, computed once per anchor and prompt set.

    Stored as ``<cache_dir>/text/<key>.safetensors``; the key hashes the anchor's identity, the
    class names and the templates. A random anchor (``pretrained=null``) is never stored: its
    weights change on every build. A cache folder that cannot be written only costs the reuse.
    """
    device = next(anchor.model.parameters()).device
    if anchor.pretrained is None:
        return class_text_embeddings(anchor.encode_text, classnames, templates)
    path = Path(cache_dir or default_cache_dir()) / "text"
    path = path / f"{text_cache_key(anchor, classnames, templates)}.safetensors"
    if path.is_file():
        try:
            _, tensors, _ = _read_shard(path)
            emb = tensors["embeddings"]
            if emb.shape == (len(classnames), anchor.embed_dim):
                return emb.to(device)
        except (ValueError, OSError, KeyError):
            pass  # damaged: recompute and replace below
    emb = class_text_embeddings(anchor.encode_text, classnames, templates)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": TEXT_CACHE_FORMAT,
            "anchor": json.dumps(anchor.identity()),
            "classnames": json.dumps(list(classnames)),
            "templates": json.dumps(list(templates)),
        }
        _atomic_write_shard(path, {"embeddings": emb.detach().float().cpu().contiguous()}, meta)
    except OSError as err:
        warnings.warn(f"text embedding cache not written ({path}): {err}", stacklevel=2)
    return emb
