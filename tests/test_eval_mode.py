"""Datasets' evaluation mode (``dataset.eval_mode()``, ``data.datasets.eval_mode``): the same
samples without augmentation, through every wrapper, leaving the training set as it was.

The default run (configs/audio.yaml) trains on AV-MNIST with mel-axis warping, time shifts and
SpecAugment; the linear probe embeds that training split, so its evaluation mode must switch
all three off (the attribute-switching ``eval_view`` it replaces missed the warp)."""

import csv

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image

from imagebind_lite.anchor import Anchor
from imagebind_lite.config import AnchorConfig, load_config
from imagebind_lite.data import layout_datasets
from imagebind_lite.data.datasets import eval_mode, get_dataset_builder, list_datasets
from imagebind_lite.data.manifest import read_manifest
from imagebind_lite.data.shards import write_shards
from imagebind_lite.evaluation.protocols import run_train_collection
from imagebind_lite.modalities import get_modality


@pytest.fixture(scope="module")
def anchor():
    return Anchor(AnchorConfig(pretrained=None))


@pytest.fixture(scope="module")
def avmnist(anchor):
    cfg = load_config(REPO / "configs" / "audio.yaml", ["anchor.pretrained=null"])
    assert cfg.data.options["freq_warp"] > 0 and cfg.data.options["time_shift"] > 0
    return cfg, get_dataset_builder("avmnist")(cfg, anchor, get_modality("audio"))


def test_avmnist_evaluation_mode_reads_the_clips_unwarped_every_time(avmnist):
    _, bundle = avmnist
    train = bundle.train.dataset  # the clips, under the embedded images (EmbeddedImages)
    view = eval_mode(bundle.train)
    for i in (0, 7, 123):
        first = view[i]["audio"]
        assert torch.equal(first, view[i]["audio"])  # identical on repeated reads
        assert torch.equal(first, train.features[i])  # the clip as computed: no warp, no shift
    view.set_epoch(3)
    assert torch.equal(view[7]["audio"], train.features[7])
    # The training set itself still augments (warp, shift, SpecAugment), on every read.
    assert train.augment is not None and train.max_shift > 0 and any(train.warp)
    assert not torch.equal(train[7]["audio"], train.features[7])


def test_avmnist_training_mode_warps_and_evaluation_mode_does_not(avmnist):
    import copy

    _, bundle = avmnist
    warp_only = copy.copy(bundle.train.dataset)
    warp_only.augment, warp_only.max_shift = None, 0  # what eval_view used to switch off
    assert any(warp_only.warp)
    differs = [not torch.equal(warp_only[i]["audio"], warp_only.features[i]) for i in range(8)]
    assert sum(differs) >= 4  # training mode warps (a factor within 1% of 1 may leave a clip)
    view = eval_mode(warp_only)
    assert all(torch.equal(view[i]["audio"], view.features[i]) for i in range(8))


def test_the_linear_probe_embeds_the_training_split_in_evaluation_mode(avmnist):
    cfg, bundle = avmnist

    class Space:
        device = "cpu"

        def encoder_fn(self, modality):
            return lambda x: x.flatten(1)[:, :16]

    one, _ = run_train_collection(Space(), "unused", batch_size=256, built=(cfg, bundle))
    two, _ = run_train_collection(Space(), "unused", batch_size=256, built=(cfg, bundle))
    torch.testing.assert_close(one.embeddings, two.embeddings, rtol=0, atol=0)
    clips = bundle.train.dataset
    clean = torch.nn.functional.normalize(clips.features.flatten(1)[:, :16], dim=-1)
    torch.testing.assert_close(one.embeddings, clean)
    assert one.ids == clips.ids and one.labels == clips.labels.tolist()


# --------------------------------------------------------------- every registered dataset


def _image(path, value, size=(40, 30)):
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def _depth(path, value, size=(40, 30)):
    x = np.full((size[1], size[0]), value, np.uint16)
    x[: size[1] // 2] += 800  # a step, so that crops differ
    Image.fromarray(x).save(path)


def _depth_manifest(root):
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(6):
        _image(root / f"rgb{i}.png", 30 * i)
        _depth(root / f"d{i}.png", 1500 + 200 * i)
        split = "test" if i >= 4 else "train"
        rows.append({"vision": f"rgb{i}.png", "depth": f"d{i}.png", "label": i % 2, "split": split})
    with (root / "pairs.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["vision", "depth", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    (root / "classes.txt").write_text("near\nfar\n")
    return root / "pairs.csv"


DEPTH = [
    "modality=depth",
    "anchor.pretrained=null",
    "data.preprocess={image_size: 16, layout: mm, fx: 500.0, mean: 20.0, std: 10.0}",
]


def _nyud(root):
    for split, frame in (("train", "0001"), ("train", "0002"), ("test", "0003")):
        folder = root / split / frame
        folder.mkdir(parents=True)
        _image(folder / "image.jpg", int(frame) * 40)
        _depth(folder / "depth.png", 2500)
        (folder / "scene.txt").write_text("bedroom" if frame != "0002" else "kitchen")


def _bundles(tmp_path, anchor):
    manifest = _depth_manifest(tmp_path / "m")
    records, names = read_manifest(manifest)
    write_shards(records, tmp_path / "m", tmp_path / "shards", shard_size=2, classnames=names)
    _nyud(tmp_path / "nyud")
    setups = {
        "synthetic_scenes": [
            "modality=thermal",
            "anchor.pretrained=null",
            "data.options={train_size: 12, test_size: 4, image_size: 8}",
        ],
        "manifest": [*DEPTH, f"data.root={tmp_path / 'm'}", "data.options.manifest=pairs.csv"],
        "shards": [
            *DEPTH,
            f"data.root={tmp_path / 'shards'}",
            f"data.options.eval_shards={tmp_path / 'shards'}",
        ],
        "nyud": [*DEPTH, f"data.root={tmp_path / 'nyud'}"],
        "pendigits": ["modality=pen", "anchor.pretrained=null"],
    }
    for name, overrides in setups.items():
        cfg = load_config(None, [f"data.dataset={name}", *overrides])
        yield (
            name,
            (cfg.modality, get_dataset_builder(name)(cfg, anchor, get_modality(cfg.modality))),
        )


def test_every_registered_dataset_reads_the_same_samples_in_evaluation_mode(tmp_path, anchor):
    built = dict(_bundles(tmp_path, anchor))
    # The built-in ones (a modality file imported by a test registers others).
    ours = {
        n
        for n in list_datasets()
        if get_dataset_builder(n).__module__.startswith("imagebind_lite.")
    }
    # The other layouts are read by the same record datasets as nyud (build_from_records).
    assert ours == {"avmnist", *built, *layout_datasets.LAYOUT_DATASETS}
    for name, (modality, bundle) in built.items():
        view = eval_mode(bundle.train)
        # The image side: pixels, or the anchor's embedding of them (pendigits embeds once).
        side = "vision" if "vision" in view[1] else "anchor_embedding"
        assert torch.equal(view[1][modality], view[1][modality]), name
        assert torch.equal(view[1][side], view[1][side]), name
        view.set_epoch(5)
        evaluation = eval_mode(bundle.eval)
        assert torch.equal(evaluation[0][modality], evaluation[0][modality]), name
        # Training draws its augmentation per epoch: random crops (depth) or flips (scenes),
        # so some sample of some epoch differs from its evaluation read.
        differs = False
        for epoch in range(4):
            bundle.train.set_epoch(epoch)
            for i in range(len(bundle.train)):
                differs |= not torch.equal(bundle.train[i][modality], view[i][modality])
                if differs:
                    break
        assert differs, name
