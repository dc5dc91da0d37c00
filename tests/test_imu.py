"""IMU, the worked example of a one-file modality: reader, windows, augmentation, training."""

import csv
import json

import numpy as np
import pytest
import torch
from conftest import tiny_overrides
from PIL import Image

from imagebind_lite.config import load_config
from imagebind_lite.modalities import build_encoder, get_modality
from imagebind_lite.modalities.imu import IMUReadError, augment, load, time_shift
from imagebind_lite.train import train

SPEC = get_modality("imu")
OPTIONS = SPEC.preprocess


def recording(steps: int, seed: int = 0) -> np.ndarray:
    """[6, steps]: a gravity offset on accelerometer z, slow oscillations, noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps) / 200.0
    x = 0.3 * np.sin(2 * np.pi * rng.uniform(0.5, 3, (6, 1)) * t)
    x += 0.05 * rng.normal(size=(6, steps))
    x[2] += 9.81
    return x.astype(np.float32)


def write_csv(path, rows, header=None):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return path


def test_npy_both_layouts_and_csv_read_the_same_window(tmp_path):
    x = recording(2000)
    np.save(tmp_path / "cf.npy", x)
    np.save(tmp_path / "cl.npy", x.T.copy())
    write_csv(tmp_path / "plain.csv", x.T.tolist())
    write_csv(tmp_path / "header.csv", x.T.tolist(), ["ax", "ay", "az", "gx", "gy", "gz"])
    ref = torch.from_numpy(x)
    for name in ("cf.npy", "cl.npy", "plain.csv", "header.csv"):
        window = SPEC.load(tmp_path / name, **OPTIONS)
        assert window.shape == (6, 2000) and window.dtype == torch.float32
        torch.testing.assert_close(window, ref, msg=name)

    # Eight columns with a timestamp: pick six by header name.
    header = ["t", "ax", "ay", "az", "gx", "gy", "gz", "temp"]
    rows = [[i / 200, *row, 21.0] for i, row in enumerate(x.T.tolist())]
    write_csv(tmp_path / "wide.csv", rows, header)
    picked = load(tmp_path / "wide.csv", **{**OPTIONS, "columns": header[1:7]})
    torch.testing.assert_close(picked, ref)


def test_crop_pad_resample_and_normalise_to_2000_steps(tmp_path):
    long, short = recording(2600, 1), recording(500, 2)
    np.save(tmp_path / "long.npy", long)
    np.save(tmp_path / "short.npy", short)
    window = load(tmp_path / "long.npy", **OPTIONS)
    torch.testing.assert_close(window, torch.from_numpy(long[:, 300:2300]))  # the centre

    zero = load(tmp_path / "short.npy", **OPTIONS)
    assert zero.shape == (6, 2000)
    torch.testing.assert_close(zero[:, :500], torch.from_numpy(short))
    assert zero[:, 500:].abs().max() == 0
    edge = load(tmp_path / "short.npy", **{**OPTIONS, "pad": "edge"})
    assert torch.equal(edge[:, 1999], torch.from_numpy(short[:, -1]))

    stretched = load(tmp_path / "short.npy", **{**OPTIONS, "fit": "resample"})
    assert stretched.shape == (6, 2000)
    assert torch.equal(stretched[:, 0], zero[:, 0]) and torch.equal(stretched[:, -1], edge[:, -1])
    # A 100 Hz file of 10 s becomes 2000 steps at 200 Hz.
    np.save(tmp_path / "slow.npy", recording(1000, 3))
    slow = load(tmp_path / "slow.npy", **{**OPTIONS, "input_rate": 100})
    assert slow.shape == (6, 2000) and slow[:, -1].abs().min() > 0  # no padding needed

    unit = load(tmp_path / "short.npy", **{**OPTIONS, "normalize": "channel"})
    torch.testing.assert_close(unit[:, :500].mean(-1), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(unit[:, :500].std(-1, correction=0), torch.ones(6))
    assert unit[:, 500:].abs().max() == 0  # padding sits at the channel mean
    stats = {"normalize": "stats", "mean": [0, 0, 9.81, 0, 0, 0], "std": [2.0] * 6}
    torch.testing.assert_close(
        load(tmp_path / "long.npy", **{**OPTIONS, **stats}),
        (window - torch.tensor(stats["mean"]).view(6, 1)) / 2,
    )


@pytest.mark.parametrize(
    "name, make, match",
    [
        ("missing.npy", None, "file not found"),
        ("data.mat", lambda p: p.write_bytes(b"x"), "unsupported IMU file type '.mat'"),
        ("three.npy", lambda p: np.save(p, np.zeros((2, 6, 10))), "expected a 2-D array"),
        ("five.npy", lambda p: np.save(p, np.zeros((5, 100))), "neither axis .* has the 6"),
        ("nan.npy", lambda p: np.save(p, np.full((6, 10), np.nan)), "NaN or infinite"),
        ("empty.npy", lambda p: np.save(p, np.zeros((6, 0))), "contains no samples"),
        ("broken.npy", lambda p: p.write_bytes(b"\x93NUMPY garbage"), "cannot be read as .npy"),
        ("cols.csv", lambda p: write_csv(p, [[1, 2, 3, 4, 5]] * 3), "6 columns .* found 5"),
        (
            "cell.csv",
            lambda p: write_csv(p, [[1] * 6, [1, 2, "x", 4, 5, 6]]),
            r"cell.csv:2: column 3 holds 'x'",
        ),
        ("head.csv", lambda p: write_csv(p, [], ["a"] * 6), "header but no samples"),
    ],
)
def test_reader_errors_name_the_file(tmp_path, name, make, match):
    path = tmp_path / name
    if make is not None:
        make(path)
    with pytest.raises(IMUReadError, match=match) as err:
        load(path, **OPTIONS)
    assert str(path) in str(err.value)


def test_stem_cuts_250_windows_of_eight_steps():
    for size in ("tiny", "imagebind"):
        enc = build_encoder("imu", 32, size, overrides={"depth": 1}).eval()
        assert enc.stem.num_tokens == 250 and enc.pos_embed.shape[1] == 251
    x = torch.randn(2, 6, 2000)
    tokens = enc.stem(x)
    assert tokens.shape == (2, 250, 512)
    # Window 0 is steps 0-7 of all six channels, and nothing else.
    y = x.clone()
    y[:, :, 8:] = 0
    torch.testing.assert_close(enc.stem(y)[:, 0], tokens[:, 0])
    y[:, 5, 7] += 1
    assert not torch.allclose(enc.stem(y)[:, 0], tokens[:, 0])
    assert enc(x).shape == (2, 32)
    with pytest.raises(ValueError, match=r"expected input of shape \[B, 6, 2000\]"):
        enc(torch.randn(2, 2000, 6))


def test_augmentation_is_a_function_of_the_generator():
    x = torch.from_numpy(recording(2000))

    def run(seed):
        return augment(x, True, generator=torch.Generator().manual_seed(seed), **OPTIONS)

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    assert augment(x, False, generator=torch.Generator(), **OPTIONS) is x
    plain = {**OPTIONS, "scale": 0.0, "jitter": 0.0, "max_shift": 0}
    assert torch.equal(augment(x, True, generator=torch.Generator(), **plain), x)
    scaled = augment(x, True, generator=torch.Generator().manual_seed(0), **{**plain, "scale": 0.2})
    ratio = scaled / x
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio))  # one factor per channel
    assert ((ratio[:, 0] >= 0.8) & (ratio[:, 0] <= 1.2)).all()
    ramp = torch.arange(10.0).expand(6, 10)
    assert time_shift(ramp, 3)[0].tolist() == [0, 0, 0, 0, 1, 2, 3, 4, 5, 6]
    assert time_shift(ramp, -3)[0].tolist() == [3, 4, 5, 6, 7, 8, 9, 9, 9, 9]


def write_imu_pairs(root, n: int) -> None:
    """n (PNG, .npy) pairs in a manifest with a split: a moving object, its IMU recording."""
    rows = []
    for i in range(n):
        Image.fromarray(np.full((16, 16, 3), 20 * (i % 10), dtype=np.uint8)).save(root / f"{i}.png")
        np.save(root / f"{i}.npy", recording(1800 + i, i))
        rows.append(
            {
                "vision": f"{i}.png",
                "imu": f"{i}.npy",
                "label": ["still", "moving"][i % 2],
                "split": "test" if i >= n - 8 else "train",
            }
        )
    with (root / "pairs.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_imu_trains_from_a_manifest_and_reloads(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_imu_pairs(data, 40)
    cfg = load_config(
        None,
        tiny_overrides(
            tmp_path,
            "modality=imu",
            "data.dataset=manifest",
            f"data.root={data}",
            "data.options.manifest=pairs.csv",
            "data.batch_size=16",
            "optim.max_steps=2",
            "data.preprocess={normalize: channel}",
        ),
    )
    metrics = train(cfg, quiet=True)
    saved = json.loads((tmp_path / "imu-manifest" / "metrics.json").read_text())
    assert saved["steps"] == 2 and saved["num_eval"] == 8 and saved["num_classes"] == 2
    assert metrics["skipped_total"] == 0

    from imagebind_lite.checkpoint import load_run

    encoder, _, config = load_run(tmp_path / "imu-manifest")
    assert config["preprocess"]["normalize"] == "channel"  # saved with the model
    window = load(data / "0.npy", **config["preprocess"])
    assert encoder(window[None]).shape == (1, 64)
