"""NYU Depth v2's official labelled release -> the ``nyud`` layout the adapters read.

    python train/prepare_nyud.py --mat nyu_depth_v2_labeled.mat --splits splits.mat --out NYUD

Inputs, both from the dataset's page (cs.nyu.edu/~silberman/datasets/nyu_depth_v2.html):
``nyu_depth_v2_labeled.mat`` (MATLAB v7.3, an HDF5 file, read with h5py: ``images`` uint8
stored [N, 3, W, H], ``depths`` and ``rawDepths`` float metres [N, W, H], ``sceneTypes`` a
cell array of strings, i.e. object references to uint16 character arrays) and the official
``splits.mat`` (MATLAB v5, read with scipy: ``trainNdxs`` 795 and ``testNdxs`` 654 1-based
frame indices). For every frame of the split it writes

    NYUD/{train,test}/NNNN/image.png       RGB as stored (640x480), lossless
    NYUD/{train,test}/NNNN/depth.png       uint16 millimetres, rounded from the float metres
    NYUD/{train,test}/NNNN/scene.txt       the scene type as the release spells it (living_room)
    NYUD/{train,test}/NNNN/intrinsics.txt  NYU's colour camera (the depth is registered to it)

where NNNN is the frame's 1-based index in the .mat (splits.mat's numbering). ``--depth
rawDepths`` writes the Kinect's raw projected depth (0 where missing) instead of the
in-painted ``depths``. The folder is written as NYUD.tmp and renamed when complete, so NYUD is
never half-written; it is read back with the ``nyud`` layout before the rename, and a JSON
summary (frames per split, scene types and the nyud protocol's 10 classes per split) is
printed. Bad input (a missing file, a .mat without images/depths/sceneTypes, a splits file
without trainNdxs/testNdxs, indices out of range) stops with one line naming the file: the
inputs are checked before anything is written, and a failure while writing removes NYUD.tmp.

Why a converter rather than reading the .mat at training time: the PNG folder is what every
other tool reads (the dataset builder, compute_stats.py, write_shards.py, the protocols), the
2.8 GB HDF5 file is not opened in every data-loader worker (h5py handles do not survive a
fork), and nothing needs h5py afterwards. PNG keeps the RGB bit-exact and the depth to the
millimetre, finer than the Kinect's own depth steps.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from imagebind_lite.cli import OneLineArgumentParser

SOURCE = "cs.nyu.edu/~silberman/datasets/nyu_depth_v2.html"
MARKER = ".prepare_nyud"  # marks an interrupted run's NAME.tmp, which a new run may replace
DEPTH_KEYS = ("depths", "rawDepths")
# NYU Depth v2 colour camera, from the dataset toolbox's camera_params.m (pixels, 640x480).
FX, FY, CX, CY = 518.85790117450188, 519.46961112127485, 325.58244941119034, 253.73616633400465
SPLITS = (("train", "trainNdxs"), ("test", "testNdxs"))


class PrepareError(Exception):
    """Bad input or output: the message is the one line printed."""


def _h5py():
    try:
        import h5py
    except ImportError:
        raise PrepareError("reading the v7.3 .mat needs h5py: pip install h5py") from None
    return h5py


def _strings(f, cell, path: Path, name: str) -> list[str]:
    """A MATLAB cell array of strings (object references to uint16 chars) -> Python strings."""
    h5py = _h5py()
    if h5py.check_ref_dtype(cell.dtype) is not h5py.Reference:
        raise PrepareError(f"{path}: {name} is not a MATLAB cell array (object references)")
    out = []
    for ref in cell[()].ravel(order="F"):
        target = f[ref] if ref else None
        if not isinstance(target, h5py.Dataset) or target.dtype.kind not in "ui":
            raise PrepareError(f"{path}: {name} entry {len(out) + 1} is not a character array")
        chars = np.asarray(target[()]).ravel(order="F")
        if target.attrs.get("MATLAB_empty") or not chars.size:
            raise PrepareError(f"{path}: {name} entry {len(out) + 1} is empty")
        out.append("".join(map(chr, chars.tolist())).strip())
    return out


def read_mat(path: Path, depth_key: str):
    """Open and check the labelled .mat -> (h5py file, images, depth dataset, scene types)."""
    if not path.is_file():
        raise PrepareError(f"{path}: file not found (nyu_depth_v2_labeled.mat from {SOURCE})")
    h5py = _h5py()
    if not h5py.is_hdf5(str(path)):
        raise PrepareError(
            f"{path}: not a MATLAB v7.3 (HDF5) file; "
            f"expected nyu_depth_v2_labeled.mat from {SOURCE}"
        )
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise PrepareError(f"{path}: cannot be opened as HDF5 ({err})") from None
    try:
        missing = [k for k in ("images", depth_key, "sceneTypes") if k not in f]
        if missing:
            found = ", ".join(sorted(f.keys())) or "nothing"
            raise PrepareError(f"{path}: no {' or '.join(missing)} in the file (found: {found})")
        images, depths = f["images"], f[depth_key]
        if images.ndim != 4 or images.shape[1] != 3 or images.dtype != np.uint8:
            raise PrepareError(
                f"{path}: images must be uint8 [N, 3, W, H], found {images.dtype} {images.shape}"
            )
        n, _, width, height = images.shape
        if depths.shape != (n, width, height) or depths.dtype.kind != "f":
            raise PrepareError(
                f"{path}: {depth_key} must be float [{n}, {width}, {height}] like images, "
                f"found {depths.dtype} {depths.shape}"
            )
        scenes = _strings(f, f["sceneTypes"], path, "sceneTypes")
        if len(scenes) != n:
            raise PrepareError(f"{path}: {len(scenes)} sceneTypes for {n} images")
    except BaseException:
        f.close()
        raise
    return f, images, depths, scenes


def read_splits(path: Path, n: int) -> dict[str, list[int]]:
    """The official splits.mat -> {"train": [...], "test": [...]} of 1-based frame indices."""
    if not path.is_file():
        raise PrepareError(f"{path}: file not found (splits.mat from {SOURCE})")
    try:
        from scipy.io import loadmat
    except ImportError:
        raise PrepareError("reading splits.mat needs scipy: pip install scipy") from None
    try:
        mat = loadmat(str(path))
    except Exception as err:  # noqa: BLE001 - whatever scipy says, the file is not usable
        raise PrepareError(f"{path}: not a MATLAB v5 .mat file ({err})") from None
    missing = [key for _, key in SPLITS if key not in mat]
    if missing:
        found = ", ".join(k for k in mat if not k.startswith("__")) or "nothing"
        raise PrepareError(f"{path}: no {' or '.join(missing)} in the file (found: {found})")
    out, seen = {}, {}
    for split, key in SPLITS:
        values = np.asarray(mat[key]).ravel()
        if values.dtype.kind not in "uif" or not np.all(values == np.round(values)):
            raise PrepareError(f"{path}: {key} must hold whole frame indices")
        bad = values[(values < 1) | (values > n)]
        if bad.size:
            raise PrepareError(
                f"{path}: {key} index {int(bad[0])} is out of range: the .mat has frames 1..{n}"
            )
        for index in values.astype(np.int64).tolist():
            if index in seen:
                raise PrepareError(
                    f"{path}: frame {index} is listed twice ({seen[index]} and {key})"
                )
            seen[index] = key
        out[split] = values.astype(np.int64).tolist()
    return out


def _depth_mm(metres: np.ndarray, index: int, path: Path, key: str) -> np.ndarray:
    metres = np.where(np.isfinite(metres), metres, 0.0)  # no measurement, as 0 in the PNG
    mm = np.round(metres.astype(np.float64) * 1000.0)
    if mm.min() < 0 or mm.max() > 65535:
        raise PrepareError(
            f"{path}: {key} of frame {index} spans {metres.min():.3f}..{metres.max():.3f} m, "
            "outside the 0..65.535 m a uint16 millimetre PNG holds"
        )
    return mm.astype(np.uint16)


def write_frame(folder: Path, image, metres, scene: str, index: int, path: Path, key: str):
    """One frame in HDF5 order (image [3, W, H], depth [W, H]) -> the nyud files."""
    from PIL import Image

    folder.mkdir(parents=True)
    rgb = np.ascontiguousarray(np.transpose(image, (2, 1, 0)))  # -> [H, W, 3]
    Image.fromarray(rgb).save(folder / "image.png")
    Image.fromarray(_depth_mm(np.asarray(metres).T, index, path, key)).save(folder / "depth.png")
    (folder / "scene.txt").write_text(scene + "\n", encoding="utf-8")
    (folder / "intrinsics.txt").write_text(f"{FX!r} 0 {CX!r}\n0 {FY!r} {CY!r}\n0 0 1\n")


def _fresh_tmp(out: Path) -> Path:
    if out.exists():
        raise PrepareError(f"{out}: already exists; remove it or choose another --out")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        if not (tmp / MARKER).is_file():
            raise PrepareError(f"{tmp}: exists and was not left by prepare_nyud.py; remove it")
        shutil.rmtree(tmp)  # an interrupted run's leftovers
    tmp.mkdir(parents=True)
    (tmp / MARKER).write_text("written by train/prepare_nyud.py; renamed when complete\n")
    return tmp


def summarise(tmp: Path, splits: dict[str, list[int]], n: int) -> dict:
    """Read the written folder back with the nyud layout: frames, scene types and the nyud
    protocol's classes per split."""
    from imagebind_lite.data.adapters import read_layout
    from imagebind_lite.evaluation.protocols import get_protocol, prepare_records

    records, _ = read_layout("nyud", tmp)
    summary: dict = {"frames": {}, "scenes": {}, "classes": {}}
    for split in splits:
        mine = [r for r in records if r.split == split]
        _, labels, classnames, _ = prepare_records(get_protocol("nyud"), mine, None)
        summary["frames"][split] = len(mine)
        summary["scenes"][split] = dict(sorted(Counter(r.meta["scene"] for r in mine).items()))
        summary["classes"][split] = {c: labels.count(i) for i, c in enumerate(classnames)}
    summary["not_in_split"] = n - sum(len(v) for v in splits.values())
    return summary


