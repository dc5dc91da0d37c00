"""Pen trajectories: the UNIPEN reader on the shipped pendigits files, the [5, 64] features, the
augmentation, the stem, the writer split, and a short real training run."""

import gzip
import io
import json

import numpy as np
import pytest
import torch
from conftest import REPO, tiny_overrides

from imagebind_lite.anchor import ASSETS, Anchor
from imagebind_lite.cache import require_cacheable
from imagebind_lite.config import load_config
from imagebind_lite.data.datasets import get_dataset_builder
from imagebind_lite.data.pendigits import UnipenError, load_pendigits, read_unipen
from imagebind_lite.modalities import build_encoder, get_modality
from imagebind_lite.modalities.pen import augment, load, to_tensor
from imagebind_lite.train import train

ROOT = ASSETS / "pendigits"
TRA, TES = ROOT / "pendigits-orig.tra.gz", ROOT / "pendigits-orig.tes.gz"
SPEC = get_modality("pen")
OPTIONS = SPEC.preprocess
SEGMENT = '.SEGMENT DIGIT 0 ? "4"\n.COMMENT 4 1 1\n'  # a four, writer 1, sample 1
HEADER = '.INCLUDE        dene.doc\n\n.LEXICON "0" "1" "2" "3" "4" "5" "6" "7" "8" "9"\n'


@pytest.fixture(scope="module")
def tra():
    return read_unipen(TRA)


def raw_lines(path=TRA):
    with gzip.open(path, "rt") as handle:
        return handle.read().splitlines(keepends=True)


def test_reader_counts_writers_and_a_digit_checked_by_hand(tra):
    tes = read_unipen(TES)
    assert (len(tra), len(tes)) == (7494, 3498)
    assert len({d.writer for d in tra}) == 30 and len({d.writer for d in tes}) == 14
    assert {d.writer for d in tes} == set(range(1, 15))  # .tes numbers its writers from 1
    train_digits, test_digits = load_pendigits(ROOT)  # 44 distinct writers
    assert {d.writer for d in test_digits} == set(range(31, 45))
    assert {d.writer for d in train_digits} == set(range(1, 31))
    # zcat pendigits-orig.tra.gz | head: .SEGMENT DIGIT 0 ? "8" / .COMMENT 8 12 224 / .PEN_DOWN
    # 267 333 / 267 336 / 267 339 ... one stroke of 86 points.
    first = tra[0]
    assert (first.label, first.writer, first.index) == (8, 12, 224)
    assert len(first.strokes) == 1 and first.strokes[0].dtype == np.int32
    assert first.strokes[0][:3].tolist() == [[267, 333], [267, 336], [267, 339]]
    assert first.strokes[0][-1].tolist() == [259, 330]
    # .SEGMENT DIGIT 9427-9428 ? "4" / .COMMENT 4 27 61: two strokes.
    four = next(d for d in tra if (d.writer, d.index) == (27, 61))
    assert four.label == 4 and len(four.strokes) == 2 and four.strokes[0][0].tolist() == [244, 336]
    assert (tes[0].label, tes[0].writer, tes[0].index) == (8, 6, 138)
    assert tes[0].strokes[0][0].tolist() == [273, 323]
    # Every digit of each file; plain text and open files read the same.
    text = "".join(raw_lines(TES))
    from_text = read_unipen(io.StringIO(text))
    assert len(from_text) == 3498
    assert from_text[-1].strokes[-1].tolist() == tes[-1].strokes[-1].tolist()


def write(path, text):
    path.write_text(text)
    return path


def truncated(lines, stop):
    return HEADER + "".join(lines[5:stop])


