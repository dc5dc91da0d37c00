"""Layout adapters: a tiny fixture in each dataset's exact layout -> records and class names."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from imagebind_lite.config import load_config
from imagebind_lite.data.adapters import MissingSplitFile, read_layout
from imagebind_lite.data.datasets import get_dataset_builder
from imagebind_lite.modalities import get_modality


def wav(path, seconds=0.1):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.1 * np.sin(np.arange(int(16000 * seconds)))).astype(np.float32), 16000)


def jpg(path, size=(40, 30), value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def png16(path, value=12000, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0]), value, np.uint16)).save(path)


@pytest.fixture(scope="module")
def anchor():
    from imagebind_lite.anchor import Anchor
    from imagebind_lite.config import AnchorConfig

    return Anchor(AnchorConfig(pretrained=None))


def test_esc50(tmp_path):
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta/esc50.csv").write_text(
        "filename,fold,target,category,esc10,src_file,take\n"
        "1-100032-A-0.wav,1,0,dog,True,100032,A\n"
        "1-100038-A-14.wav,1,1,chirping_birds,False,100038,A\n"
        "2-100648-A-0.wav,2,0,dog,True,100648,A\n"
    )
    wav(tmp_path / "audio/1-100032-A-0.wav")
    wav(tmp_path / "audio/1-100038-A-14.wav")
    records, names = read_layout("esc50", tmp_path)
    assert names == ["dog", "chirping birds"]
    assert [(r.id, r.label, r.fold) for r in records] == [
        ("1-100032-A-0", 0, 1),
        ("1-100038-A-14", 1, 1),
        ("2-100648-A-0", 0, 2),
    ]
    assert records[0].paths == {"audio": tmp_path / "audio/1-100032-A-0.wav"}
    assert records[0].meta["esc10"] is True and records[1].meta["category"] == "chirping_birds"
    # The missing file is kept (bad input reports it) unless missing=drop.
    assert records[2].paths["audio"] == tmp_path / "audio/2-100648-A-0.wav"
    with pytest.warns(UserWarning, match="dropped 1"):
        assert len(read_layout("esc50", tmp_path, missing="drop")[0]) == 2
    assert [r.fold for r in read_layout("esc50", tmp_path, fold=2)[0]] == [2]


def audioset_fixture(root):
    (root / "class_labels_indices.csv").write_text(
        'index,mid,display_name\n0,/m/09x0r,"Speech"\n1,/m/05zppz,"Male speech, man speaking"\n'
        '2,/m/0jbk,"Animal"\n'
    )
    (root / "balanced_train_segments.csv").write_text(
        "# Segments csv created Sun Mar  5 10:54:31 2017\n"
        "# num_ytids=3, num_segs=3, num_unique_labels=3, num_positive_labels=4\n"
        "# YTID, start_seconds, end_seconds, positive_labels\n"
        '--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/m/05zppz"\n'
        '--ZhevVpy1s, 50.000, 60.000, "/m/0jbk"\n'
        '--aE2O5G5WE, 0.000, 10.000, "/m/09x0r"\n'
    )
    wav(root / "audio/--PJHxphWEs_30.flac")
    jpg(root / "frames/--PJHxphWEs_30.jpg")
    wav(root / "audio/--ZhevVpy1s_50.000.wav")  # the start as written in the CSV also works
    jpg(root / "frames/--ZhevVpy1s_50.000.jpg")


def test_audioset(tmp_path):
    audioset_fixture(tmp_path)
    with pytest.warns(UserWarning, match="dropped 1"):
        records, names = read_layout("audioset", tmp_path)
    assert names == ["Speech", "Male speech, man speaking", "Animal"]
    assert [(r.id, r.label, r.split) for r in records] == [
        ("--PJHxphWEs_30", [0, 1], "balanced_train"),
        ("--ZhevVpy1s_50", [2], "balanced_train"),
    ]
    assert records[0].paths == {
        "audio": tmp_path / "audio/--PJHxphWEs_30.flac",
        "vision": tmp_path / "frames/--PJHxphWEs_30.jpg",
    }
    assert records[1].paths["audio"].name == "--ZhevVpy1s_50.000.wav"
    assert records[0].meta == {"ytid": "--PJHxphWEs", "start": "30.000", "end": "40.000"}
    kept, _ = read_layout("audioset", tmp_path, missing="keep")
    assert len(kept) == 3 and kept[2].paths == {"audio": tmp_path / "audio/--aE2O5G5WE_0.flac"}
    with pytest.raises(FileNotFoundError, match="eval_segments.csv"):
        read_layout("audioset", tmp_path, split="eval")


def vggsound_fixture(root):
    (root / "vggsound.csv").write_text(
        "---g-f_I2yQ,1,people marching,test\n"
        '--0PQM4-hqg,30,"waterfall burbling",train\n'
        '--56QUhyDQM,185,"playing tennis, badminton",train\n'
    )
    for name in ("---g-f_I2yQ_000001", "--0PQM4-hqg_000030", "--56QUhyDQM_185"):
        wav(root / f"audio/{name}.flac")
        jpg(root / f"frames/{name}.jpg")


def test_vggsound_and_cross_layout_evaluation(tmp_path, anchor):
    vggsound_fixture(tmp_path)
    records, names = read_layout("vggsound", tmp_path)
    assert names == ["people marching", "playing tennis, badminton", "waterfall burbling"]
    assert [(r.id, r.label, r.split) for r in records] == [
        ("---g-f_I2yQ_1", 0, "test"),
        ("--0PQM4-hqg_30", 2, "train"),
        ("--56QUhyDQM_185", 1, "train"),
    ]
    assert records[0].paths["audio"].name == "---g-f_I2yQ_000001.flac"
    assert records[2].paths["vision"].name == "--56QUhyDQM_185.jpg"
    assert [r.id for r in read_layout("vggsound", tmp_path, split="train")[0]] == [
        "--0PQM4-hqg_30",
        "--56QUhyDQM_185",
    ]
    # The registered dataset pairs frames with audio; evaluation can use another layout.
    esc = tmp_path / "esc"
    (esc / "meta").mkdir(parents=True)
    (esc / "meta/esc50.csv").write_text(
        "filename,fold,target,category,esc10,src_file,take\n1-1-A-0.wav,1,0,dog,True,1,A\n"
    )
    wav(esc / "audio/1-1-A-0.wav")
    cfg = load_config(
        None,
        [
            "modality=audio",
            "anchor.pretrained=null",
            "data.dataset=vggsound",
            f"data.root={tmp_path}",
            f"data.options={{eval_layout: esc50, eval_root: {esc}}}",
        ],
    )
    bundle = get_dataset_builder("vggsound")(cfg, anchor, get_modality("audio"))
    assert len(bundle.train) == 2 and len(bundle.eval) == 1 and bundle.classnames == ["dog"]
    sample = bundle.eval[0]
    assert sample["audio"].shape == (3, 1, 128, 204) and sample["label"] == 0


def test_clotho(tmp_path):
    (tmp_path / "clotho_captions_evaluation.csv").write_text(
        "\ufefffile_name,caption_1,caption_2,caption_3,caption_4,caption_5\n"
        "Santa Motor.wav,A machine whines.,A motor runs.,An engine hums.,Gears turn.,Buzzing.\n"
        '"Rain, soft.wav","Rain falls, softly.",Drops hit a roof.,Rain.,Soft rain.,Water.\n'
    )
    wav(tmp_path / "evaluation/Santa Motor.wav")
    wav(tmp_path / "evaluation/Rain, soft.wav")
    records, names = read_layout("clotho", tmp_path)
    assert names is None and [r.id for r in records] == ["Santa Motor", "Rain, soft"]
    assert records[1].captions[0] == "Rain falls, softly." and len(records[0].captions) == 5
    assert records[0].paths == {"audio": tmp_path / "evaluation/Santa Motor.wav"}
    assert records[0].label is None and records[0].split == "evaluation"


def test_audiocaps(tmp_path):
    (tmp_path / "test.csv").write_text(
        "audiocap_id,youtube_id,start_time,caption\n"
        "103549,7fmOlUlwoNg,20,Constant rattling noise and sharp vibrations\n"
        "103548,7fmOlUlwoNg,20,A rattling noise\n"
        "104999,ZYwhlxgMAS8,0,A dog barks\n"
    )
    wav(tmp_path / "test/7fmOlUlwoNg_20.wav")
    wav(tmp_path / "test/ZYwhlxgMAS8.flac")  # no start in the name: found too
    records, names = read_layout("audiocaps", tmp_path)
    assert names is None and [r.id for r in records] == ["7fmOlUlwoNg_20", "ZYwhlxgMAS8_0"]
    assert records[0].captions == [
        "Constant rattling noise and sharp vibrations",
        "A rattling noise",
    ]
    assert records[0].meta["audiocap_ids"] == ["103549", "103548"]
    assert records[1].paths["audio"] == tmp_path / "test/ZYwhlxgMAS8.flac"


def sun_frame(folder, scene, filled=True, intrinsics="500 0 20\n0 500 15\n0 0 1\n"):
    jpg(folder / "image/0001.jpg")
    png16(folder / "depth/0001.png")
    if filled:
        png16(folder / "depth_bfx/0001.png", value=16000)
    (folder / "scene.txt").write_text(scene + "\n")
    (folder / "intrinsics.txt").write_text(intrinsics)


def test_sunrgbd(tmp_path):
    root = tmp_path / "SUNRGBD"
    sun_frame(root / "kv1/NYUdata/NYU0001", "living_room")
    sun_frame(root / "realsense/lg/2014_10_24-19_53_23-1311000073", "office", filled=False)
    sun_frame(root / "xtion/xtion_align_data/2014_x/0001", "office")
    (root / "split.json").write_text(
        json.dumps(
            {
                "train": [
                    "/n/fs/sun3d/data/SUNRGBD/kv1/NYUdata/NYU0001",
                    "/n/fs/sun3d/data/SUNRGBD/realsense/lg/2014_10_24-19_53_23-1311000073",
                ],
                "test": ["/n/fs/sun3d/data/SUNRGBD/xtion/xtion_align_data/2014_x/0001"],
            }
        )
    )
    records, names = read_layout("sunrgbd", root)
    assert names == ["living room", "office"]
    by_id = {r.id: r for r in records}
    nyu = by_id["kv1/NYUdata/NYU0001"]
    assert (nyu.label, nyu.split, nyu.meta["sensor"], nyu.meta["baseline"]) == (
        0,
        "train",
        "kv1",
        0.075,
    )
    assert nyu.paths["depth"].parent.name == "depth_bfx"
    realsense = by_id["realsense/lg/2014_10_24-19_53_23-1311000073"]
    assert realsense.meta["baseline"] == 0.095 and realsense.paths["depth"].parent.name == "depth"
    assert realsense.paths["intrinsics"].name == "intrinsics.txt"
    assert [r.id for r in read_layout("sunrgbd", root, split="test")[0]] == [
        "xtion/xtion_align_data/2014_x/0001"
    ]
    raw, _ = read_layout("sunrgbd", root, depth="depth")
    assert {r.paths["depth"].parent.name for r in raw} == {"depth"}
    only_office, _ = read_layout("sunrgbd", root, classnames=["office"])
    assert sorted(r.label for r in only_office if r.label is not None) == [0, 0]
    assert next(r for r in only_office if r.meta["scene"] == "living_room").label is None


def sun_config(root, *options):
    return load_config(
        None,
        [
            "modality=depth",
            "anchor.pretrained=null",
            "data.dataset=sunrgbd",
            f"data.root={root}",
            "data.preprocess={image_size: 16}",
            *options,
        ],
    )


def test_sunrgbd_refuses_a_split_without_its_split_file(tmp_path, anchor):
    root = tmp_path / "SUNRGBD"
    sun_frame(root / "kv1/NYUdata/NYU0001", "living_room")
    sun_frame(root / "kv2/kinect2data/000002", "office")
    for split in ("train", "test"):
        with pytest.raises(MissingSplitFile) as err:
            read_layout("sunrgbd", root, split=split)
        line = str(err.value)
        assert "\n" not in line and f"split={split!r}" in line and str(root) in line
        assert "SUNRGBDtoolbox/traintestSUNRGBD/allsplit.mat" in line and "split.json" in line
    # No split asked: every frame, none of them with a split.
    for everything in (read_layout("sunrgbd", root), read_layout("sunrgbd", root, split="all")):
        assert [(r.id, r.split) for r in everything[0]] == [
            ("kv1/NYUdata/NYU0001", None),
            ("kv2/kinect2data/000002", None),
        ]
    # The dataset builder: its default train/eval splits are refused in the same words...
    spec = get_modality("depth")
    with pytest.raises(MissingSplitFile, match="train_split='train', eval_split='test'.*allsplit"):
        get_dataset_builder("sunrgbd")(sun_config(root), anchor, spec)
    # ...and with both splits null every frame trains, with no evaluation.
    (root / "stats.json").write_text(json.dumps(SUN_STATS))
    cfg = sun_config(root, "data.options={train_split: null, eval_split: null}")
    bundle = get_dataset_builder("sunrgbd")(cfg, anchor, spec)
    assert len(bundle.train) == 2 and not bundle.eval
    # With the split file the same default config splits the frames.
    (root / "split.json").write_text(
        json.dumps({"train": ["kv1/NYUdata/NYU0001"], "test": ["kv2/kinect2data/000002"]})
    )
    bundle = get_dataset_builder("sunrgbd")(sun_config(root), anchor, spec)
    assert len(bundle.train) == 1 and len(bundle.eval) == 1


SUN_STATS = {
    "depth": {
        "mean": 0.0,
        "std": 1.0,
        "options": {
            "representation": "disparity",
            "layout": "sunrgbd",
            "max_depth": 8.0,
            "baseline": "auto",
        },
    }
}


def test_nyud(tmp_path, anchor):
    for split, frame, scene in (
        ("train", "0001", "bedroom"),
        ("train", "0002", "kitchen"),
        ("test", "0003", "bedroom"),
    ):
        folder = tmp_path / split / frame
        jpg(folder / "image.jpg", value=int(frame) * 40)
        png16(folder / "depth.png", value=2500)  # 2.5 m in plain millimetres
        (folder / "scene.txt").write_text(scene)
    records, names = read_layout("nyud", tmp_path)
    assert names == ["bedroom", "kitchen"]
    assert [(r.id, r.label, r.split) for r in records] == [
        ("test/0003", 0, "test"),
        ("train/0001", 0, "train"),
        ("train/0002", 1, "train"),
    ]
    assert records[0].meta["layout"] == "mm" and records[0].meta["fx"] == pytest.approx(518.8579)
    assert [r.id for r in read_layout("nyud", tmp_path, split="test")[0]] == ["test/0003"]
    # The registered dataset reads the millimetre layout from the records (not the default).
    stats = {
        "depth": {
            "mean": 0.0,
            "std": 1.0,
            "options": {
                "representation": "disparity",
                "layout": "sunrgbd",
                "max_depth": 8.0,
                "baseline": "auto",
            },
        }
    }
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    cfg = load_config(
        None,
        [
            "modality=depth",
            "anchor.pretrained=null",
            "data.dataset=nyud",
            f"data.root={tmp_path}",
            "data.preprocess={image_size: 16}",
        ],
    )
    bundle = get_dataset_builder("nyud")(cfg, anchor, get_modality("depth"))
    assert len(bundle.train) == 2 and len(bundle.eval) == 1 and bundle.classnames == names
    expected = 0.075 * 518.8579 / 2.5
    assert torch.allclose(bundle.eval[0]["depth"], torch.full((1, 16, 16), expected), rtol=1e-4)


def test_a_relative_root_gives_paths_that_resolve_once(tmp_path, monkeypatch):
    # Documented commands take --root NYUD; the datasets resolve record paths inside the root,
    # so a relative root must not be applied twice (NYUD/NYUD/...).
    from imagebind_lite.data.bad_input import resolve_inside

    folder = tmp_path / "NYUD" / "test" / "0001"
    jpg(folder / "image.jpg")
    png16(folder / "depth.png")
    (folder / "scene.txt").write_text("kitchen")
    monkeypatch.chdir(tmp_path)
    (record,), _ = read_layout("nyud", "NYUD")
    assert record.paths["depth"] == tmp_path / "NYUD/test/0001/depth.png"
    assert resolve_inside(Path("NYUD"), record.paths["depth"]).is_file()


def llvip_fixture(root, persons=((100, 50, 140, 150), (300, 60, 330, 160))):
    for split in ("train", "test"):
        for name, value in (("010001", 80), ("010002", 160)):
            jpg(root / f"visible/{split}/{name}.jpg", size=(640, 512), value=value)
            (root / f"infrared/{split}").mkdir(parents=True, exist_ok=True)
            ramp = (np.arange(640) // 3).astype(np.uint8)  # x/3: the crop's content is known
            Image.fromarray(np.tile(ramp[None], (512, 1))).save(
                root / f"infrared/{split}/{name}.jpg", quality=95
            )
    objects = "".join(
        f"<object><name>person</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax>"
        f"<ymax>{d}</ymax></bndbox></object>"
        for a, b, c, d in persons
    )
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    for name in ("010001", "010002"):
        (root / f"Annotations/{name}.xml").write_text(
            f"<annotation><filename>{name}.jpg</filename><size><width>640</width>"
            f"<height>512</height><depth>3</depth></size>{objects}</annotation>"
        )


def test_llvip_crops_and_dataset(tmp_path, anchor):
    llvip_fixture(tmp_path)
    records, names = read_layout("llvip", tmp_path)
    assert names == ["background", "person"]
    persons = [r for r in records if r.label == 1]
    background = [r for r in records if r.label == 0]
    assert len(persons) == 4 and len(background) == 4
    assert persons[0].id == "010001_person0"
    assert persons[0].meta["object_box"] == [100.0, 50.0, 140.0, 150.0]
    x0, y0, x1, y1 = persons[0].meta["box"]
    assert x1 - x0 == y1 - y0 == 100 and x0 <= 100 and x1 >= 140  # squared around the person
    for r in background:
        bx0, by0, bx1, by1 = r.meta["box"]
        assert 0 <= bx0 < bx1 <= 640 and 0 <= by0 < by1 <= 512
        for px0, py0, px1, py1 in ((100, 50, 140, 150), (300, 60, 330, 160)):
            assert bx1 <= px0 or px1 <= bx0 or by1 <= py0 or py1 <= by0  # never touches one
    again, _ = read_layout("llvip", tmp_path)
    assert [r.meta["box"] for r in again] == [r.meta["box"] for r in records]
    assert persons[0].paths == {
        "vision": tmp_path / "visible/test/010001.jpg",
        "thermal": tmp_path / "infrared/test/010001.jpg",
    }
    frames, names = read_layout("llvip", tmp_path, split="train", crops="none")
    assert names is None and [r.id for r in frames] == ["010001", "010002"]
    # Registered: whole frames train, crops evaluate; the crop box selects the region.
    stats = {"thermal": {"mean": 0.0, "std": 1.0, "options": {"scaling": "fixed"}}}
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    cfg = load_config(
        None,
        [
            "modality=thermal",
            "anchor.pretrained=null",
            "data.dataset=llvip",
            f"data.root={tmp_path}",
            "data.preprocess={image_size: 16}",
        ],
    )
    bundle = get_dataset_builder("llvip")(cfg, anchor, get_modality("thermal"))
    assert len(bundle.train) == 2 and len(bundle.eval) == 8
    assert bundle.classnames == ["background", "person"]
    sample = bundle.eval[0]
    assert sample["label"] == 1 and sample["thermal"].shape == (1, 16, 16)
    # The infrared ramp is x/3/255: the crop covers x in [70, 170] of the 640-pixel frame.
    assert 60 / 765 < float(sample["thermal"].min()) < float(sample["thermal"].max()) < 180 / 765


def test_unknown_layout_and_missing_root(tmp_path):
    with pytest.raises(KeyError, match="esc50"):
        read_layout("imagenet", tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        read_layout("esc50", tmp_path / "absent")
