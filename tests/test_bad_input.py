"""The bad-input policy: skip (deterministic replacement, counts by reason, bounded logging, give
up on broken data) or raise (naming the file), and the reasons real files produce."""

import logging
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from torch.utils.data import Dataset

from imagebind_lite.config import load_config
from imagebind_lite.data.bad_input import BadInputDataset, BadInputError, Blob
from imagebind_lite.data.datasets import BadSample, collate
from imagebind_lite.data.manifest import PairSampler, read_waveform
from imagebind_lite.modalities import get_modality


class Toy(Dataset):
    """Index i is bad with ``bad[i]`` as its reason; ``nan`` indices return a NaN tensor."""

    def __init__(self, n, bad=None, nan=()):
        self.n, self.bad, self.nan = n, bad or {}, set(nan)
        self.reads = []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.reads.append(i)
        if i in self.bad:
            raise BadSample(self.bad[i], f"file_{i}.png: broken ({self.bad[i]})")
        x = torch.full((2,), float("nan") if i in self.nan else float(i))
        return {"x": x, "label": i, "id": f"s{i}"}


def test_skip_replaces_deterministically_and_counts_reasons():
    bad = {1: "unreadable", 2: "missing", 5: "silent"}
    data = BadInputDataset(Toy(10, bad, nan=[7]), "skip", seed=3)
    for i in (1, 2, 5, 7):
        sample = data[i]
        assert sample["id"] not in ("s1", "s2", "s5", "s7")
        assert sum(sample["skipped"].values()) >= 1
    assert data[7]["skipped"].get("nan", 0) >= 1
    assert "skipped" not in data[0]
    # The same replacement on every read, in a fresh copy, and after a resume (same epoch).
    first = [data[i]["id"] for i in range(10)]
    again = BadInputDataset(Toy(10, bad, nan=[7]), "skip", seed=3)
    assert [again[i]["id"] for i in range(10)] == first
    # Other epochs may replace differently, still deterministically.
    again.set_epoch(1)
    epoch1 = [again[i]["id"] for i in range(10)]
    again.set_epoch(1)
    assert [again[i]["id"] for i in range(10)] == epoch1
    # Known-bad indices are not decoded again.
    toy = Toy(10, bad)
    data = BadInputDataset(toy, "skip")
    data[1], data[1]
    assert toy.reads.count(1) == 1
    # The batch sums the counts of its samples.
    samples = [BadInputDataset(Toy(10, bad), "skip")[i] for i in (1, 2, 3)]
    expected = Counter()
    for sample in samples:
        expected.update(sample.get("skipped", {}))
    assert collate(samples)["skipped"] == dict(expected)
    assert expected["unreadable"] >= 1 and expected["missing"] >= 1


def test_raise_names_file_and_reason():
    data = BadInputDataset(Toy(4, {2: "wrong_shape"}), "raise")
    assert data[1]["id"] == "s1"
    with pytest.raises(BadInputError, match=r"\[wrong_shape\] file_2\.png: broken") as info:
        data[2]
    assert info.value.reason == "wrong_shape"
    with pytest.raises(BadInputError, match="nan"):
        BadInputDataset(Toy(4, nan=[0]), "raise")[0]
    with pytest.raises(ValueError, match="policy"):
        BadInputDataset(Toy(4), "ignore")


def test_gives_up_on_a_broken_dataset_and_logs_a_bounded_number(caplog):
    broken = {i: "unreadable" for i in range(500)}
    data = BadInputDataset(Toy(500, broken), "skip", max_consecutive=50, max_logs=5)
    with caplog.at_level(logging.WARNING, logger="imagebind_lite.data"):
        with pytest.raises(BadInputError, match="gave up after 51 bad samples in a row"):
            data[0]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 5 and "file_" in messages[0] and "not logged" in messages[-1]
    # A dataset smaller than the limit gives up once every index was tried.
    with pytest.raises(BadInputError, match="gave up after 3"):
        BadInputDataset(Toy(3, {0: "empty", 1: "empty", 2: "empty"}), "skip")[0]

    # Bugs are not bad input: they propagate unchanged.
    class Buggy(Toy):
        def __getitem__(self, i):
            raise KeyError("bug")

    with pytest.raises(KeyError):
        BadInputDataset(Buggy(3), "skip")[0]


# --------------------------------------------------------------------------------------------
# Reasons from real files


def reason(fn, *args):
    with pytest.raises(BadSample) as info:
        fn(*args)
    return info.value.reason, str(info.value)


def test_audio_reasons(tmp_path):
    tone = (0.3 * np.sin(np.arange(16000) / 5)).astype(np.float32)
    sf.write(tmp_path / "ok.flac", tone, 16000)
    sf.write(tmp_path / "silent.wav", np.zeros(16000, np.float32), 16000)
    sf.write(tmp_path / "nan.wav", np.full(100, np.nan, np.float32), 16000, subtype="FLOAT")
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "truncated.flac").write_bytes((tmp_path / "ok.flac").read_bytes()[:60])
    assert read_waveform(tmp_path / "ok.flac")[1] == 16000
    assert reason(read_waveform, tmp_path / "empty.wav")[0] == "empty"
    assert reason(read_waveform, tmp_path / "absent.wav")[0] == "missing"
    assert reason(read_waveform, tmp_path / "nan.wav")[0] == "nan"
    assert reason(read_waveform, tmp_path / "truncated.flac")[0] == "unreadable"
    # Blobs (shard members) are judged the same way.
    blob = Blob("x.nan.wav", (tmp_path / "nan.wav").read_bytes())
    assert reason(read_waveform, blob)[0] == "nan"
    # Silence is detected when a pair is loaded (the reader itself accepts it).
    cfg = load_config(None, ["modality=audio", "anchor.pretrained=null"])
    from imagebind_lite.anchor import Anchor

    spec = get_modality("audio")
    sampler = PairSampler(spec, spec.preprocess, Anchor(cfg.anchor))
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "frame.jpg")
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(tmp_path / "dot.png")
    sources = {"vision": tmp_path / "frame.jpg", "audio": tmp_path / "silent.wav"}
    assert reason(sampler, sources, {}, False, None)[0] == "silent"
    sources["audio"] = tmp_path / "ok.flac"
    assert sampler(sources, {}, False, None)["audio"].shape == (3, 1, 128, 204)
    sources["vision"] = tmp_path / "dot.png"
    got, message = reason(sampler, sources, {}, False, None)
    assert got == "wrong_shape" and "1x1" in message and "dot.png" in message
