"""train/prepare_nyud.py on a small NYU Depth v2 release in the official file structure: a
MATLAB v7.3 (HDF5) nyu_depth_v2_labeled.mat in HDF5 axis order with sceneTypes as object
references to uint16 characters, and a MATLAB v5 splits.mat of 1-based indices. Pixels and
depth are real: crops of the two SUN RGB-D frames in tests/data (6 frames of 64x48)."""

import importlib.util
import json
import os
import shlex

import h5py
import numpy as np
import pytest
import scipy.io
import torch
from conftest import REPO, TEST_DATA, run_script
from PIL import Image

from imagebind_lite.anchor import Anchor
from imagebind_lite.checkpoint import save_model
from imagebind_lite.config import AnchorConfig, config_to_dict
from imagebind_lite.data import depth
from imagebind_lite.data.adapters import read_layout
from imagebind_lite.evaluation.protocols import NYU_D_CLASSES
from imagebind_lite.modalities import build_encoder

# The commands docs/evaluation.md and README.md print, run verbatim below (RUN: a model folder).
PREPARE = (
    "python train/prepare_nyud.py --mat nyu_depth_v2_labeled.mat --splits splits.mat --out NYUD"
)
ZERO_SHOT = "python eval/zero_shot.py --checkpoint RUN --dataset nyud --root NYUD"

W, H = 64, 48  # not square: a transposed image cannot pass for the original
TOY = TEST_DATA / "sunrgbd_toy" / "images"
SOURCES = (  # (frame folder, crop origins x, y)
    ("2014-12-18_11-31-54_260595134347", ((0, 0), (300, 200), (600, 400))),
    ("img_0063", ((0, 0), (250, 180), (480, 360))),
)
SCENES = ["bedroom", "kitchen", "living_room", "excercise_room", "cafe", "bedroom"]
TRAIN, TEST = [1, 3, 4], [2, 5, 6]


def _load(pattern):
    path = next(iter(sorted(TOY.glob(pattern))))
    return np.array(Image.open(path))


def toy_frames() -> list[dict]:
    """6 frames: RGB [H, W, 3] uint8, filled and raw depth [H, W] float32 metres."""
    frames = []
    for folder, origins in SOURCES:
        rgb = _load(f"{folder}/image/*.jpg")
        filled = depth.decode_depth(_load(f"{folder}/depth_bfx/*.png"), "sunrgbd")
        raw = depth.decode_depth(_load(f"{folder}/depth/*.png"), "sunrgbd")
        for x, y in origins:
            box = (slice(y, y + H), slice(x, x + W))
            frames.append({"rgb": rgb[box], "depth": filled[box], "raw": raw[box]})
    for frame, scene in zip(frames, SCENES):
        frame["scene"] = scene
    return frames


def _cell(f, name, strings):
    """A MATLAB cell array of strings as v7.3 stores it: [1, N] object references to uint16
    character arrays [L, 1] in #refs#."""
    refs = f.require_group("#refs#")
    cell = f.create_dataset(name, (1, len(strings)), dtype=h5py.ref_dtype)
    for j, text in enumerate(strings):
        chars = np.array([ord(c) for c in text], np.uint16).reshape(-1, 1)
        target = refs.create_dataset(f"{name}{j}", data=chars)
        target.attrs["MATLAB_class"] = np.bytes_("char")
        target.attrs["MATLAB_int_decode"] = np.int32(2)
        cell[0, j] = target.ref
    cell.attrs["MATLAB_class"] = np.bytes_("cell")


def write_labeled_mat(path, frames, skip=()):
    """nyu_depth_v2_labeled.mat's structure: MATLAB's [H, W, 3, N] is HDF5's [N, 3, W, H]."""
    arrays = {
        "images": (np.stack([np.transpose(f["rgb"], (2, 1, 0)) for f in frames]), "uint8"),
        "depths": (np.stack([f["depth"].T for f in frames]), "single"),
        "rawDepths": (np.stack([f["raw"].T for f in frames]), "single"),
        "labels": (np.zeros((len(frames), W, H), np.uint16), "uint16"),
    }
    with h5py.File(path, "w", userblock_size=512) as f:
        for name, (data, matlab_class) in arrays.items():
            if name not in skip:
                f.create_dataset(name, data=data).attrs["MATLAB_class"] = np.bytes_(matlab_class)
        if "sceneTypes" not in skip:
            _cell(f, "sceneTypes", [fr["scene"] for fr in frames])
        _cell(f, "scenes", [f"{fr['scene']}_{i + 1:04d}" for i, fr in enumerate(frames)])
        _cell(f, "names", ["bed", "wall"])
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  2 12:00:00 2012 "
    header += b"HDF5 schema 1.00 ."
    with open(path, "r+b") as handle:  # the 128-byte MAT header in the HDF5 user block
        handle.write(header.ljust(116, b" ") + bytes(8) + b"\x00\x02IM")


