"""Keeping the accelerator fed: log-mel features computed on the device in batches
(``features_on: device``), feature shards (``write_shards.py --features``) and bench/feed.py."""

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import FSDD, REPO, tiny_overrides
from PIL import Image

from imagebind_lite.config import load_config
from imagebind_lite.data import audio
from imagebind_lite.data import audio_device as ad
from imagebind_lite.data.datasets import get_dataset_builder
from imagebind_lite.data.shards import ShardDataset, read_index, sampler_for
from imagebind_lite.modalities import get_modality

pytest.importorskip("webdataset")
sys.path.insert(0, str(REPO / "train"))
sys.path.insert(0, str(REPO / "bench"))
import feed  # noqa: E402
import write_shards  # noqa: E402

FILES = sorted(FSDD.glob("*.flac"))[::250]  # 12 recordings: every digit, several speakers
RECIPE = {  # configs/audio.yaml's data.preprocess
    "num_clips": 1,
    "clip_duration": 1.12,
    "num_mel_bins": 32,
    "target_length": 112,
    "utterance_norm": True,
}
OPTIONS = [
    RECIPE,
    {},  # ImageBind's recipe: 3 clips of 2 s, 128 x 204
    {"compat": "imagebind"},
    {"num_clips": 2, "clip_duration": 0.6, "target_length": 40},  # cropped clips
    {"num_clips": 2, "clip_duration": 0.6, "target_length": 40, "utterance_norm": True},
]


@pytest.fixture(scope="module")
def anchor():
    from imagebind_lite.anchor import Anchor
    from imagebind_lite.config import AnchorConfig

    return Anchor(AnchorConfig(pretrained=None))


def packed(files, options, device="cpu"):
    return torch.stack([ad.pack_clips(*audio.read_audio(f), options) for f in files]).to(device)


@pytest.mark.parametrize(
    "options", OPTIONS, ids=lambda o: ",".join(map(str, o.values())) or "defaults"
)
def test_device_log_mel_equals_the_cpu_path_on_cpu_tensors(options):
    with pytest.warns(audio.AudioPaddingWarning) if options.get("compat") else _nothing():
        cpu = audio.load_and_transform_audio(FILES, **options)
    device = ad.log_mel_batch(packed(FILES, options), options)
    assert device.shape == cpu.shape
    assert (device - cpu).abs().max() <= 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("options", OPTIONS[:2], ids=["recipe", "defaults"])
