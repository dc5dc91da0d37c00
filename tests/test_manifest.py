"""Manifest datasets: CSV/JSONL parsing, paths confined to the root, training through bad input,
and videos -> frame/audio pairs."""

import csv
import json
import os
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, tiny_overrides
from PIL import Image

from imagebind_lite.config import load_config
from imagebind_lite.data.bad_input import BadInputError
from imagebind_lite.data.datasets import get_dataset_builder
from imagebind_lite.data.manifest import read_manifest
from imagebind_lite.modalities import get_modality
from imagebind_lite.train import train


def write_csv(path, rows):
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def make_depth_pairs(root, n=20, test=0, size=(30, 40), seed=0):
    """``n`` small RGB + millimetre-depth pairs whose depth follows the image brightness; the
    last ``test`` rows are the test split. Returns the manifest rows."""
    rng = np.random.default_rng(seed)
    (root / "rgb").mkdir(parents=True, exist_ok=True)
    (root / "depth").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        label = i % 2
        rgb = rng.integers(0, 60, (*size, 3), dtype=np.uint8) + np.uint8(150 * label)
        Image.fromarray(rgb).save(root / f"rgb/{i}.jpg")
        depth_mm = (1000 + 3000 * (1 - label) + rng.uniform(0, 500, size)).astype(np.uint16)
        Image.fromarray(depth_mm).save(root / f"depth/{i}.png")
        rows.append(
            {
                "id": f"pair{i}",
                "vision": f"rgb/{i}.jpg",
                "depth": f"depth/{i}.png",
                "fx": 500.0,
                "label": ["near", "far"][label],
                "split": "test" if i >= n - test else "train",
            }
        )
    return rows


def depth_stats(root, mean=10.0, std=5.0):
    (root / "stats.json").write_text(
        json.dumps(
            {
                "depth": {
                    "mean": mean,
                    "std": std,
                    "options": {
                        "representation": "disparity",
                        "layout": "mm",
                        "max_depth": 8.0,
                        "baseline": "auto",
                    },
                }
            }
        )
    )


def tiny_depth_config(tmp_path, root, *extra):
    return load_config(
        None,
        tiny_overrides(
            tmp_path / "runs",
            "modality=depth",
            "data.dataset=manifest",
            f"data.root={root}",
            "data.batch_size=8",
            "data.preprocess={image_size: 32, layout: mm}",
            "data.options={manifest: pairs.csv}",
            *extra,
        ),
    )


@pytest.fixture(scope="module")
def anchor():
    from imagebind_lite.anchor import Anchor
    from imagebind_lite.config import AnchorConfig

    return Anchor(AnchorConfig(pretrained=None))


# --------------------------------------------------------------------------------------------
# Parsing


def test_csv_manifest_labels_captions_splits_and_meta(tmp_path):
    rows = [
        {
            "id": "a",
            "vision": "x/a.jpg",
            "audio": "x/a.wav",
            "label": "dog",
            "caption": "woof",
            "split": "train",
            "fold": "1",
            "box": "1 2 30 40",
            "note": "hello",
        },
        {
            "id": "",
            "vision": "x/b.jpg",
            "audio": "",
            "label": "cat;dog",
            "caption_1": "one",
            "caption_2": "two",
            "split": "test",
            "fold": "2",
        },
        {"id": "c", "vision": "x/c.jpg", "audio": "x/c.wav", "label": "1", "split": ""},
    ]
    path = write_csv(tmp_path / "m.csv", rows)
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    records, names = read_manifest(path)
    assert names == ["cat", "dog"]
    a, b, c = records
    assert (a.id, a.label, a.captions, a.split, a.fold) == ("a", 1, ["woof"], "train", 1)
    assert a.paths == {"vision": tmp_path / "x/a.jpg", "audio": tmp_path / "x/a.wav"}
    assert a.meta == {"box": [1.0, 2.0, 30.0, 40.0], "note": "hello"}
    assert b.id == "1" and b.label == [0, 1] and b.captions == ["one", "two"]
    assert "audio" not in b.paths  # an empty cell is no file (bad input "missing" if needed)
    assert (c.label, c.split) == (1, None)
    # Without classes.txt the names are the sorted string labels found.
    (tmp_path / "classes.txt").unlink()
    assert read_manifest(path)[1] == ["cat", "dog"]
    rows[2]["label"] = "bird"
    with pytest.raises(ValueError, match="bird"):
        read_manifest(write_csv(tmp_path / "m2.csv", rows), classnames=["cat", "dog"])
    rows[1]["id"] = "a"
    with pytest.raises(ValueError, match="duplicate id 'a'"):
        read_manifest(write_csv(tmp_path / "m3.csv", rows))


