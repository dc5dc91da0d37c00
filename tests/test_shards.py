"""Tar shards: written from a manifest, read back (random access and resampled streams) as the
same samples the manifest dataset gives."""

import json
import sys

import pytest
import torch
from conftest import REPO
from test_manifest import depth_stats, make_depth_pairs, tiny_depth_config, write_csv

from imagebind_lite.data import shards
from imagebind_lite.data.datasets import get_dataset_builder
from imagebind_lite.data.manifest import PairSampler, RecordDataset, read_manifest
from imagebind_lite.data.shards import ShardDataset, ShardStream, read_index, scan_tar
from imagebind_lite.modalities import get_modality

pytest.importorskip("webdataset")
sys.path.insert(0, str(REPO / "train"))
import write_shards  # noqa: E402


@pytest.fixture(scope="module")
def anchor():
    from imagebind_lite.anchor import Anchor
    from imagebind_lite.config import AnchorConfig

    return Anchor(AnchorConfig(pretrained=None))


@pytest.fixture
def written(tmp_path):
    root = tmp_path / "data"
    rows = make_depth_pairs(root, n=10, test=2)
    rows.append({**rows[0], "id": "escapes", "depth": "../outside.png"})
    rows.append({**rows[0], "id": "gone", "vision": "rgb/absent.jpg"})
    write_csv(root / "pairs.csv", rows)
    depth_stats(root)
    out = tmp_path / "shards"
    index = write_shards.main(
        [
            "--manifest",
            "pairs.csv",
            "--root",
            str(root),
            "--out",
            str(out),
            "--shard-size",
            "3",
            "--split",
            "train",
        ]
    )
    return root, out, index


def sampler_for(cfg, anchor):
    spec = get_modality("depth")
    return PairSampler(
        spec, {**spec.preprocess, **cfg.data.preprocess, "mean": 10.0, "std": 5.0}, anchor
    )


def test_shards_hold_the_manifest_pairs(written, tmp_path, anchor):
    root, out, index = written
    assert index["num_samples"] == 8 and index["counts"] == [3, 3, 2]
    assert index["skipped"] == {"outside_root": 1, "missing": 1}
    assert index["keys"] == ["depth", "vision"] and index["classnames"] == ["far", "near"]
    assert (out / "stats.json").is_file() and read_index(out)["shards"][0] == "shard-000000.tar"
    members = scan_tar(out / "shard-000000.tar")
    assert len(members) == 3 and set(members[0]) == {"vision.jpg", "depth.png", "json"}

    cfg = tiny_depth_config(tmp_path, root)
    sampler = sampler_for(cfg, anchor)
    records, _ = read_manifest(root / "pairs.csv", root)
    records = [r for r in records if r.split == "train" and r.id not in ("escapes", "gone")]
    for train in (False, True):
        from_files = RecordDataset(records, root, sampler, train, seed=4)
        from_shards = ShardDataset(out, sampler, train, seed=4)
        assert len(from_shards) == len(from_files) == 8
        for i in range(8):
            a, b = from_files[i], from_shards[i]
            assert (a["id"], a["label"]) == (b["id"], b["label"])
            assert torch.equal(a["depth"], b["depth"]) and torch.equal(a["vision"], b["vision"])


def test_random_access_reads_the_offsets_written_with_each_shard(
    written, tmp_path, anchor, monkeypatch
):
    root, out, _ = written
    sampler = sampler_for(tiny_depth_config(tmp_path, root), anchor)
    expected = [ShardDataset(out, sampler, False)[i] for i in range(8)]
    for name in read_index(out)["shards"]:
        recorded = json.loads((out / f"{name}.offsets.json").read_text())
        assert recorded["size"] == (out / name).stat().st_size
        assert shards.read_offsets(out / name) == shards.scan_tar_keyed(out / name)

    def no_scan(path):
        raise AssertionError(f"scanned {path}")

    monkeypatch.setattr(shards, "scan_tar_keyed", no_scan)
    fresh = ShardDataset(out, sampler, False)
    for i in range(8):
        assert torch.equal(fresh[i]["depth"], expected[i]["depth"])
    # A shard rewritten since (another size) is scanned again rather than misread.
    (out / "shard-000000.tar.offsets.json").write_text(json.dumps({"size": 1, "samples": []}))
    with pytest.raises(AssertionError, match="scanned .*shard-000000.tar"):
        ShardDataset(out, sampler, False)[0]


