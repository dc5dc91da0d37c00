"""Anchor caches: cached training follows the uncached loss curve, a stale cache is refused,
interrupted caching resumes, two processes split the shards, and the text-side cache."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, free_port, run_script, tiny_overrides
from safetensors.torch import load_file, save_file

from imagebind_lite.anchor import Anchor
from imagebind_lite.cache import (
    MANIFEST,
    AnchorCache,
    StaleCacheError,
    attach_anchor_cache,
    cached_class_text_embeddings,
    shard_name,
    write_anchor_cache,
)
from imagebind_lite.config import AnchorConfig, ConfigError, load_config
from imagebind_lite.data.datasets import get_dataset_builder
from imagebind_lite.evaluation.zero_shot import class_text_embeddings
from imagebind_lite.modalities import get_modality
from imagebind_lite.train import train

SCENES = "data.options={train_size: 64, test_size: 32}"
SHARD = 48  # 64 scenes x 2 views (as rendered, flipped) -> shards of 48, 48, 32


def _load_script():
    spec = importlib.util.spec_from_file_location("cache_anchor", REPO / "train/cache_anchor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cache_anchor = _load_script()


@pytest.fixture(scope="module")
def anchor_file(tmp_path_factory):
    # A null pretrained anchor is random on every build: fix one random anchor in a file.
    torch.manual_seed(0)
    anchor = Anchor(AnchorConfig(pretrained=None))
    path = tmp_path_factory.mktemp("anchor") / "tiny-random-anchor.safetensors"
    save_file({k: v.contiguous() for k, v in anchor.model.state_dict().items()}, str(path))
    return path


def scene_overrides(tmp_path, anchor_file, *extra):
    return tiny_overrides(
        tmp_path,
        SCENES,
        f"anchor.pretrained={anchor_file}",
        "data.batch_size=16",
        *extra,
    )


def write_cli_cache(out, anchor_file, *extra):
    args = ["--config", str(REPO / "configs/depth.yaml"), "--out", str(out)]
    args += ["--shard-size", str(SHARD), SCENES, f"anchor.pretrained={anchor_file}", *extra]
    return cache_anchor.main(args)


@pytest.fixture(scope="module")
def scenes_cache(tmp_path_factory, anchor_file):
    out = tmp_path_factory.mktemp("cache") / "scenes"
    report = write_cli_cache(out, anchor_file)
    assert report["complete"] and report["entries"] == 128 and report["shards"] == 3
    return out


def scenes_train_set(anchor_file, *extra):
    overrides = [SCENES, f"anchor.pretrained={anchor_file}", *extra]
    cfg = load_config(REPO / "configs/depth.yaml", overrides)
    anchor = Anchor(cfg.anchor)
    bundle = get_dataset_builder(cfg.data.dataset)(cfg, anchor, get_modality(cfg.modality))
    return bundle.train, anchor


def test_manifest_records_anchor_dataset_and_dtype(scenes_cache, anchor_file):
    manifest = json.loads((scenes_cache / MANIFEST).read_text())
    assert manifest["complete"] is True
    assert manifest["anchor"]["model"] == "tiny-clip-32"
    assert manifest["anchor"]["pretrained"] == str(anchor_file)
    assert manifest["anchor_fingerprint"]["weights"].startswith("sha256:")
    assert manifest["anchor"]["image_size"] == [32, 32] and "image_mean" in manifest["anchor"]
    assert manifest["dtype"] == "float32" and manifest["embed_dim"] == 64
    assert manifest["dataset"]["name"] == "synthetic_scenes"
    assert manifest["dataset"]["options"] == {"train_size": 64, "test_size": 32}
    assert manifest["views"] == 2 and manifest["num_entries"] == 128
    assert [s["count"] for s in manifest["shards"]] == [48, 48, 32]


def test_cached_samples_carry_the_anchor_embedding_of_the_same_view(scenes_cache, anchor_file):
    dataset, anchor = scenes_train_set(anchor_file)
    reference = [dataset[i] for i in range(len(dataset))]  # normal mode: "vision"
    wrapped = attach_anchor_cache(dataset, scenes_cache, anchor, "synthetic_scenes")
    flipped = 0
    for i, plain in enumerate(reference):
        cached = wrapped[i]
        assert "vision" not in cached and "view_id" not in cached
        assert torch.equal(cached["depth"], plain["depth"])  # the same flip on the sensor side
        expected = anchor.encode_image(plain["vision"][None])[0]
        torch.testing.assert_close(cached["anchor_embedding"], expected, rtol=0, atol=1e-5)
        flipped += not torch.equal(plain["vision"], dataset.anchor_input(plain["id"]))
    assert 0 < flipped < len(reference)  # both views occur, so the flip is really cached


def test_training_with_the_cache_gives_the_same_losses(
    tmp_path, scenes_cache, anchor_file, monkeypatch
):
    common = scene_overrides(tmp_path, anchor_file, "optim.epochs=2")  # 2 epochs: set_epoch
    plain = train(load_config(REPO / "configs/depth.yaml", [*common, "run_name=plain"]), quiet=True)

    def no_anchor_forward(*_):
        raise AssertionError("the anchor ran on images although a cache was given")

    monkeypatch.setattr(Anchor, "encode_image", no_anchor_forward)
    cached_cfg = load_config(
        REPO / "configs/depth.yaml", [*common, "run_name=cached", f"anchor.cache={scenes_cache}"]
    )
    cached = train(cached_cfg, quiet=True)
    assert plain["steps"] == cached["steps"] == 8
    assert abs(plain["final_loss"] - cached["final_loss"]) < 1e-5
    a = load_file(str(tmp_path / "plain/model/model.safetensors"))
    b = load_file(str(tmp_path / "cached/model/model.safetensors"))
    for key in a:  # the whole trajectory: 8 optimizer steps from the same start
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5, msg=key)


def test_stale_cache_is_refused_in_one_line(tmp_path, scenes_cache, anchor_file):
    def refused(*extra):
        cfg = load_config(
            REPO / "configs/depth.yaml",
            [*tiny_overrides(tmp_path, SCENES, f"anchor.cache={scenes_cache}"), *extra],
        )
        with pytest.raises(StaleCacheError) as err:  # a ConfigError: the CLI prints one line
            train(cfg, quiet=True)
        assert "\n" not in str(err.value)
        return str(err.value)

    shipped = refused("anchor.pretrained=imagebind_lite:tiny-clip-digits-scenes")
    assert "stale anchor cache" in shipped and "weights differ" in shipped
    assert "random anchor" in refused()  # tiny_overrides: anchor.pretrained=null
    # The same anchor, other data under the same ids: caught by the input spot checks.
    other = refused(f"anchor.pretrained={anchor_file}", "data.preprocess={image_size: 16}")
    assert "differs from the cached one" in other
    # The writer refuses to mix anchors in one folder too.
    with pytest.raises(SystemExit) as exit_info:
        write_cli_cache(scenes_cache, "imagebind_lite:tiny-clip-digits-scenes")
    assert "stale anchor cache" in str(exit_info.value) and "--overwrite" in str(exit_info.value)
    # And a random anchor is never cached: no run could ever match it.
    with pytest.raises(SystemExit, match="random anchor"):
        cache_anchor.main(
            [
                "--config",
                str(REPO / "configs/depth.yaml"),
                "--out",
                str(tmp_path / "random"),
                SCENES,
                "anchor.pretrained=null",
            ]
        )


def test_interrupted_caching_resumes(tmp_path, scenes_cache, anchor_file):
    dataset, anchor = scenes_train_set(anchor_file)
    out = tmp_path / "resumed"
    kwargs = dict(shard_size=SHARD, dataset_info={"name": "synthetic_scenes"})
    first = write_anchor_cache(anchor, dataset, out, max_shards=1, **kwargs)  # "killed" early
    assert first["computed"] == [0] and not first["complete"]
    with pytest.raises(ConfigError, match=r"incomplete \(1/3 shards\)"):
        attach_anchor_cache(dataset, out, anchor)
    # A crash mid-write leaves a partial temp file, and a copy may leave a truncated shard.
    (out / f".{shard_name(1)}.tmp-99999").write_bytes(b"partial")
    data = (scenes_cache / shard_name(2)).read_bytes()
    (out / shard_name(2)).write_bytes(data[: len(data) // 2])
    before = (out / shard_name(0)).stat().st_mtime_ns

    second = write_anchor_cache(anchor, dataset, out, **kwargs)
    assert second["skipped"] == [0] and second["computed"] == [1, 2] and second["complete"]
    assert (out / shard_name(0)).stat().st_mtime_ns == before
    assert not list(out.glob(".*.tmp-*"))
    ours, reference = AnchorCache.open(out), AnchorCache.open(scenes_cache)
    assert ours.ids == reference.ids
    torch.testing.assert_close(ours.embeddings, reference.embeddings, rtol=0, atol=1e-6)

    # A shard lost from a complete cache: training refuses it, the same command repairs it.
    (out / shard_name(1)).unlink()
    with pytest.raises(ConfigError, match="unreadable"):
        attach_anchor_cache(dataset, out, anchor)
    third = write_anchor_cache(anchor, dataset, out, **kwargs)
    assert third["computed"] == [1] and third["skipped"] == [0, 2] and third["complete"]
    attach_anchor_cache(dataset, out, anchor)


def test_fewer_views_than_the_dataset_draws(tmp_path, anchor_file):
    dataset, anchor = scenes_train_set(anchor_file)
    report = write_anchor_cache(anchor, dataset, tmp_path / "one-view", views=1)
    assert report["entries"] == 64 and report["views"] == 1
    wrapped = attach_anchor_cache(dataset, tmp_path / "one-view", anchor)
    rows = [wrapped.cache.index[dataset[i]["view_id"]] for i in range(len(dataset))]
    assert sorted(rows) == list(range(64))  # one fixed view per scene: nothing flipped
    # A view count the dataset cannot draw is capped at what it can.
    assert write_anchor_cache(anchor, dataset, tmp_path / "many", views=5)["views"] == 2


def test_two_processes_split_the_shards(tmp_path, scenes_cache, anchor_file):
    out = tmp_path / "two"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--main_process_port",
        str(free_port()),
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "train/cache_anchor.py",
        "--config",
        "configs/depth.yaml",
        "--out",
        str(out),
        "--shard-size",
        str(SHARD),
        SCENES,
        f"anchor.pretrained={anchor_file}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["complete"]
    assert summary["computed_by_rank"] == {"0": [0, 2], "1": [1]}
    ranks = {_meta(out / shard_name(i))["rank"] for i in range(3)}
    assert ranks == {"0", "1"}
    torch.testing.assert_close(
        AnchorCache.open(out).embeddings,
        AnchorCache.open(scenes_cache).embeddings,
        rtol=0,
        atol=1e-6,
    )


def _meta(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def test_avmnist_views_are_the_paired_images(tmp_path):
    # A small copy of the shipped data (two recordings per digit and speaker) keeps this quick.
    from imagebind_lite.data.avmnist import DEFAULT_ROOT

    (tmp_path / "audio").mkdir()
    (tmp_path / "digits.csv.gz").symlink_to(DEFAULT_ROOT / "digits.csv.gz")
    for path in sorted((DEFAULT_ROOT / "audio").glob("*_[01].flac")):
        (tmp_path / "audio" / path.name).symlink_to(path)
    overrides = ["anchor.pretrained=null", f"data.root={tmp_path}"]
    cfg = load_config(REPO / "configs/audio.yaml", [*overrides, "data.options.embed_images=false"])
    anchor = Anchor(cfg.anchor)
    build, spec = get_dataset_builder("avmnist"), get_modality("audio")
    train_set = build(cfg, anchor, spec).train
    assert len(train_set) == 2 * 10 * 4  # speakers george and theo are held out
    # By default the builder embeds every image once: a sample carries its drawn image's
    # embedding, the anchor's output for that image, with the same draws as without.
    embedded = build(load_config(REPO / "configs/audio.yaml", overrides), anchor, spec).train
    for i in (0, 33, 79):
        sample, inner = embedded[i], embedded.dataset
        inner.use_anchor_views(None)
        pixels = inner[i]["vision"]
        inner.use_anchor_views(1)
        with torch.no_grad():
            expected = anchor.encode_image(pixels[None]).float()[0]
        torch.testing.assert_close(sample["anchor_embedding"], expected, rtol=1e-5, atol=1e-6)
        assert "vision" not in sample and torch.equal(sample["audio"], train_set[i]["audio"])
    plain = [train_set[i] for i in range(0, len(train_set), 7)]
    train_set.use_anchor_views(1)
    views = train_set.anchor_view_ids(1)
    assert len(views) == len(set(views)) == len(train_set.images)
    for i, sample in zip(range(0, len(train_set), 7), plain):
        cached = train_set[i]
        assert "vision" not in cached and cached["view_id"] in views
        assert torch.equal(train_set.anchor_input(cached["view_id"]), sample["vision"])
        assert torch.equal(cached["audio"], sample["audio"])  # the same augmentation draw
    train_set.use_anchor_views(None)
    assert torch.equal(train_set[0]["vision"], plain[0]["vision"])


def test_text_cache_reuses_and_keys_by_anchor_and_prompts(tmp_path, anchor_file, monkeypatch):
    anchor = Anchor(AnchorConfig(pretrained=str(anchor_file)))
    classes, templates = ["circle", "square"], ["a photo of a {}.", "a {} shape."]
    expected = class_text_embeddings(anchor.encode_text, classes, templates)
    first = cached_class_text_embeddings(anchor, classes, templates, tmp_path)
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    stored = list((tmp_path / "text").glob("*.safetensors"))
    assert len(stored) == 1

    def no_text_forward(*_):
        raise AssertionError("the text tower ran although the prompts were cached")

    monkeypatch.setattr(anchor, "encode_text", no_text_forward)
    torch.testing.assert_close(
        cached_class_text_embeddings(anchor, classes, templates, tmp_path), expected, rtol=0, atol=0
    )
    monkeypatch.undo()
    cached_class_text_embeddings(anchor, classes, templates[:1], tmp_path)  # other prompts
    other = Anchor(AnchorConfig())  # the shipped anchor: another identity
    cached_class_text_embeddings(other, classes, templates, tmp_path)
    assert len(list((tmp_path / "text").glob("*.safetensors"))) == 3
    # The default folder follows $IMAGEBIND_LITE_CACHE; a random anchor is never stored.
    monkeypatch.setenv("IMAGEBIND_LITE_CACHE", str(tmp_path / "env"))
    cached_class_text_embeddings(anchor, classes, templates)
    assert len(list((tmp_path / "env/text").glob("*.safetensors"))) == 1
    random_anchor = Anchor(AnchorConfig(pretrained=None))
    cached_class_text_embeddings(random_anchor, classes, templates, tmp_path / "random")
    assert not (tmp_path / "random").exists()


def audio_manifest(root, n=32):
    """FSDD clips paired with real UCI digit images of the same digit, as files + a CSV."""
    import csv
    import shutil

    import numpy as np
    from PIL import Image

    from imagebind_lite.data.avmnist import load_digit_images

    images, labels = load_digit_images()
    (root / "audio").mkdir(parents=True)
    (root / "frames").mkdir()
    clips = sorted((REPO / "imagebind_lite/assets/avmnist/audio").glob("*_jackson_*.flac"))
    rows = []
    for i, clip in enumerate(clips[:n]):
        digit = int(clip.name.split("_")[0])
        pick = int((labels == digit).nonzero()[i % 5])
        pixels = (images[pick].numpy() * 255).astype(np.uint8)
        Image.fromarray(pixels).resize((32, 32)).convert("RGB").save(root / f"frames/{i}.png")
        shutil.copy(clip, root / "audio" / clip.name)
        rows.append({"id": f"clip{i}", "audio": f"audio/{clip.name}", "vision": f"frames/{i}.png"})
    with open(root / "pairs.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "audio", "vision"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def manifest_overrides(tmp_path, root, anchor_file, *extra):
    return tiny_overrides(
        tmp_path,
        "modality=audio",
        "data.dataset=manifest",
        f"data.root={root}",
        "data.options={manifest: pairs.csv}",
        "data.preprocess={num_clips: 1, clip_duration: 1.12, num_mel_bins: 64, target_length: 112}",
        f"anchor.pretrained={anchor_file}",
        "data.batch_size=8",
        "optim.epochs=2",
        *extra,
    )


def train_plain_and_cached(tmp_path, common, cache, monkeypatch, steps):
    """Train without and with the cache (the anchor forbidden to run): the same steps, loss and
    weights."""
    plain = train(load_config(None, [*common, "run_name=plain"]), quiet=True)

    def no_anchor_forward(*_):
        raise AssertionError("the anchor ran on images although a cache was given")

    with monkeypatch.context() as patch:
        patch.setattr(Anchor, "encode_image", no_anchor_forward)
        cached_cfg = load_config(None, [*common, "run_name=cached", f"anchor.cache={cache}"])
        cached = train(cached_cfg, quiet=True)
    assert plain["steps"] == cached["steps"] == steps
    assert abs(plain["final_loss"] - cached["final_loss"]) < 1e-5
    a = load_file(str(tmp_path / "plain/model/model.safetensors"))
    b = load_file(str(tmp_path / "cached/model/model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5, msg=key)


def test_a_manifest_dataset_caches_and_trains_as_uncached(tmp_path, anchor_file, monkeypatch):
    root = audio_manifest(tmp_path / "data")
    common = manifest_overrides(tmp_path, root, anchor_file)
    out = tmp_path / "cache"
    report = cache_anchor.main(["--out", str(out), "--shard-size", "16", *common])
    assert report["complete"] and report["entries"] == 32  # one view per image file
    train_plain_and_cached(tmp_path, common, out, monkeypatch, steps=8)

    # An image edited after caching is a new view: its entry is refused, named by file.
    from PIL import Image

    Image.new("RGB", (32, 32), (255, 0, 0)).save(root / "frames/3.png")
    with pytest.raises(StaleCacheError, match=r"lacks 1 of the 32 views .*frames/3\.png@"):
        train(load_config(None, [*common, "run_name=stale", f"anchor.cache={out}"]), quiet=True)


def test_rgb_thermal_manifest_stats_cache_then_cached_training(tmp_path):
    """Visible/infrared pairs as a manifest (infrared-format 8-bit frames written from the real
    SUN RGB-D frames' depth at another resolution): compute_stats, cache_anchor with K fixed
    aligned views, then align_thermal on the cache, as README documents."""
    import csv

    import numpy as np
    from conftest import TEST_DATA
    from PIL import Image

    from imagebind_lite.data import depth
    from imagebind_lite.data.adapters import read_layout

    root = tmp_path / "pairs"
    (root / "visible").mkdir(parents=True)
    (root / "ir").mkdir()
    rows = []
    records, _ = read_layout("sunrgbd", TEST_DATA / "sunrgbd_toy")
    for i in range(12):
        record = records[i % 2]
        rgb = Image.open(record.paths["vision"]).convert("RGB")
        w, h = rgb.size
        box = (i * 9, i * 5, i * 9 + w // 2, i * 5 + h // 2)  # 12 distinct aligned crops
        metres = depth.read_depth(record.paths["depth"])[0].numpy()
        gray = (255 * (metres - metres.min()) / (np.ptp(metres) + 1e-9)).astype(np.uint8)
        ir = Image.fromarray(gray).resize((w, h)).crop(box).resize((w // 3, h // 3))
        rgb.crop(box).save(root / f"visible/{i}.jpg")
        ir.save(root / f"ir/{i}.png")
        rows.append({"id": f"p{i}", "vision": f"visible/{i}.jpg", "thermal": f"ir/{i}.png"})
    with open(root / "train.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "vision", "thermal"])
        writer.writeheader()
        writer.writerows(rows)
    data = [
        "data.dataset=manifest",
        f"data.root={root}",
        "data.options={manifest: train.csv, eval_split: null}",
        "data.preprocess={image_size: 32}",
    ]
    commands = [
        ["train/compute_stats.py", "--modality", "thermal", "--manifest", "train.csv"]
        + ["--root", str(root)],
        ["train/cache_anchor.py", "--config", "thermal", "--out", str(tmp_path / "cache")]
        + ["--views", "2", *data],
        ["train/align_thermal.py", *data]
        + [f"anchor.cache={tmp_path / 'cache'}", f"output_dir={tmp_path / 'runs'}", "tracker=null"]
        + ["optim.max_steps=2", "data.batch_size=4", "encoder.overrides={depth: 1}"],
    ]
    for command in commands:
        proc = run_script([str(REPO / command[0]), *command[1:]], cwd=os.getcwd(), timeout=300)
        assert proc.returncode == 0, (command[0], proc.stderr[-2000:])
    assert json.loads((root / "stats.json").read_text())["thermal"]["files"] == 12
    summary = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert summary["steps"] == 2 and summary["final_loss"] == summary["final_loss"]  # not NaN
    manifest = json.loads((tmp_path / "cache" / MANIFEST).read_text())
    assert manifest["complete"] and manifest["views"] == 2


# ----------------------------------------------------------------------------- tar shards

SHARD_PREPROCESS = (
    "data.preprocess={num_clips: 1, clip_duration: 1.12, num_mel_bins: 64, target_length: 112}"
)


@pytest.fixture(scope="module")
def audio_shards(tmp_path_factory):
    """The audio manifest's 24 pairs as 3 tar shards of 8 (files left behind: shards only)."""
    pytest.importorskip("webdataset")
    from imagebind_lite.data.manifest import read_manifest
    from imagebind_lite.data.shards import write_shards

    base = tmp_path_factory.mktemp("shards")
    root = audio_manifest(base / "data", n=24)
    records, _ = read_manifest(root / "pairs.csv", root)
    write_shards(records, root, base / "shards", shard_size=8)
    return base / "shards"


def shard_overrides(tmp_path, shards, anchor_file, access, *extra):
    return tiny_overrides(
        tmp_path,
        "modality=audio",
        "data.dataset=shards",
        f"data.root={shards}",
        f"data.options={{access: {access}, shuffle_buffer: 8}}",
        SHARD_PREPROCESS,
        f"anchor.pretrained={anchor_file}",
        "data.batch_size=8",
        "optim.epochs=2",
        *extra,
    )


@pytest.mark.parametrize("access", ["random", "stream"])
def test_a_shards_dataset_caches_and_trains_as_uncached(
    tmp_path, audio_shards, anchor_file, monkeypatch, access
):
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(audio_shards, shards)
    common = shard_overrides(tmp_path, shards, anchor_file, access)
    out = tmp_path / "cache"
    report = cache_anchor.main(["--out", str(out), "--shard-size", "16", *common])
    assert report["complete"] and report["entries"] == 24  # one view per sample
    ids = AnchorCache.open(out).ids
    assert ids[0].startswith("shard-000000.tar@") and ids[0].endswith("/000000000")
    train_plain_and_cached(tmp_path, common, out, monkeypatch, steps=6)

    # A shard rewritten after caching (here with the same bytes: a new mtime) holds new
    # views: its 8 entries are refused, in one line naming the shard; the others still match.
    tar = shards / "shard-000001.tar"
    tar.write_bytes(tar.read_bytes())
    with pytest.raises(StaleCacheError, match=r"lacks 8 of the 24 views .*shard-000001\.tar@"):
        train(load_config(None, [*common, "run_name=stale", f"anchor.cache={out}"]), quiet=True)


def test_two_processes_cache_a_shard_stream(tmp_path, audio_shards, anchor_file):
    """Round-robin over processes on a streamed shards config: the ids are enumerated from
    shards.json (the same for random access and streams), so each rank embeds its own runs."""
    stream = shard_overrides(tmp_path, audio_shards, anchor_file, "stream")
    random_access = shard_overrides(tmp_path, audio_shards, anchor_file, "random")
    single = tmp_path / "single"
    cache_anchor.main(["--out", str(single), "--shard-size", "8", *random_access])
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    cmd += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    cmd += ["--dynamo_backend", "no", "train/cache_anchor.py", "--out", str(out)]
    cmd += ["--shard-size", "8", *stream]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["complete"] and summary["entries"] == 24
    assert summary["computed_by_rank"] == {"0": [0, 2], "1": [1]}
    two, one = AnchorCache.open(out), AnchorCache.open(single)
    assert two.ids == one.ids
    torch.testing.assert_close(two.embeddings, one.embeddings, rtol=0, atol=1e-6)
