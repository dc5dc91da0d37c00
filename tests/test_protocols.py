"""Each protocol reads a tiny fixture in its dataset's own layout (through read_layout) and
produces its numbers beside the published ones; the test-set rules (ESC-50 folds, NYU-D
"other", SUN-D's 19 classes, several captions per clip) are checked on known cases."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagebind_lite.anchor import ASSETS, Anchor
from imagebind_lite.config import AnchorConfig
from imagebind_lite.data.adapters import Record, read_layout
from imagebind_lite.evaluation.prompts import get_templates
from imagebind_lite.evaluation.protocols import (
    ESC50_CLASSES,
    NYU_D_CLASSES,
    NYU_D_OTHER_SCENES,
    PROTOCOLS,
    SUN_D_CLASSES,
    cross_modal_retrieval,
    evaluate_protocol,
    format_table,
    get_protocol,
    prepare_records,
    record_collections,
)
from imagebind_lite.evaluation.space import Space
from imagebind_lite.evaluation.zero_shot import class_text_embeddings
from imagebind_lite.modalities import build_encoder

AUDIO = sorted((ASSETS / "avmnist" / "audio").glob("*.flac"))
AUDIO_PREPROCESS = {"num_clips": 1, "clip_duration": 1.12, "num_mel_bins": 64, "target_length": 112}
SENSOR_PREPROCESS = {"image_size": 32, "mean": 20.0, "std": 10.0}
TINY = {"depth": 1, "width": 32, "heads": 2}


def _write_csv(path: Path, rows, header=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        if header:
            writer.writerow(header)
        writer.writerows(rows)


def _clip(dest: Path, n: int) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(AUDIO[(n * 37) % len(AUDIO)], dest)  # real recordings, any will do


def make_esc50(root: Path, per_class: int = 1) -> Path:
    """meta/esc50.csv + audio/: 3 classes (targets 0-2) in each of the 5 folds."""
    rows, n = [], 0
    for fold in range(1, 6):
        for target in range(3):
            for _ in range(per_class):
                name = f"{fold}-{n}-A-{target}.flac"
                _clip(root / "audio" / name, n)
                rows.append(
                    [name, fold, target, ESC50_CLASSES[target].replace(" ", "_"), "False", n, "A"]
                )
                n += 1
    _write_csv(
        root / "meta" / "esc50.csv",
        rows,
        ["filename", "fold", "target", "category", "esc10", "src_file", "take"],
    )
    return root


def make_audioset(root: Path) -> Path:
    _write_csv(
        root / "class_labels_indices.csv",
        [[0, "/m/a", "Speech"], [1, "/m/b", "Music"], [2, "/m/c", "Dog"]],
        ["index", "mid", "display_name"],
    )
    lines = [
        "# Segments csv created",
        "# num_ytids=4",
        "# YTID, start_seconds, end_seconds, positive_labels",
    ]
    labels = ['"/m/a"', '"/m/a,/m/b"', '"/m/c"', '"/m/b,/m/c"']
    for i, label in enumerate(labels):
        lines.append(f"vid{i}, 30.000, 40.000, {label}")
        _clip(root / "audio" / f"vid{i}_30.flac", i)
    (root / "eval_segments.csv").write_text("\n".join(lines) + "\n")
    return root


def make_vggsound(root: Path) -> Path:
    rows = []
    for i, (label, split) in enumerate(
        [
            ("dog barking", "test"),
            ("church bell ringing", "test"),
            ("dog barking", "train"),
            ("playing piano", "test"),
        ]
    ):
        rows.append([f"yt{i}", "1", label, split])
        _clip(root / "audio" / f"yt{i}_000001.flac", i)
    _write_csv(root / "vggsound.csv", rows)
    return root


def make_clotho(root: Path, clips: int = 3) -> Path:
    rows = []
    for i in range(clips):
        _clip(root / "evaluation" / f"clip{i}.flac", i)
        rows.append([f"clip{i}.flac", *[f"sound {i} caption {c}" for c in range(5)]])
    _write_csv(
        root / "clotho_captions_evaluation.csv",
        rows,
        ["file_name", *[f"caption_{c}" for c in range(1, 6)]],
    )
    return root


def make_audiocaps(root: Path) -> Path:
    rows = []
    for i in range(2):
        _clip(root / "test" / f"yt{i}_30.flac", i)
        rows += [[10 * i + c, f"yt{i}", 30, f"clip {i} described {c}"] for c in range(2)]
    _write_csv(root / "test.csv", rows, ["audiocap_id", "youtube_id", "start_time", "caption"])
    return root


def _rgb(path: Path, seed: int, size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _depth_png(path: Path, seed: int, rotate: bool, size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mm = np.random.default_rng(seed).integers(600, 6000, (size[1], size[0])).astype(np.uint16)
    if rotate:  # SUN RGB-D stores depth rotated left by 3 bits
        mm = ((mm << 3) | (mm >> 13)).astype(np.uint16)
    Image.fromarray(mm).save(path)


INTRINSICS = "520 0 20\n0 520 15\n0 0 1\n"


def make_sunrgbd(root: Path) -> Path:
    scenes = ["office", "bedroom", "computer_room", "garage"]  # garage: not one of the 19
    for i, scene in enumerate(scenes):
        frame = root / "kv1" / f"frame{i}"
        _rgb(frame / "image" / f"{i:07d}.jpg", i)
        _depth_png(frame / "depth_bfx" / f"{i:07d}.png", i, rotate=True)
        (frame / "scene.txt").write_text(scene)
        (frame / "intrinsics.txt").write_text(INTRINSICS)
    return root


def make_nyud(root: Path) -> Path:
    for i, scene in enumerate(["kitchen", "excercise_room", "cafe", "bedroom"]):
        frame = root / "test" / f"{i:04d}"
        _rgb(frame / "image.png", i)
        _depth_png(frame / "depth.png", i, rotate=False)
        (frame / "scene.txt").write_text(scene)
    return root


def make_llvip(root: Path) -> Path:
    for i in range(2):
        _rgb(root / "visible" / "test" / f"{i:06d}.jpg", i, (96, 64))
        thermal = np.random.default_rng(10 + i).integers(0, 255, (64, 96), dtype=np.uint8)
        (root / "infrared" / "test").mkdir(parents=True, exist_ok=True)
        Image.fromarray(thermal).save(root / "infrared" / "test" / f"{i:06d}.jpg")
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{i:06d}.xml").write_text(
            "<annotation><size><width>96</width><height>64</height></size>"
            "<object><name>person</name><bndbox><xmin>5</xmin><ymin>10</ymin><xmax>25</xmax>"
            "<ymax>50</ymax></bndbox></object></annotation>"
        )
    return root


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def space():
    """The shipped tiny anchor with untrained tiny encoders of the three sensor modalities."""
    torch.manual_seed(0)
    anchor = Anchor(AnchorConfig())
    encoders, configs = {}, {}
    for modality, pre in (
        ("audio", AUDIO_PREPROCESS),
        ("depth", SENSOR_PREPROCESS),
        ("thermal", SENSOR_PREPROCESS),
    ):
        encoders[modality] = build_encoder(modality, anchor.embed_dim, "tiny", TINY, pre).eval()
        configs[modality] = {"preprocess": pre}
    return Space(anchor, encoders, configs)


def test_esc50_reports_every_fold_and_their_mean(space, tmp_path):
    root = make_esc50(tmp_path / "ESC-50-master", per_class=2)
    result = evaluate_protocol("esc50", root, space, batch_size=8)
    metrics = result["metrics"]
    assert result["num_evaluated"] == 30 and result["templates"] == 80
    assert set(metrics["per_group"]) == {"1", "2", "3", "4", "5"}
    folds = [v["top1"] for v in metrics["per_group"].values()]
    assert all(f in (0.0, 1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0) for f in folds)
    assert metrics["top1"] == pytest.approx(sum(folds) / 5)  # the mean of folds is headline
    # By hand: every clip against the 50 prompt-ensembled class names (80 templates).
    records, _ = read_layout("esc50", root)
    audio, _, _ = space.embed_files([r.paths["audio"] for r in records], "audio")
    text = class_text_embeddings(space.embed_texts, result["classnames"], get_templates("imagenet"))
    scores = audio @ text.T
    labels = torch.tensor([r.label for r in records])
    hit1 = scores.argmax(1) == labels
    hit5 = (scores.topk(5, dim=1).indices == labels[:, None]).any(1)
    assert metrics["top1_pooled"] == pytest.approx(float(hit1.float().mean()))
    assert metrics["top5_pooled"] == pytest.approx(float(hit5.float().mean()))
    assert len(metrics["confusion_matrix"]) == 50  # scored against all 50 classes
    table = format_table(result)
    assert "66.9" in table and "ViT-Lens-L" in table and "fold 5 top1" in table
    # One fold only, through a layout option.
    one = evaluate_protocol("esc50", root, space, {"fold": 2}, batch_size=8)
    assert one["num_evaluated"] == 6 and set(one["metrics"]["per_group"]) == {"2"}


def test_esc50_refuses_a_differently_numbered_release(space, tmp_path):
    root = make_esc50(tmp_path / "esc")
    text = (root / "meta" / "esc50.csv").read_text().replace(",rooster,", ",hen,")
    (root / "meta" / "esc50.csv").write_text(text)
    with pytest.raises(ValueError, match="not the ESC-50 release"):
        evaluate_protocol("esc50", root, space)


def test_embeddings_cache_is_reused(space, tmp_path):
    root = make_esc50(tmp_path / "esc")
    cache = tmp_path / "esc.safetensors"
    first = evaluate_protocol("esc50", root, space, cache=cache)
    second = evaluate_protocol("esc50", root, space, cache=cache)
    assert not first["embeddings_cache_used"] and second["embeddings_cache_used"]
    assert first["metrics"]["top1"] == second["metrics"]["top1"]


def test_audioset_is_multilabel_map(space, tmp_path):
    result = evaluate_protocol("audioset", make_audioset(tmp_path / "as"), space)
    assert result["num_evaluated"] == 4
    assert result["metrics"]["classes_scored"] == 3
    assert 0 < result["headline"]["mAP"] <= 1
    assert "17.6" in format_table(result)


def test_vggsound_keeps_the_test_split(space, tmp_path):
    result = evaluate_protocol("vggsound", make_vggsound(tmp_path / "vgg"), space)
    assert result["num_evaluated"] == 3
    assert result["classnames"] == ["church bell ringing", "dog barking", "playing piano"]
    assert "27.8" in format_table(result)


@pytest.mark.parametrize(
    "name,make,clips,captions",
    [("clotho", make_clotho, 3, 15), ("audiocaps", make_audiocaps, 2, 4)],
)
def test_caption_retrieval_every_caption_is_a_query(space, tmp_path, name, make, clips, captions):
    result = evaluate_protocol(name, make(tmp_path / name), space)
    m = result["metrics"]
    assert result["num_evaluated"] == clips and m["num_captions"] == captions
    # By hand, from the same space: each caption's rank of its clip, each clip's best caption.
    records, _ = read_layout(name, make(tmp_path / f"{name}-again"))
    audio, _, _ = space.embed_files([r.paths["audio"] for r in records], "audio")
    captions = [c for r in records for c in r.captions]
    owner = torch.tensor([i for i, r in enumerate(records) for _ in r.captions])
    sim = space.embed_texts(captions) @ audio.T  # [captions, clips]
    own = sim[torch.arange(len(captions)), owner]
    t2a = (sim > own[:, None]).sum(1) + 1
    a2t = torch.stack([(sim[:, i] > own[owner == i].max()).sum() + 1 for i in range(len(records))])
    assert m["t2a_R@1"] == pytest.approx(float((t2a == 1).float().mean()))
    assert m["a2t_R@1"] == pytest.approx(float((a2t == 1).float().mean()))
    assert m["t2a_R@10"] == 1.0  # a gallery of 2-3 clips: every caption's clip is in the top 10
    assert set(result["headline"]) == {"t2a_R@1", "t2a_R@10"}
    table = format_table(result)
    assert ("6.0" in table) if name == "clotho" else ("42.3" in table)


def test_sund_keeps_its_19_classes(space, tmp_path):
    root = make_sunrgbd(tmp_path / "SUNRGBD")
    # Without a split file the test split cannot be told from the training frames: refused.
    with pytest.raises(FileNotFoundError, match="split='test' needs SUN RGB-D's train/test"):
        evaluate_protocol("sund", root, space, batch_size=2)
    everything = evaluate_protocol("sund", root, space, {"split": "all"}, batch_size=2)
    assert everything["num_records"] == 3  # asked for on purpose: every frame of the 19 classes
    train_frame = root / "kv1" / "frame4"  # an office frame the test split must leave out
    _rgb(train_frame / "image" / "0000004.jpg", 4)
    _depth_png(train_frame / "depth_bfx" / "0000004.png", 4, rotate=True)
    (train_frame / "scene.txt").write_text("office")
    (train_frame / "intrinsics.txt").write_text(INTRINSICS)
    test = [f"kv1/frame{i}" for i in range(4)]
    (root / "split.json").write_text(json.dumps({"train": ["kv1/frame4"], "test": test}))
    result = evaluate_protocol("sund", root, space, batch_size=2)
    assert len(SUN_D_CLASSES) == 19 and result["classnames"] == SUN_D_CLASSES
    assert result["num_records"] == 3 and result["excluded_by_protocol"] == 1  # the garage
    assert result["skipped"] == 0 and "35.1" in format_table(result)


def test_nyud_folds_other_scenes_into_other(space, tmp_path):
    protocol = get_protocol("nyud")
    records = [
        Record(str(i), {}, None, meta={"scene": s})
        for i, s in enumerate(["kitchen", "excercise_room", "living_room", "cafe"])
    ]
    _, labels, names, _ = prepare_records(protocol, records, None)
    other = NYU_D_CLASSES.index("other")
    assert labels == [
        NYU_D_CLASSES.index("kitchen"),
        other,
        NYU_D_CLASSES.index("living room"),
        other,
    ]
    assert len(NYU_D_OTHER_SCENES) == 18 and not set(NYU_D_OTHER_SCENES) & set(NYU_D_CLASSES)
    result = evaluate_protocol("nyud", make_nyud(tmp_path / "nyud"), space)
    assert result["num_evaluated"] == 4 and len(result["metrics"]["confusion_matrix"]) == 10
    assert "54.0" in format_table(result) and "68.5" in format_table(result)


def test_llvip_scores_person_and_background_crops(space, tmp_path):
    result = evaluate_protocol("llvip", make_llvip(tmp_path / "LLVIP"), space)
    assert result["classnames"] == ["background", "person"]
    assert result["num_evaluated"] == 4  # one person and one background crop per image
    assert "63.4" in format_table(result)


def test_a_layout_name_given_as_a_protocol_names_its_protocol():
    assert get_protocol("SUN-D").name == "sund"
    with pytest.raises(KeyError, match=r"'sunrgbd' \(the sunrgbd layout's protocol is 'sund'\)"):
        get_protocol("sunrgbd")
    with pytest.raises(KeyError, match=r"unknown protocol 'nosuch'; known: esc50, "):
        get_protocol("nosuch")


def test_every_protocol_has_its_published_number():
    published = {
        "esc50": 66.9,
        "audioset": 17.6,
        "vggsound": 27.8,
        "sund": 35.1,
        "nyud": 54.0,
        "llvip": 63.4,
        "clotho": 6.0,
        "audiocaps": 9.3,
    }
    for name, value in published.items():
        refs = [r for r in PROTOCOLS[name].references if r.model == "ImageBind"]
        assert refs[0].value == value


def test_paired_records_give_instance_retrieval_across_modalities(space, tmp_path):
    from imagebind_lite.data.adapters import read_layout

    records, _ = read_layout("sunrgbd", make_sunrgbd(tmp_path / "s"))
    colls = record_collections(space, records, tmp_path / "s")
    assert set(colls) == {"vision", "depth"} and len(colls["depth"].embeddings) == 4
    results = cross_modal_retrieval(colls, [("depth", "vision"), ("vision", "depth")], (1, 4))
    assert results["depth->vision"]["positives"] == "instance"
    assert results["depth->vision"]["R@4"] == 1.0 and results["depth->vision"]["gallery"] == 4


def test_eval_mode_switches_augmentation_off_through_wrappers_and_leaves_training_alone(tmp_path):
    from imagebind_lite.data.bad_input import BadInputDataset
    from imagebind_lite.data.datasets import eval_mode
    from imagebind_lite.data.manifest import PairSampler, RecordDataset
    from imagebind_lite.data.scenes import SceneSet
    from imagebind_lite.modalities import get_modality

    # An outer wrapper (the bad-input policy) around an inner dataset that flips at random.
    n = 16
    vision = torch.randn(n, 3, 4, 4)
    depth = torch.randn(n, 1, 4, 4)
    ids = [f"scene-{i}" for i in range(n)]
    inner = SceneSet(vision, depth, torch.zeros(n, dtype=torch.long), "depth", ids, flip=True)
    outer = BadInputDataset(inner)
    view = eval_mode(outer)
    assert view.dataset.flip is False  # the inner dataset's augmentation is off
    for i in range(n):
        assert torch.equal(view[i]["depth"], depth[i]) and torch.equal(view[i]["vision"], vision[i])
    # ... and the training dataset is as it was: still flipping.
    assert outer.dataset is inner and inner.flip is True
    assert any(not torch.equal(outer[i]["depth"], depth[i]) for i in range(n))

    # An augmenting modality (SpecAugment on audio) in a record dataset: evaluation reads the
    # same tensor every time, training draws new masks, and the training set goes on doing so.
    _clip(tmp_path / "clip.flac", 0)
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "frame.png")
    spec = get_modality("audio")
    sampler = PairSampler(
        spec,
        {**spec.preprocess, **AUDIO_PREPROCESS, "freq_mask": 20, "time_mask": 20},
        Anchor(AnchorConfig(pretrained=None)),
    )
    record = Record("clip", {"vision": Path("frame.png"), "audio": Path("clip.flac")})
    records = RecordDataset([record], tmp_path, sampler, train=True)
    evaluation = eval_mode(BadInputDataset(records))
    assert records.train is True and evaluation.dataset.train is False
    clean = evaluation[0]["audio"]
    assert torch.equal(clean, evaluation[0]["audio"])
    assert not torch.equal(records[0]["audio"], clean)  # masked
    assert records.train is True

    class Plain(torch.utils.data.Dataset):  # says nothing about evaluation
        def __len__(self):
            return 1

        def __getitem__(self, index):
            return {"x": torch.zeros(1)}

    with pytest.raises(TypeError, match="eval_mode"):
        eval_mode(BadInputDataset(Plain()))