def prepare(mat: Path, splits_path: Path, out: Path, depth_key: str = "depths") -> dict:
    """Check both inputs, write ``out`` atomically and return the summary."""
    f, images, depths, scenes = read_mat(mat, depth_key)
    with f:
        splits = read_splits(splits_path, images.shape[0])
        tmp = _fresh_tmp(out)
        try:
            for split, indices in splits.items():
                for index in indices:
                    i = index - 1
                    folder = tmp / split / f"{index:04d}"
                    write_frame(folder, images[i], depths[i], scenes[i], index, mat, depth_key)
            summary = summarise(tmp, splits, images.shape[0])
            (tmp / MARKER).unlink()
            tmp.rename(out)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, OSError):
                raise PrepareError(f"{out}: writing failed: {err}") from None
            raise
    return {"out": str(out), "depth": depth_key, **summary}


def main(argv: list[str] | None = None) -> dict:
    parser = OneLineArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mat", required=True, help="nyu_depth_v2_labeled.mat (v7.3)")
    parser.add_argument("--splits", required=True, help="the official splits.mat")
    parser.add_argument("--out", required=True, help="output folder (must not exist)")
    parser.add_argument(
        "--depth", choices=DEPTH_KEYS, default="depths", help="in-painted (default) or raw"
    )
    args = parser.parse_args(argv)
    summary = prepare(Path(args.mat), Path(args.splits), Path(args.out), args.depth)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    try:
        main()
    except PrepareError as err:
        sys.exit(f"prepare_nyud: {err}")