def test_device_log_mel_equals_the_cpu_path_on_cuda(options):
    torch.backends.cuda.matmul.allow_tf32 = True  # the mel product is float64: unaffected
    cpu = audio.load_and_transform_audio(FILES, **options)
    device = ad.log_mel_batch(packed(FILES, options, "cuda"), options)
    assert (device.cpu() - cpu).abs().max() <= 1e-4


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_batched_masks_are_bands_within_bounds():
    feats = torch.ones(64, 1, 1, 20, 30)
    g = torch.Generator().manual_seed(0)
    out = ad.spec_augment_batch(feats, freq_mask=5, time_mask=7, generator=g)
    assert out.shape == feats.shape
    zero_bins = (out == 0).all(dim=-1).sum(dim=-1).flatten()
    zero_frames = (out == 0).all(dim=-2).sum(dim=-1).flatten()
    assert zero_bins.max() <= 5 and zero_frames.max() <= 7 and zero_bins.float().mean() > 1
    masked = (out == 0).flatten(1).sum(dim=1)  # the masks' union: a band of rows and one of columns
    assert torch.equal(masked, (zero_bins * 30 + zero_frames * 20 - zero_bins * zero_frames))
    again = ad.spec_augment_batch(feats, 5, 7, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert torch.equal(ad.spec_augment_batch(feats, 0, 0), feats)


def test_packed_clips_need_workers_to_stop_before_the_fbank():
    spec = get_modality("audio")
    wav, rate = audio.read_audio(FILES[0])
    clips = spec.load_source(FILES[0], {**spec.preprocess, **RECIPE, "features_on": "device"})
    assert clips.shape == (1, 1 + ad.clip_samples(RECIPE))
    assert clips[0, 0] == min(round(wav.shape[1] * 16000 / rate), ad.clip_samples(RECIPE))
    with pytest.raises(ValueError, match="features_on: expected one of"):
        ad.features_on({"features_on": "gpu"})


# ------------------------------------------------------------------------- feature shards


def write_pairs(root, files=FILES, manifest="pairs.csv"):
    """A manifest of FSDD clips, each with a small image, under ``root``."""
    (root / "audio").mkdir(parents=True)
    (root / "vision").mkdir()
    lines = ["id,audio,vision,label,split"]
    for i, path in enumerate(files):
        shutil.copyfile(path, root / "audio" / path.name)
        Image.fromarray(np.full((16, 16, 3), 20 * i, np.uint8)).save(root / f"vision/{i}.png")
        lines.append(f"{path.stem},audio/{path.name},vision/{i}.png,{path.stem[0]},train")
    (root / manifest).write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def feature_shards(tmp_path_factory):
    base = tmp_path_factory.mktemp("feats")
    root = write_pairs(base / "data")
    raw, feats = base / "raw", base / "feats"
    common = ["--manifest", "pairs.csv", "--root", str(root), "--shard-size", "5"]
    write_shards.main([*common, "--out", str(raw)])
    argv = [*common, "--out", str(feats), "--features", "audio", "--config", "configs/audio.yaml"]
    write_shards.main(argv)
    return root, raw, feats


def audio_config(tmp_path, shards, *extra):
    return load_config(
        None,
        tiny_overrides(
            tmp_path / "runs",
            "modality=audio",
            "encoder.size=tiny",
            "data.dataset=shards",
            f"data.root={shards}",
            "data.batch_size=4",
            "optim.max_steps=2",
            "data.preprocess={num_clips: 1, clip_duration: 1.12, num_mel_bins: 32, "
            "target_length: 112, utterance_norm: true, freq_mask: 4, time_mask: 10}",
            *extra,
        ),
    )


def test_feature_shards_hold_the_cpu_features_in_fp16(feature_shards, anchor):
    _, _, feats = feature_shards
    index = read_index(feats)
    spec = get_modality("audio")
    options = {**spec.preprocess, **RECIPE, "freq_mask": 4, "time_mask": 10}
    assert index["features"]["key"] == "audio" and index["features"]["dtype"] == "float16"
    assert index["features"]["preprocess"] == spec.feature_options(options)
    sampler = sampler_for(index, spec, options, anchor, feats)
    samples = ShardDataset(feats, sampler, False)
    expected = audio.load_and_transform_audio(FILES, **RECIPE)
    for i in range(len(FILES)):
        got = samples[i]["audio"]
        assert got.dtype == torch.float32
        want = expected[i].half().float()  # fp16 rounding, nothing else
        assert torch.equal(got, want)
        assert (got - expected[i]).abs().max() <= 1e-3 * expected[i].abs().max()
    masked = ShardDataset(feats, sampler, True)[0]["audio"]
    assert (masked == 0).any() and masked.shape == expected[0].shape


def test_feature_shards_refuse_other_preprocessing(feature_shards, tmp_path, anchor):
    _, raw, feats = feature_shards
    spec = get_modality("audio")
    cfg = audio_config(tmp_path, feats, "data.preprocess.num_mel_bins=64")
    with pytest.raises(ValueError, match="other data.preprocess: num_mel_bins=64") as err:
        get_dataset_builder("shards")(cfg, anchor, spec)
    assert "\n" not in str(err.value)
    cfg = audio_config(tmp_path, feats, "data.preprocess.features_on=device")
    with pytest.raises(ValueError, match="drop data.preprocess.features_on"):
        get_dataset_builder("shards")(cfg, anchor, spec)
    # Masking is applied at training time: another mask size is fine.
    cfg = audio_config(tmp_path, feats, "data.preprocess.freq_mask=8")
    assert len(get_dataset_builder("shards")(cfg, anchor, spec).train) == len(FILES)


def test_training_runs_on_feature_shards_and_on_device_features(feature_shards, tmp_path):
    from imagebind_lite.train import train

    _, raw, feats = feature_shards
    for name, shards, extra in (
        ("feats", feats, []),
        ("device", raw, ["data.preprocess.features_on=device"]),
    ):
        cfg = audio_config(tmp_path / name, shards, f"data.options.eval_shards={feats}", *extra)
        metrics = train(cfg, quiet=True)
        assert metrics["steps"] == 2 and metrics["skipped_total"] == 0
        saved = json.loads((tmp_path / name / "runs/audio-shards/model/config.json").read_text())
        assert "features_on" not in saved["preprocess"]  # the model's input is the same
        assert metrics["num_eval"] == len(FILES) and np.isfinite(metrics["final_loss"])


def test_in_memory_avmnist_refuses_device_features(tmp_path, anchor):
    cfg = load_config(
        None,
        tiny_overrides(tmp_path, "modality=audio", "data.preprocess.features_on=device"),
    )
    with pytest.raises(ValueError, match="avmnist: data.preprocess.features_on must be worker"):
        get_dataset_builder("avmnist")(cfg, anchor, get_modality("audio"))


# ------------------------------------------------------------------------- bench/feed.py


@pytest.mark.parametrize("how", ["device", "features"])  # worker: tests/test_documented_commands
def test_feed_bench_reports_its_figures(how, capsys):
    argv = "--encoder-size tiny --steps 1 --warmup 0 --batch 2 --clips 4 --workers 0"
    argv += f" --feed {how} --preprocess num_clips=1 --preprocess target_length=40"
    result = feed.main(argv.split())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    for key in ("fed_samples_per_second", "ceiling_samples_per_second", "fed_ratio"):
        assert isinstance(result[key], float) and result[key] > 0
    assert result["workers"] == 0 and result["device"] == "cpu" and result["feed"] == how
    assert (result["batch"], result["steps"], result["encoder"]) == (2, 1, "tiny")
    assert result["input_shape"] == [1, 1, 128, 40]
    assert isinstance(result["feeding_cpu_ms_per_sample"], float)
    assert result["pipeline"]["worker_cpu_ms_per_sample"] > 0
    device_ms = result["pipeline"]["device_features_ms_per_sample"]
    assert (device_ms > 0) if how == "device" else device_ms is None
    assert result["command"].startswith("python bench/feed.py")


def test_feed_bench_refuses_bad_input_in_one_line(tmp_path, feature_shards):
    from imagebind_lite.cli import one_line_errors  # what run_script runs main under

    def error(*argv):
        with pytest.raises(SystemExit) as exit_, one_line_errors():
            feed.main(list(argv))
        assert "\n" not in str(exit_.value.code)
        return str(exit_.value.code)

    assert "absent: no such folder" in error("--shards", str(tmp_path / "absent"))
    assert "holds feature shards" in error("--shards", str(feature_shards[2]), "--feed", "device")
    assert "--steps" in error("--steps", "0")