@pytest.mark.parametrize(
    "name, make, match",
    [
        ("notes.txt", lambda p: write(p, "shopping list\neggs\n"), "not a UNIPEN keyword line"),
        ("table.csv", lambda p: write(p, "x,y\n1,2\n"), "not a UNIPEN keyword line"),
        ("empty.txt", lambda p: write(p, ""), "empty file"),
        ("blank.txt", lambda p: write(p, "\n\n  \n"), "empty file"),
        ("header.txt", lambda p: write(p, HEADER), "no .SEGMENT DIGIT"),
        ("binary.dat", lambda p: p.write_bytes(b"\x00\xff\xfe garbage"), "not ASCII"),
        ("missing.txt", None, "file not found"),
        # Cut inside the first stroke (line 30 of the real file).
        ("cut.txt", lambda p: write(p, truncated(raw_lines(), 30)), "ends inside a stroke"),
        ("cut.gz", lambda p: p.write_bytes(TRA.read_bytes()[:5000]), "damaged gzip"),
        (
            "one-of-two.txt",
            lambda p: write(p, SEGMENT.replace(" 0 ", " 0-1 ") + ".PEN_DOWN\n1 2\n.PEN_UP\n"),
            "names 2 strokes, 1 follow: truncated",
        ),
        (
            "point.txt",
            lambda p: write(p, SEGMENT + ".PEN_DOWN\n1 2\n3 x\n.PEN_UP\n"),
            r"point.txt:5: expected a point 'x y'",
        ),
        (
            "nocomment.txt",
            lambda p: write(p, '.SEGMENT DIGIT 0 ? "4"\n.PEN_DOWN\n1 2\n.PEN_UP\n'),
            "no .COMMENT",
        ),
    ],
)
def test_files_that_are_not_unipen_are_refused_in_one_line(tmp_path, name, make, match):
    path = tmp_path / name
    if make is not None:
        make(path)
    with pytest.raises(UnipenError, match=match) as err:
        read_unipen(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_features_of_a_real_digit_match_hand_computed_values(tra):
    # .COMMENT 1 1 53: one stroke, x 371 367 361 356 352 348 344 341 339,
    # y 324 326 323 312 297 277 255 220 195. Mean (3179/9, 281); largest |centred| = 86 (y).
    one = next(d for d in tra if (d.writer, d.index) == (1, 53))
    assert one.label == 1 and one.points == 9
    # 5 steps over 9 points in time: exactly points 0, 2, 4, 6, 8.
    feats = to_tensor(one.strokes, length=5).double()
    expected = torch.tensor(
        [
            [160, 70, -11, -83, -128],  # x: (9 x - 3179) / (9 * 86)
            [43 * 9, 42 * 9, 16 * 9, -26 * 9, -86 * 9],  # y: (y - 281) / 86
            [0, -900, -810, -720, -450],  # 10 x the steps of x
            [0, -9 * 10, -26 * 90, -42 * 90, -60 * 90],  # 10 x the steps of y
        ],
        dtype=torch.float64,
    ) / (9 * 86)
    torch.testing.assert_close(feats[:4], expected, rtol=0, atol=1e-6)
    assert feats[4].tolist() == [0] * 5
    # The default 64 steps start and end on the first and last points.
    full = to_tensor(one.strokes, **OPTIONS)
    assert full.shape == (5, 64) and full.dtype == torch.float32
    assert full[:2, 0].tolist() == pytest.approx([160 / 774, 0.5]) and full[1, -1] == -1
    assert full[:2].abs().max() == 1


def test_pen_lift_flag_marks_the_second_stroke(tra):
    # .COMMENT 7 28 62: strokes of 13 and 6 points; 19 steps keep every point.
    seven = next(d for d in tra if (d.writer, d.index) == (28, 62))
    assert [len(s) for s in seven.strokes] == [13, 6]
    feats = to_tensor(seven.strokes, length=19)
    assert torch.nonzero(feats[4]).flatten().tolist() == [13]
    # The delta into step 13 is the pen's jump in the air, from (220, 158) to (206, 196).
    ratio = feats[3, 13] / feats[2, 13]
    assert ratio.item() == pytest.approx((196 - 158) / (206 - 220), rel=1e-5)
    assert torch.nonzero(to_tensor(seven.strokes, length=37)[4]).flatten().tolist() == [26]
    arc = to_tensor(seven.strokes, length=64, resample="arc")
    assert arc.shape == (5, 64) and arc[4].sum() == 1


def test_load_reads_a_one_digit_file(tmp_path, tra):
    lines = raw_lines()
    starts = [i for i, line in enumerate(lines) if line.startswith(".SEGMENT")]
    one = write(tmp_path / "eight.txt", "".join(lines[: starts[1]]))
    torch.testing.assert_close(load(one, **OPTIONS), to_tensor(tra[0].strokes, **OPTIONS))
    two = write(tmp_path / "two.txt", "".join(lines[: starts[2]]))
    with pytest.raises(UnipenError, match="holds 2 digits"):
        load(two, **OPTIONS)


def test_augmentation_is_a_function_of_the_generator(tra):
    x = to_tensor(tra[0].strokes, **OPTIONS)
    opts = {**OPTIONS, "scale": 0.2, "rotate": 15, "shear": 0.2}

    def run(seed, **extra):
        return augment(x, True, generator=torch.Generator().manual_seed(seed), **{**opts, **extra})

    assert torch.equal(run(3), run(3)) and not torch.equal(run(3), run(4))
    assert augment(x, False, generator=torch.Generator(), **opts) is x
    # Without noise the deltas stay the deltas of the mapped path, and the pen flag is kept.
    mapped = run(5, noise=0.0)
    torch.testing.assert_close(mapped[2:4, 1:], 10 * mapped[0:2].diff(dim=-1), atol=1e-5, rtol=0)
    assert torch.equal(mapped[4], x[4]) and not torch.allclose(mapped[:2], x[:2])


def test_stem_turns_64_steps_into_16_tokens():
    for size in ("tiny", "base"):
        enc = build_encoder("pen", 32, size, overrides={"depth": 1}).eval()
        assert enc.stem.num_tokens == 16 and enc.pos_embed.shape[1] == 17
        assert enc(torch.randn(3, 5, 64)).shape == (3, 32)
    window = build_encoder("pen", 32, "tiny", overrides={"depth": 1, "window": 4})
    assert window.stem.num_tokens == 16  # IMU's linear window stem fits too
    with pytest.raises(ValueError, match=r"expected input of shape \[B, 5, 64\]"):
        enc(torch.randn(3, 64, 5))


@pytest.fixture(scope="module")
def bundle(one_thread):
    cfg = load_config(None, ["modality=pen", "data.dataset=pendigits", "anchor.pretrained=null"])
    anchor = Anchor(cfg.anchor)
    return anchor, get_dataset_builder("pendigits")(cfg, anchor, SPEC)


def test_split_holds_out_whole_writers_and_pairs_the_same_digit(bundle):
    anchor, bundle = bundle
    train_set, paired = bundle.train, bundle.train.dataset
    writers = [{i.split("-")[1] for i in ids} for ids in (paired.ids, bundle.eval.ids)]
    assert [len(w) for w in writers] == [30, 14] and not writers[0] & writers[1]
    assert bundle.info["train_digits"] == 7494 and bundle.info["test_digits"] == 3498
    assert bundle.classnames[3] == "three" and "{}" in bundle.templates[0]
    for index in (0, 1, 500, 7000):
        sample = train_set[index]
        assert sample["pen"].shape == (5, 64) and "vision" not in sample
        same_digit = train_set.embeddings[paired.by_digit[sample["label"]]]
        assert (same_digit == sample["anchor_embedding"]).all(-1).any()
    # The embeddings are the anchor's, image for image.
    views = paired.anchor_view_ids(1)
    pixels = torch.stack([paired.anchor_input(v) for v in views[:3]])
    torch.testing.assert_close(train_set.embeddings[:3], anchor.encode_image(pixels))
    # Pairing and augmentation are drawn per (seed, epoch, index): repeatable, new each epoch.
    first = train_set[9]
    assert torch.equal(first["pen"], train_set[9]["pen"])
    train_set.set_epoch(1)
    assert not torch.equal(first["pen"], train_set[9]["pen"])
    train_set.set_epoch(0)
    assert torch.equal(first["pen"], train_set[9]["pen"])
    # An on-disk anchor cache (train/cache_anchor.py, anchor.cache) can still take over.
    require_cacheable(train_set)
    train_set.use_anchor_views(1)
    assert "anchor_embedding" not in train_set[0] and train_set[0]["view_id"] in views
    train_set.use_anchor_views(None)
    assert "anchor_embedding" in train_set[0]
    # Evaluation digits are not augmented.
    tes = read_unipen(TES)
    torch.testing.assert_close(bundle.eval[5]["pen"], to_tensor(tes[5].strokes, **OPTIONS))
    assert bundle.eval[5]["id"] == f"pen-w{tes[5].writer + 30:02d}-{tes[5].index:03d}"


def test_only_pen_pairs_with_pendigits():
    cfg = load_config(None, ["data.dataset=pendigits"])
    with pytest.raises(ValueError, match="dataset pendigits pairs images with pen, not 'audio'"):
        get_dataset_builder("pendigits")(cfg, None, get_modality("audio"))


def test_a_short_run_learns_zero_shot_digits_from_the_anchor(tmp_path, one_thread):
    cfg = load_config(
        REPO / "configs" / "pen.yaml",
        tiny_overrides(
            tmp_path,
            "anchor.pretrained=imagebind_lite:tiny-clip-digits-scenes",  # the digit anchor
            "data.batch_size=64",
            "optim.max_steps=40",
            "optim.warmup_epochs=0.1",
            "log_every=1",
            "tracker=null",
        ),
    )
    metrics = train(cfg, quiet=True)
    saved = json.loads((tmp_path / "pen-pendigits" / "metrics.json").read_text())
    assert saved["steps"] == 40 and saved["num_eval"] == 3498 and saved["data_test_writers"] == 14
    # An encoder that knows nothing of the pairing scores at least log(batch) on average.
    assert metrics["final_loss"] < 0.8 * np.log(64)
    assert metrics["zero_shot_top1"] > 0.3  # chance is 0.1

    # The saved model reads a pen file with the preprocessing it was trained with.
    from imagebind_lite.checkpoint import load_run

    encoder, anchor, config = load_run(tmp_path / "pen-pendigits")
    assert config["preprocess"]["length"] == 64 and config["preprocess"]["resample"] == "time"
    lines = raw_lines(TES)
    starts = [i for i, line in enumerate(lines) if line.startswith(".SEGMENT")]
    eight = tmp_path / "eight.txt"
    eight.write_text("".join(lines[: starts[1]]))  # .tes's first digit, an 8
    emb = encoder.eval()(load(eight, **config["preprocess"])[None])
    assert emb.shape == (1, anchor.embed_dim)