def write_splits(path, train=TRAIN, test=TEST, **extra):
    """splits.mat: MATLAB v5, column vectors of 1-based indices (doubles, MATLAB's default)."""
    data = {"trainNdxs": train, "testNdxs": test, **extra}
    arrays = {k: np.asarray(v, np.float64).reshape(-1, 1) for k, v in data.items() if v is not None}
    scipy.io.savemat(path, arrays, format="5")


def _script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "train" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(command, cwd):
    """A documented command line, verbatim, from a folder where ``train`` is the checkout's
    (``python`` is this interpreter, forked warm: ``run_script``)."""
    if not (cwd / "train").exists():
        (cwd / "train").symlink_to(REPO / "train")
    argv = shlex.split(command)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return run_script(argv[1:], cwd=cwd, env=env, timeout=300)


@pytest.fixture(scope="module")
def frames():
    return toy_frames()


@pytest.fixture()
def release(tmp_path, frames):
    write_labeled_mat(tmp_path / "nyu_depth_v2_labeled.mat", frames)
    write_splits(tmp_path / "splits.mat")
    return tmp_path


def test_documented_commands_are_printed_in_the_docs():
    docs = (REPO / "docs" / "evaluation.md").read_text() + (REPO / "README.md").read_text()
    assert PREPARE in docs and ZERO_SHOT in docs


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, frames):
    """The documented command, run once on the release (beside an interrupted run's NYUD.tmp,
    which it replaces)."""
    folder = tmp_path_factory.mktemp("nyud")
    write_labeled_mat(folder / "nyu_depth_v2_labeled.mat", frames)
    write_splits(folder / "splits.mat")
    stale = folder / "NYUD.tmp"
    stale.mkdir()
    (stale / ".prepare_nyud").write_text("")
    (stale / "leftover.png").write_bytes(b"half a file")
    return folder, _run(PREPARE, folder)


def test_prepare_writes_the_nyud_layout_from_the_official_files(prepared, frames):
    folder, proc = prepared
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    out = folder / "NYUD"
    assert not (folder / "NYUD.tmp").exists()
    assert sorted(p.name for p in out.iterdir()) == ["test", "train"]  # no marker, no leftover
    assert summary["frames"] == {"train": 3, "test": 3} and summary["not_in_split"] == 0
    assert summary["scenes"]["test"] == {"bedroom": 1, "cafe": 1, "kitchen": 1}
    assert summary["scenes"]["train"] == {"bedroom": 1, "excercise_room": 1, "living_room": 1}
    folded = {k: v for k, v in summary["classes"]["test"].items() if v}
    assert list(summary["classes"]["test"]) == NYU_D_CLASSES
    assert folded == {"bedroom": 1, "kitchen": 1, "other": 1}  # cafe scores as "other"
    assert {k: v for k, v in summary["classes"]["train"].items() if v} == {
        "bedroom": 1,
        "living room": 1,
        "other": 1,
    }

    records, _ = read_layout("nyud", out)
    assert [(r.id, r.split) for r in records] == [
        *[(f"test/{i:04d}", "test") for i in TEST],
        *[(f"train/{i:04d}", "train") for i in TRAIN],
    ]
    for record in records:
        source = frames[int(record.id.split("/")[1]) - 1]
        image = np.array(Image.open(record.paths["vision"]))
        assert image.shape == (H, W, 3) and np.array_equal(image, source["rgb"])  # not .T
        mm = np.array(Image.open(record.paths["depth"]))
        assert mm.dtype == np.uint16 and mm.shape == (H, W)
        metres = depth.read_depth(record.paths["depth"], layout=record.meta["layout"])[0]
        assert np.array_equal(metres.numpy(), source["depth"])  # bit-exact float32 metres
        assert record.meta["scene"] == source["scene"] and record.meta["layout"] == "mm"
        K = depth.read_intrinsics(record.paths["intrinsics"])
        assert K[0, 0].item() == pytest.approx(depth.NYU_FX, abs=1e-4)
        assert (K[0, 2].item(), K[1, 2].item()) == pytest.approx((325.5824, 253.7362), abs=1e-4)