def test_resampled_streams_differ_by_rank_and_decode_the_same(
    written, tmp_path, anchor, monkeypatch
):
    root, out, _ = written
    cfg = tiny_depth_config(tmp_path, root)
    sampler = sampler_for(cfg, anchor)
    by_id = {s["id"]: s for s in (ShardDataset(out, sampler, False)[i] for i in range(8))}

    def streamed(rank, n=12):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        stream = ShardStream(out, sampler, False, seed=1, epoch_size=n)
        assert len(stream) == n
        return [stream[i] for i in range(n)]

    rank0, rank1 = streamed(0), streamed(1)
    ids0, ids1 = [s["id"] for s in rank0], [s["id"] for s in rank1]
    assert set(ids0) <= set(by_id) and set(ids1) <= set(by_id)
    assert ids0 != ids1  # every rank draws its own shards
    assert ids0 == [s["id"] for s in streamed(0)]  # deterministically
    for sample in rank0:
        assert torch.equal(sample["depth"], by_id[sample["id"]]["depth"])


def test_registered_shards_dataset_trains(written, tmp_path, anchor):
    from imagebind_lite.train import train

    root, out, _ = written
    extra = [
        f"data.root={out}",
        "data.dataset=shards",
        "data.options={access: stream, epoch_size: 16}",
        "optim.max_steps=2",
    ]
    cfg = tiny_depth_config(tmp_path, root, *extra)
    bundle = get_dataset_builder("shards")(cfg, anchor, get_modality("depth"))
    assert len(bundle.train) == 16 and bundle.eval is None and bundle.classnames == ["far", "near"]
    assert bundle.info["normalisation"]["mean"] == 10.0  # the copied stats.json
    metrics = train(tiny_depth_config(tmp_path, root, *extra), quiet=True)
    saved = json.loads((tmp_path / "runs/depth-shards/metrics.json").read_text())
    assert saved["steps"] == 2 and saved["data_access"] == "stream"
    assert metrics["skipped_total"] == 0


def test_aligned_crops_cache_k_seeded_views_named_by_shard_and_key(written, tmp_path, anchor):
    """Depth crops aligned with the RGB image: K views per sample, the same view (the same crop
    on both sides) whether the sample is read by random access or from a stream."""
    from imagebind_lite.cache import attach_anchor_cache, write_anchor_cache

    root, out, _ = written
    sampler = sampler_for(tiny_depth_config(tmp_path, root), anchor)
    dataset = ShardDataset(out, sampler, True, seed=3)
    assert dataset.max_anchor_views is None  # a continuum of crops: K must be chosen
    report = write_anchor_cache(anchor, dataset, tmp_path / "cache", views=2, shard_size=6)
    assert report["entries"] == 16 and report["shards"] == 3
    wrapped = attach_anchor_cache(dataset, tmp_path / "cache", anchor)
    stream = ShardStream(out, sampler, True, seed=3, epoch_size=12)
    stream.use_anchor_views(2)
    by_view = {}
    for i in range(8):
        sample = wrapped[i]
        view_id = dataset[i]["view_id"]
        assert view_id.startswith(f"shard-00000{i // 3}.tar@") and "#" in view_id
        expected = anchor.encode_image(dataset.anchor_input(view_id)[None])[0]
        torch.testing.assert_close(sample["anchor_embedding"], expected, rtol=0, atol=1e-5)
        by_view[view_id] = sample["depth"]
    streamed = [stream[i] for i in range(12)]
    shared = [s for s in streamed if s["view_id"] in by_view]
    assert shared  # the draws overlap; a view is one crop, however it is read
    for s in shared:
        assert torch.equal(s["depth"], by_view[s["view_id"]])
    assert {s["view_id"].rpartition("#")[0] for s in streamed} <= {
        v.rpartition("#")[0] for v in dataset.anchor_view_ids(2)
    }