def test_jsonl_manifest(tmp_path):
    lines = [
        {"vision": "v/0.jpg", "thermal": "t/0.png", "label": 0, "captions": ["a", "b"]},
        {
            "id": "x",
            "vision": "v/1.jpg",
            "thermal": "t/1.png",
            "label": ["dog", "cat"],
            "box": [0, 0, 5, 5],
            "fx": 520,
        },
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    records, names = read_manifest(path, root=tmp_path / "root", classnames=["cat", "dog"])
    assert names == ["cat", "dog"]
    assert records[0].id == "0" and records[0].label == 0 and records[0].captions == ["a", "b"]
    assert records[0].paths["thermal"] == tmp_path / "root/t/0.png"
    assert records[1].label == [1, 0] and records[1].meta == {"box": [0, 0, 5, 5], "fx": 520.0}
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="expected a JSON object"):
        read_manifest(path)


# --------------------------------------------------------------------------------------------
# Paths must stay inside the root


def test_rows_pointing_outside_the_root_are_refused(tmp_path, anchor):
    root = tmp_path / "root"
    rows = make_depth_pairs(root, n=4)
    outside = tmp_path / "elsewhere"
    make_depth_pairs(outside, n=1)
    os.symlink(outside / "depth/0.png", root / "depth/link.png")
    rows[1]["depth"] = "../elsewhere/depth/0.png"
    rows[2]["depth"] = str(outside / "depth/0.png")
    rows[3]["depth"] = "depth/link.png"
    write_csv(root / "pairs.csv", rows)
    depth_stats(root)
    cfg = tiny_depth_config(tmp_path, root, "data.bad_input=raise")
    bundle = get_dataset_builder("manifest")(cfg, anchor, get_modality("depth"))
    assert bundle.train[0]["depth"].shape == (1, 32, 32)
    for index in (1, 2, 3):
        with pytest.raises(BadInputError, match="outside the dataset root") as info:
            bundle.train[index]
        assert info.value.reason == "outside_root"
    # Under skip they are replaced by the only good row and counted.
    cfg = tiny_depth_config(tmp_path, root)
    bundle = get_dataset_builder("manifest")(cfg, anchor, get_modality("depth"))
    sample = bundle.train[3]
    assert sample["id"] == "pair0" and sum(sample["skipped"].values()) >= 1
    assert set(sample["skipped"]) == {"outside_root"}
    # An absolute path inside the root is fine.
    rows[2]["depth"] = str(root / "depth/2.png")
    write_csv(root / "pairs.csv", rows)
    bundle = get_dataset_builder("manifest")(cfg, anchor, get_modality("depth"))
    assert "skipped" not in bundle.train[2]


# --------------------------------------------------------------------------------------------
# Training through bad input


def test_training_over_a_manifest_with_10_percent_bad_files(tmp_path):
    root = tmp_path / "data"
    rows = make_depth_pairs(root, n=40, test=8)
    (root / "depth/3.png").write_bytes(b"this is not a png")  # undecodable
    (root / "rgb/7.jpg").unlink()  # missing
    (root / "depth/11.png").write_bytes((root / "depth/12.png").read_bytes()[:120])  # truncated
    Image.fromarray(np.full((30, 40), 0, np.uint16)).save(root / "depth/20.png")  # no valid pixel
    write_csv(root / "pairs.csv", rows)
    depth_stats(root)
    cfg = tiny_depth_config(tmp_path, root)
    metrics = train(cfg, quiet=True)
    saved = json.loads((tmp_path / "runs/depth-manifest/metrics.json").read_text())
    assert saved["steps"] == 4 and saved["num_eval"] == 8 and saved["num_classes"] == 2
    # Every training index is drawn once per epoch, so each bad file is met at least once.
    assert set(saved["skipped"]) == {"unreadable", "missing", "empty"}
    assert saved["skipped"]["unreadable"] >= 2 and saved["skipped_total"] >= 4
    assert saved["skipped_total"] == sum(saved["skipped"].values())
    assert saved["data_normalisation"]["mean"] == 10.0
    assert metrics["data_eval_skipped"] == {}
    config = json.loads((tmp_path / "runs/depth-manifest/model/config.json").read_text())
    assert config["preprocess"]["mean"] == 10.0 and config["preprocess"]["layout"] == "mm"

    # Under raise, the first bad file stops the run with a message naming it.
    rows = make_depth_pairs(root, n=16)
    (root / "depth/5.png").write_bytes(b"\x89PNG broken")
    write_csv(root / "pairs.csv", rows)
    cfg = tiny_depth_config(tmp_path, root, "data.bad_input=raise")
    with pytest.raises(BadInputError, match=r"unreadable.*depth/5\.png"):
        train(cfg, quiet=True)