def test_zero_shot_command_reads_the_prepared_folder(prepared, tmp_path, monkeypatch):
    folder, proc = prepared
    assert proc.returncode == 0, proc.stderr[-2000:]
    anchor = Anchor(AnchorConfig())
    pre = {"image_size": 32, "mean": 20.0, "std": 10.0}
    sizes = {"depth": 1, "width": 32, "heads": 2}
    torch.manual_seed(0)
    model = tmp_path / "model"  # an untrained tiny depth encoder, saved as a model folder
    save_model(
        build_encoder("depth", anchor.embed_dim, "tiny", sizes, pre).eval(),
        {
            "modality": "depth",
            "modality_file": None,
            "size": "tiny",
            "overrides": sizes,
            "preprocess": pre,
            "temperature": 0.2,
            "embed_dim": anchor.embed_dim,
            "anchor": {**anchor.identity(), "config": config_to_dict(AnchorConfig())},
        },
        model,
    )
    monkeypatch.chdir(folder)  # --root NYUD, relative, as documented
    spec = importlib.util.spec_from_file_location("zero_shot", REPO / "eval" / "zero_shot.py")
    zero_shot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zero_shot)
    argv = shlex.split(ZERO_SHOT.replace("RUN", str(model)))[2:]  # after "python eval/..."
    result = zero_shot.main([*argv, "--no-progress"])
    assert result["num_records"] == result["num_evaluated"] == len(TEST)
    assert result["classnames"] == NYU_D_CLASSES and result["skipped"] == 0


def test_raw_depths_and_the_same_frames_in_process(release, frames):
    prepare_nyud = _script("prepare_nyud")
    summary = prepare_nyud.main(
        [
            "--mat",
            str(release / "nyu_depth_v2_labeled.mat"),
            "--splits",
            str(release / "splits.mat"),
        ]
        + ["--out", str(release / "raw"), "--depth", "rawDepths"]
    )
    assert summary["depth"] == "rawDepths" and summary["frames"] == {"train": 3, "test": 3}
    holes = 0
    for index in TRAIN + TEST:
        split = "train" if index in TRAIN else "test"
        mm = np.array(Image.open(release / "raw" / split / f"{index:04d}" / "depth.png"))
        expected = frames[index - 1]["raw"]
        assert np.array_equal(mm == 0, expected == 0)  # holes stay holes (0)
        assert np.array_equal(mm.astype(np.float32) / np.float32(1000), expected)
        holes += int((mm == 0).sum())
    assert holes > 1000  # the raw maps have holes; the filled ones (depths) have none
    assert all((f["depth"] > 0).all() for f in frames)


def _bad(case, folder, frames):
    mat, splits = folder / "nyu_depth_v2_labeled.mat", folder / "splits.mat"
    kind, _, detail = case.partition(":")
    if kind == "mat-skip":
        write_labeled_mat(mat, frames, skip=(detail,))
    elif kind != "no-mat":
        write_labeled_mat(mat, frames)
    if kind == "mat-v5":
        write_splits(mat)  # a MATLAB v5 file where the v7.3 release belongs
    if kind == "splits":
        write_splits(splits, **json.loads(detail))
    elif kind != "no-splits":
        write_splits(splits)
    if kind == "depth-range":  # a frame past what uint16 millimetres hold: fails mid-write
        with h5py.File(mat, "r+") as f:
            f["depths"][4, 0, 0] = 70.0
    if kind == "tmp-not-ours":
        (folder / "NYUD.tmp").mkdir()
    if kind == "out-exists":
        (folder / "NYUD").mkdir()


BAD = {
    "no-mat": ("nyu_depth_v2_labeled.mat", "file not found"),
    "mat-v5": ("nyu_depth_v2_labeled.mat", "not a MATLAB v7.3 (HDF5) file"),
    "mat-skip:images": ("nyu_depth_v2_labeled.mat", "no images in the file"),
    "mat-skip:depths": ("nyu_depth_v2_labeled.mat", "no depths in the file"),
    "mat-skip:sceneTypes": ("nyu_depth_v2_labeled.mat", "no sceneTypes in the file"),
    "no-splits": ("splits.mat", "file not found"),
    'splits:{"train": null}': ("splits.mat", "no trainNdxs in the file"),
    'splits:{"test": null}': ("splits.mat", "no testNdxs in the file"),
    'splits:{"test": [2, 5, 7]}': ("splits.mat", "testNdxs index 7 is out of range"),
    'splits:{"train": [0, 1]}': ("splits.mat", "trainNdxs index 0 is out of range"),
    'splits:{"test": [2, 3]}': ("splits.mat", "frame 3 is listed twice"),
    "depth-range": ("nyu_depth_v2_labeled.mat", "depths of frame 5 spans"),
    "tmp-not-ours": ("NYUD.tmp", "was not left by prepare_nyud.py"),
    "out-exists": ("NYUD", "already exists"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_leaves_no_output(case, tmp_path, frames):
    _bad(case, tmp_path, frames)
    proc = _run(PREPARE, tmp_path)
    name, problem = BAD[case]
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"prepare_nyud: {name}: ") and problem in proc.stderr
    assert (tmp_path / "NYUD").exists() == (case == "out-exists")
    assert (tmp_path / "NYUD.tmp").exists() == (case == "tmp-not-ours")
