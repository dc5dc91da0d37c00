"""Depth and thermal readers, aligned paired crops and the normalisation statistics, on the two
real SUN RGB-D frames in tests/data, and infrared-format files written from them."""

import csv
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, TEST_DATA, run_script
from PIL import Image

from imagebind_lite.config import load_config
from imagebind_lite.data import depth, thermal
from imagebind_lite.data.adapters import read_layout
from imagebind_lite.data.datasets import BadSample, get_dataset_builder
from imagebind_lite.data.transforms import PairedTransform, center_box, resized_crop
from imagebind_lite.modalities import get_modality

sys.path.insert(0, str(REPO / "train"))
import compute_stats  # noqa: E402

TOY = "sunrgbd_toy/images"


@pytest.fixture(scope="module")
def anchor():
    from imagebind_lite.anchor import Anchor
    from imagebind_lite.config import AnchorConfig

    return Anchor(AnchorConfig(pretrained=None))


def frames():
    records, names = read_layout("sunrgbd", TEST_DATA / "sunrgbd_toy")
    return records, names


# --------------------------------------------------------------------------------------------
# Depth on real SUN RGB-D frames


def test_sunrgbd_depth_is_bit_rotated_millimetres():
    records, _ = frames()
    for record in records:
        raw = np.array(Image.open(record.paths["depth"]), dtype=np.uint16)
        metres = depth.read_depth(record.paths["depth"])[0].numpy()
        # By hand, on a few stored values: rotate the 16 bits right by 3, then mm -> m.
        rows, cols = np.nonzero(raw)
        for r, c in list(zip(rows, cols))[:: max(1, len(rows) // 7)][:7]:
            d = int(raw[r, c])
            expected = (((d >> 3) | (d << 13)) & 0xFFFF) / 1000
            assert metres[r, c] == pytest.approx(min(expected, 8.0), abs=1e-6)
        valid = metres[metres > 0]
        assert 0.3 <= valid.min() and valid.max() <= 8.0 and np.median(valid) > 0.5
        # The same bits read as plain millimetres would put the room 8x further away.
        plain = depth.read_depth(record.paths["depth"], layout="mm", max_depth=1e9)[0].numpy()
        assert np.median(plain[plain > 0]) > 4 * np.median(valid)


def test_intrinsics_fx_and_disparity():
    records, _ = frames()
    by_name = {r.id.split("/")[-1]: r for r in records}
    record = by_name["img_0063"]
    K = depth.read_intrinsics(record.paths["intrinsics"])
    assert K[0, 0] == pytest.approx(520.532) and K[1, 1] == pytest.approx(520.7444)
    assert K[0, 2] == pytest.approx(277.9258) and K[2, 2] == 1
    disparity, valid = depth.depth_input(record.paths["depth"])  # intrinsics found beside it
    metres = depth.read_depth(record.paths["depth"])
    expected = 0.075 * 520.532 / metres[valid]
    assert torch.allclose(disparity[valid], expected.float(), rtol=1e-5)
    assert bool((disparity[~valid] == 0).all())
    # A RealSense frame gets the larger baseline from its folder name.
    assert depth.resolve_baseline("auto", "SUNRGBD/realsense/lg/0001/depth/x.png") == 0.095
    assert depth.resolve_baseline("auto", "anything/else.png") == 0.075


def test_raw_depth_holes_stay_invalid_after_resizing():
    records, _ = frames()
    raw_depth = records[0].paths["depth"].parent.parent / "depth"
    path = sorted(raw_depth.glob("*.png"))[0]
    values, valid = depth.depth_input(path)
    assert 0 < float(valid.float().mean()) < 1  # the raw (unfilled) map has holes
    out = resized_crop(values, center_box(*values.shape[-2:]), 64, valid=valid)
    low = float(values[valid].min())
    # Holes are 0, and no output pixel is a blend of a hole with a real value.
    assert bool(((out == 0) | (out >= low - 1e-3)).all()) and bool((out == 0).any())


def test_wrong_depth_files_are_refused(tmp_path):
    Image.fromarray(np.full((20, 20), 128, np.uint8)).save(tmp_path / "eight_bit.png")
    Image.fromarray(np.zeros((20, 20), np.uint16)).save(tmp_path / "zeros.png")
    Image.fromarray(np.full((1, 1), 900, np.uint16)).save(tmp_path / "tiny.png")
    np.save(tmp_path / "nan.npy", np.full((20, 20), np.nan, np.float32))
    for name, reason in (
        ("eight_bit.png", "wrong_shape"),
        ("zeros.png", "empty"),
        ("tiny.png", "wrong_shape"),
        ("nan.npy", "nan"),
        ("absent.png", "missing"),
    ):
        with pytest.raises(BadSample) as info:
            depth.read_depth(tmp_path / name)
        assert info.value.reason == reason and name in str(info.value)
    Image.fromarray(np.full((20, 20), 1500, np.uint16)).save(tmp_path / "alone.png")
    with pytest.raises(BadSample, match="no focal length") as info:
        depth.depth_input(tmp_path / "alone.png", layout="mm")
    assert info.value.reason == "missing"


# --------------------------------------------------------------------------------------------
# Aligned crops


def ramps(height, width):
    x = ((torch.arange(width) + 0.5) / width).expand(height, width)
    y = ((torch.arange(height) + 0.5) / height)[:, None].expand(height, width)
    return x, y


def test_paired_crops_stay_aligned_across_resolutions():
    # The scene: x and y in relative coordinates. RGB 30x40, sensor 53x71 (another aspect).
    x1, y1 = ramps(30, 40)
    x2, y2 = ramps(53, 71)
    rgb = torch.stack([x1, y1, torch.full_like(x1, 0.5)])
    sensor_x, sensor_y = x2[None], y2[None]
    # Outputs larger than both images: pure bilinear sampling, exact on a linear ramp.
    transform = PairedTransform((96, 96), (96, 96), erase_p=0.0)
    flips = set()
    for seed in range(12):
        out = []
        for sensor in (sensor_x, sensor_y):
            g = torch.Generator().manual_seed(seed)
            out.append(transform(rgb, sensor, True, g))
        (rgb_out, sx), (_, sy) = out
        box, flip = transform.boxes((30, 40), True, torch.Generator().manual_seed(seed))
        flips.add(flip)
        # Expected relative coordinates of the output pixel centres.
        t = (torch.arange(96) + 0.5) / 96
        ex = box[1] + (1 - t if flip else t) * box[3]
        ey = box[0] + t * box[2]
        # Away from the outer half pixel of either image (border clamping), exact.
        mx = (ex > 1 / 40) & (ex < 1 - 1 / 40)
        my = (ey > 1 / 30) & (ey < 1 - 1 / 30)
        m = my[:, None] & mx[None, :]
        assert torch.allclose(rgb_out[0][m], ex.expand(96, 96)[m].float(), atol=1e-5)
        assert torch.allclose(sx[0][m], ex.expand(96, 96)[m].float(), atol=1e-5)
        assert torch.allclose(rgb_out[1][m], ey[:, None].expand(96, 96)[m].float(), atol=1e-5)
        assert torch.allclose(sy[0][m], ey[:, None].expand(96, 96)[m].float(), atol=1e-5)
    assert flips == {True, False}


def test_paired_crops_aligned_when_downscaling_roadscene_sizes():
    # RoadScene's first pair: 1404x1026 visible, 500x329 infrared (different aspect ratios).
    x1, _ = ramps(1026, 1404)
    x2, _ = ramps(329, 500)
    rgb = torch.stack([x1, x1, x1])
    transform = PairedTransform((32, 32), (24, 24), erase_p=0.0)
    for seed in range(6):
        rgb_out, ir_out = transform(rgb, x2[None], True, torch.Generator().manual_seed(seed))
        # Different output sizes: compare both with the ramp at their own pixel centres.
        box, flip = transform.boxes((1026, 1404), True, torch.Generator().manual_seed(seed))
        for out, n in ((rgb_out[0], 32), (ir_out[0], 24)):
            t = (torch.arange(n) + 0.5) / n
            ex = (box[1] + (1 - t if flip else t) * box[3]).float()
            assert torch.allclose(out[2:-2, 2:-2], ex[2:-2].expand(n - 4, n - 4), atol=2e-3)


def test_eval_crop_is_the_same_centre_square_and_erase_hits_only_the_sensor():
    x1, _ = ramps(30, 60)
    x2, _ = ramps(15, 30)
    transform = PairedTransform((16, 16), (16, 16), erase_p=1.0)
    rgb_out, sensor_out = transform(torch.stack([x1] * 3), x2[None], False)
    # Antialiased downscaling moves values by < 1e-3 of the image (0.02 output pixels).
    assert torch.allclose(rgb_out[0], sensor_out[0], atol=2e-3)  # and no erase in evaluation
    t = (torch.arange(16) + 0.5) / 16
    assert torch.allclose(rgb_out[0, 0], 0.25 + 0.5 * t, atol=2e-3)  # centre square of 2:1
    g = torch.Generator().manual_seed(0)
    rgb_out, sensor_out = transform(torch.stack([x1] * 3), x2[None], True, g)
    erased = sensor_out[0] == 0
    assert bool(erased.any()) and not bool((rgb_out[0] == 0).any())


# --------------------------------------------------------------------------------------------
# Thermal


def infrared_frame(tmp_path, scene: int = 0, size=(500, 329)) -> tuple:
    """(visible path, 8-bit infrared path): a real RGB-D frame's filled depth stretched to 8-bit
    gray at another resolution and aspect ratio, as a separate sensor's frame of the same view
    is (RoadScene's infrared is 500x329 beside a larger visible image)."""
    record = sorted(frames()[0], key=lambda r: r.id)[scene]
    metres = depth.read_depth(record.paths["depth"])[0].numpy()
    gray = (255 * (metres - metres.min()) / (metres.max() - metres.min())).astype(np.uint8)
    path = tmp_path / f"ir_{scene}.png"
    Image.fromarray(gray).resize(size, Image.Resampling.BILINEAR).save(path)
    return record.paths["vision"], path


def test_thermal_8bit_reader(tmp_path):
    _, ir = infrared_frame(tmp_path)
    x = thermal.read_thermal(ir)
    gray = np.asarray(Image.open(ir), dtype=np.float32)
    assert x.shape == (1, 329, 500) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.from_numpy(gray) / 255)


def test_thermal_rgb_gray_16bit_and_refusals(tmp_path):
    _, ir = infrared_frame(tmp_path)
    gray = np.asarray(Image.open(ir), dtype=np.float32) / 255
    Image.open(ir).convert("RGB").save(tmp_path / "as_rgb.jpg", quality=95)
    as_rgb = thermal.read_thermal(tmp_path / "as_rgb.jpg")
    assert as_rgb.shape == (1, 329, 500)
    assert float((as_rgb[0] - torch.from_numpy(gray)).abs().mean()) < 0.02  # JPEG noise only
    # 16-bit radiometric counts (a 14-bit core) in PNG and TIFF keep their absolute meaning.
    counts = (7000 + gray * 2000).astype(np.uint16)
    Image.fromarray(counts).save(tmp_path / "radiometric.png")
    Image.fromarray(counts).save(tmp_path / "radiometric.tif")
    for name in ("radiometric.png", "radiometric.tif"):
        x = thermal.read_thermal(tmp_path / name)
        assert torch.allclose(x[0], torch.from_numpy(counts.astype(np.float32)) / 65535)
    stretched = thermal.read_thermal(tmp_path / "radiometric.png", scaling="per_image")
    assert float(stretched.min()) == 0 and float(stretched.max()) == 1
    # Refused: a false-colour palette, a 1x1 image, a constant frame, a corrupt file.
    colour = np.stack([gray, 1 - gray, gray * 0.5], -1)
    Image.fromarray((colour * 255).astype(np.uint8)).save(tmp_path / "ironbow.png")
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(tmp_path / "one.png")
    Image.fromarray(np.full((20, 20), 77, np.uint8)).save(tmp_path / "flat.png")
    (tmp_path / "corrupt.jpg").write_bytes((tmp_path / "as_rgb.jpg").read_bytes()[:2000])
    for name, reason in (
        ("ironbow.png", "wrong_shape"),
        ("one.png", "wrong_shape"),
        ("flat.png", "empty"),
        ("corrupt.jpg", "unreadable"),
    ):
        with pytest.raises(BadSample) as info:
            thermal.read_thermal(tmp_path / name)
        assert info.value.reason == reason, name
    luma = thermal.read_thermal(tmp_path / "ironbow.png", rgb_policy="luma")
    assert luma.shape == (1, 329, 500)


def edges(x):
    return (
        (x[..., :-1, 1:] - x[..., :-1, :-1]).abs() + (x[..., 1:, :-1] - x[..., :-1, :-1]).abs()
    ).flatten()


def test_visible_infrared_crops_have_both_sizes_and_aligned_edges(tmp_path):
    from imagebind_lite.data.manifest import image_to_tensor

    for scene, size in ((0, (510, 328)), (1, (392, 264))):
        visible, ir = infrared_frame(tmp_path, scene, size)
        rgb = image_to_tensor(Image.open(visible))
        values = thermal.read_thermal(ir)
        assert rgb.shape[-2:] != values.shape[-2:]
        same, mirrored = [], []
        for k in range(4):
            transform = PairedTransform((32, 32), (16, 16))
            rgb_out, ir_out = transform(rgb, values, True, torch.Generator().manual_seed(k))
            assert rgb_out.shape == (3, 32, 32) and ir_out.shape == (1, 16, 16)
            # Real content: object boundaries in the visible image and the other sensor's
            # frame line up in the same random crop (and not once one side is mirrored).
            transform = PairedTransform((64, 64), (64, 64), crop_scale=(0.5, 1.0), erase_p=0.0)
            rgb_out, ir_out = transform(rgb, values, True, torch.Generator().manual_seed(k))
            e_rgb, e_ir = edges(rgb_out.mean(0)), edges(ir_out[0])
            flipped = edges(rgb_out.mean(0).flip(-1))
            same.append(float(torch.corrcoef(torch.stack([e_rgb, e_ir]))[0, 1]))
            mirrored.append(float(torch.corrcoef(torch.stack([flipped, e_ir]))[0, 1]))
        # Averaged over four crops: a depth map has fewer edges than a photo's texture.
        assert min(same) > 0.1 and np.mean(same) > np.mean(mirrored) + 0.15, scene


# --------------------------------------------------------------------------------------------
# Statistics: the command writes them, the dataset reads them


def toy_manifest(tmp_path):
    records, _ = frames()
    root = TEST_DATA / "sunrgbd_toy"
    path = tmp_path / "toy.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "vision", "depth", "intrinsics", "label", "split"])
        for record, split in zip(records, ("train", "test")):
            writer.writerow(
                [record.id]
                + [
                    record.paths[k].relative_to(root).as_posix()
                    for k in ("vision", "depth", "intrinsics")
                ]
                + ["office", split]
            )
    return root, path


def test_missing_stats_of_a_read_only_root_name_a_file_elsewhere(tmp_path, monkeypatch):
    from imagebind_lite.data import transforms

    assert "--out" not in transforms.stats_command("depth", tmp_path)
    monkeypatch.setattr(transforms.os, "access", lambda path, mode: False)  # as a non-owner
    assert transforms.stats_command("depth", tmp_path, "--layout sunrgbd") == (
        f"python train/compute_stats.py --modality depth --layout sunrgbd --root {tmp_path} "
        f"--out STATS.json (read-only {tmp_path}), then train with data.options.stats=STATS.json"
    )


def test_stats_command_writes_json_and_dataset_uses_it(tmp_path, anchor):
    root, manifest = toy_manifest(tmp_path)
    stats = tmp_path / "stats.json"
    overrides = [
        "modality=depth",
        "anchor.pretrained=null",
        "data.dataset=manifest",
        f"data.root={root}",
        "data.preprocess={image_size: 32}",
        f"data.options={{manifest: {manifest}, stats: {stats}}}",
    ]
    cfg = load_config(None, overrides)
    spec = get_modality("depth")
    with pytest.raises(FileNotFoundError, match="compute_stats.py --modality depth"):
        get_dataset_builder("manifest")(cfg, anchor, spec)

    entry = compute_stats.main(
        [
            "--modality",
            "depth",
            "--manifest",
            str(manifest),
            "--root",
            str(root),
            "--out",
            str(stats),
        ]
    )
    saved = json.loads(stats.read_text())["depth"]
    assert saved["files"] == 1 and saved["options"]["layout"] == "sunrgbd"  # train rows only
    assert saved["mean"] == pytest.approx(entry["mean"]) and saved["std"] > 0
    # By hand: the valid disparity pixels of the training frame.
    records, _ = frames()
    values, valid = depth.depth_input(records[0].paths["depth"])
    assert saved["mean"] == pytest.approx(float(values[valid].double().mean()), rel=1e-6)
    assert saved["std"] == pytest.approx(float(values[valid].double().std()), rel=1e-4)

    cfg = load_config(None, overrides)
    bundle = get_dataset_builder("manifest")(cfg, anchor, spec)
    assert cfg.data.preprocess["mean"] == saved["mean"]  # carried into the saved model config
    sample = bundle.eval[0]
    expected = depth.load(records[1].paths["depth"], **{**spec.preprocess, **cfg.data.preprocess})
    assert sample["depth"].shape == (1, 32, 32) and sample["vision"].shape == (3, 32, 32)
    assert torch.allclose(sample["depth"], expected, atol=1e-5)
    # Evaluation without the RGB image (classification) crops the depth map the same way.
    sources = {k: records[1].paths[k] for k in ("depth", "intrinsics")}
    alone = bundle.eval.dataset.sampler(sources, {}, False, None)
    assert set(alone) == {"depth"} and torch.allclose(alone["depth"], expected, atol=1e-5)
    assert bundle.classnames == ["office"] and sample["label"] == 0
    train_sample = bundle.train[0]
    assert train_sample["depth"].shape == (1, 32, 32) and "skipped" not in train_sample

    # Statistics computed under other options are refused, naming the option.
    cfg = load_config(None, overrides + ["data.preprocess={image_size: 32, layout: mm}"])
    with pytest.raises(ValueError, match="layout"):
        get_dataset_builder("manifest")(cfg, anchor, spec)


def test_stats_from_the_sunrgbd_layout_need_its_split_file(tmp_path):
    """On a copy of the real frames: no split file, no training statistics (they would include
    the test frames); with split.json, the train frame's alone; --split all asks for every frame."""
    root = tmp_path / "toy"
    shutil.copytree(TEST_DATA / "sunrgbd_toy", root)
    records, _ = frames()
    train_id, test_id = (r.id for r in records)
    stats = tmp_path / "stats.json"
    args = ["--modality", "depth", "--layout", "sunrgbd", "--root", str(root)]
    cmd = ["train/compute_stats.py", *args, "--out", str(stats)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = run_script(cmd, cwd=REPO, env=env, timeout=300)
    assert proc.returncode != 0 and not stats.exists()
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: sunrgbd: split='train'")
    assert "allsplit.mat" in proc.stderr and "SUN RGB-D toolbox" in proc.stderr
    assert compute_stats.main([*args, "--out", str(stats), "--split", "all"])["files"] == 2

    (root / "split.json").write_text(json.dumps({"train": [train_id], "test": [test_id]}))
    entry = compute_stats.main([*args, "--out", str(stats)])
    values, valid = depth.depth_input(records[0].paths["depth"])
    assert records[0].id == train_id and entry["files"] == 1
    assert entry["mean"] == pytest.approx(float(values[valid].double().mean()), rel=1e-6)