# --------------------------------------------------------------------------------------------
# Videos -> pairs


def make_video(path, frames=10, rate=10, seconds=1.0, audio=True):
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=rate)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        sound = container.add_stream("aac", rate=22050) if audio else None
        if sound is not None:
            sound.layout = "mono"
        for i in range(frames):
            image = np.full((48, 64, 3), 20 * i, np.uint8)
            for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if sound is not None:
            t = np.arange(int(22050 * seconds)) / 22050
            tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
            frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
            frame.sample_rate = 22050
            for packet in list(sound.encode(frame)) + list(sound.encode()):
                container.mux(packet)


def test_prepare_videos_writes_frames_audio_and_manifest(tmp_path):
    import soundfile as sf

    videos = tmp_path / "videos"
    (videos / "dog").mkdir(parents=True)
    make_video(videos / "dog/clip.mp4")
    make_video(videos / "dog/mute.mp4", audio=False)
    (videos / "broken.mp4").write_bytes(b"not a video")
    sys.path.insert(0, str(REPO / "train"))
    import prepare_videos

    out = tmp_path / "pairs"
    summary = prepare_videos.main([str(videos), "--out", str(out), "--label-from-folder"])
    assert summary == {"videos": 3, "pairs": 1, "failed": 2, "manifest": str(out / "manifest.csv")}
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert rows == [
        {
            "id": "dog/clip",
            "vision": "frames/dog/clip.jpg",
            "audio": "audio/dog/clip.flac",
            "label": "dog",
        }
    ]
    failures = {r["video"]: r["error"] for r in csv.DictReader((out / "failures.csv").open())}
    assert "no audio stream" in failures["dog/mute.mp4"] and "broken.mp4" in failures
    frame = np.asarray(Image.open(out / "frames/dog/clip.jpg"), dtype=np.float32)
    assert frame.shape == (48, 64, 3) and abs(frame.mean() - 100) < 6  # frame 5 of 0..9
    wav, rate = sf.read(out / "audio/dog/clip.flac")
    assert rate == 16000 and wav.ndim == 1 and 0.9 < len(wav) / 16000 < 1.2
    spectrum = np.abs(np.fft.rfft(wav[2000:14000]))
    assert abs(np.argmax(spectrum) * 16000 / 12000 - 440) < 5  # the tone survived resampling
    # The manifest loads as an audio dataset; frames become the anchor's input.
    records, names = read_manifest(out / "manifest.csv")
    assert names == ["dog"] and records[0].label == 0
    cfg = load_config(
        None,
        [
            "modality=audio",
            "anchor.pretrained=null",
            "data.dataset=manifest",
            f"data.root={out}",
            "data.options={manifest: manifest.csv}",
        ],
    )
    from imagebind_lite.anchor import Anchor

    bundle = get_dataset_builder("manifest")(cfg, Anchor(cfg.anchor), get_modality("audio"))
    sample = bundle.train[0]
    assert sample["audio"].shape == (3, 1, 128, 204) and sample["vision"].shape == (3, 32, 32)
    assert torch.isfinite(sample["audio"]).all() and sample["label"] == 0


def test_missing_modality_column_is_a_clear_error(tmp_path, anchor):
    root = tmp_path / "root"
    rows = make_depth_pairs(root, n=2)
    for row in rows:
        row.pop("depth")
    write_csv(root / "pairs.csv", rows)
    cfg = tiny_depth_config(tmp_path, root)
    with pytest.raises(ValueError, match="no 'depth' files"):
        get_dataset_builder("manifest")(cfg, anchor, get_modality("depth"))
    cfg = tiny_depth_config(tmp_path, root, "data.options={manifest: absent.csv}")
    with pytest.raises(FileNotFoundError, match="absent.csv"):
        get_dataset_builder("manifest")(cfg, anchor, get_modality("depth"))


def test_a_relative_root_is_not_joined_twice(tmp_path, monkeypatch):
    """`data.root=DATA` / `domains=[data/pairs.csv]` from the docs: relative to the cwd."""
    from imagebind_lite.data import bad_input
    from imagebind_lite.data.manifest import read_manifest

    (tmp_path / "DATA").mkdir()
    (tmp_path / "DATA" / "a.png").write_bytes(b"")
    (tmp_path / "DATA" / "pairs.csv").write_text("vision,label\na.png,x\n")
    monkeypatch.chdir(tmp_path)
    records, _ = read_manifest("DATA/pairs.csv")
    path = bad_input.resolve_inside("DATA", records[0].paths["vision"])
    assert path == (tmp_path / "DATA" / "a.png").resolve()
