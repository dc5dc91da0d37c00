"""Limitation probes, few-shot linear probes and the report's building blocks, on inputs whose
answers are known."""

import pytest
import torch
import torch.nn.functional as F

from imagebind_lite.data.avmnist import DIGIT_NAMES
from imagebind_lite.data.scenes import SHAPES
from imagebind_lite.evaluation.linear_probe import (
    fit_logistic,
    folded_linear_probe,
    linear_probe,
    sample_shots,
    select_weight_decay,
    stratified_split,
)
from imagebind_lite.evaluation.probes import (
    digit_probes,
    format_probe_table,
    item_probe,
    render_probe_scenes,
    scene_probes,
    text_probe_pairs,
    text_probes,
)
from imagebind_lite.evaluation.report import pca_2d, read_training_curves, sample_rows

pytestmark = pytest.mark.usefixtures("one_thread")


class BagOfWords:
    """A text encoder that sums one-hot word vectors: blind to word order and to "not"
    binding to a word, the failure the probes are built to expose."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, texts):
        rows = []
        for text in texts:
            row = torch.zeros(256)
            for word in text.lower().replace(".", "").split():
                row[self.vocab.setdefault(word, len(self.vocab))] += 1
            rows.append(row)
        return torch.stack(rows)


def test_text_probe_sets_are_generated_pairs_of_different_texts():
    pairs = text_probe_pairs()
    assert set(pairs) == {"negation", "counting", "spatial", "abstract", "rare"}
    assert ("a photo of a dog.", "a photo with no dog.") in pairs["negation"]
    assert (
        "a photo of a dog to the left of a cat.",
        "a photo of a cat to the left of a dog.",
    ) in pairs["spatial"]
    assert all(a != b for family in pairs.values() for a, b in family)


def test_text_probes_expose_a_word_order_blind_encoder():
    results = {r.family: r for r in text_probes(BagOfWords(), threshold=0.99)}
    # Same words in another order: cosine exactly 1, never told apart.
    assert results["spatial"].accuracy == 0.0
    assert results["spatial"].mean_cosine == pytest.approx(1.0)
    assert results["negation"].accuracy == 1.0  # "with no" adds words
    assert results["rare"].chance is None and results["rare"].pairs == 10


def test_item_probe_known_answer():
    encode = BagOfWords()
    texts = ["red", "blue", "green"]
    emb = F.normalize(encode(texts), dim=-1)
    items = torch.stack([emb[0], emb[1], emb[0]])
    result = item_probe(
        "colour",
        "control",
        "vision",
        items,
        ["red", "blue", "green"],
        ["blue", "red", "red"],
        encode,
    )
    assert result.accuracy == pytest.approx(2 / 3)  # item 2 looks red, its true text is green
    assert result.chance == 0.5 and result.pairs == 3


def test_digit_negation_probes_on_a_bag_of_words_space():
    encode = BagOfWords()
    labels = list(range(10))
    items = F.normalize(encode([f"the digit {DIGIT_NAMES[d]}." for d in labels]), dim=-1)
    results = {r.probe: r for r in digit_probes(items, labels, "audio", encode)}
    assert results["digit vs other digit (control)"].accuracy == 1.0
    # "the digit X" beats "not the digit X": the extra word lowers the cosine.
    assert results["X vs not X"].accuracy == 1.0
    # The true "not the digit Y" shares fewer words with X than the false "not the digit X".
    assert results["not Y vs not X"].accuracy == 0.0


def test_rendered_scenes_put_shapes_where_asked():
    scenes = render_probe_scenes(
        [[(0, 0.25, 0.5, 0.15)], [(0, 0.25, 0.5, 0.12), (0, 0.75, 0.5, 0.12)]], size=32
    )
    assert scenes["rgb"].shape == (2, 3, 32, 32) and scenes["depth"].shape == (2, 1, 32, 32)
    warm = scenes["thermal"] > 0.55  # shapes 0.6-0.9, the room at most 0.45
    left, right = warm[..., :16].sum((1, 2, 3)), warm[..., 16:].sum((1, 2, 3))
    assert left[0] > 0 and right[0] == 0  # one circle, on the left
    assert left[1] > 0 and right[1] > 0  # two circles, one each side
    assert (scenes["depth"][warm] <= 3.0).all()  # the shapes stand 1-3 m away
    assert scenes["depth"][0, 0, 0, 0] >= 4.0  # the top-left corner is the wall, 4-7 m


def test_scene_probes_with_an_encoder_that_sees_position_and_count():
    """An oracle encoder that writes the scene's side and count into the text space of a
    bag-of-words encoder passes the spatial and counting probes."""
    encode = BagOfWords()

    def oracle(x):
        warm = x[:, 0] > 0.5  # thermal standardised with mean 0, std 1: the shapes
        left, right = warm[..., :16].sum((1, 2)), warm[..., 16:].sum((1, 2))
        # One shape stands in the middle; two stand apart, leaving the middle columns cold.
        middle = warm[..., 15:17].any(-1).any(-1)
        texts = [
            f"{'one' if m else 'two'} on the {'left' if lft > rgt else 'right'}"
            for m, lft, rgt in zip(middle.tolist(), left.tolist(), right.tolist())
        ]
        return encode(texts)

    results = scene_probes(
        {"thermal": oracle},
        encode,
        num=20,
        size=32,
        normalisation={"thermal": {"mean": 0.0, "std": 1.0}},
    )
    by = {r.probe: r for r in results}
    assert by["left vs right"].accuracy == 1.0
    assert by["one vs two shapes"].accuracy == 1.0
    table = format_probe_table(results)
    assert "| left vs right | spatial | thermal | 20 | 100.0% | 50% | - |" in table
    assert len(SHAPES) == 6


def test_logistic_regression_fits_separable_data_and_grid_fit_equals_single_fits():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(4, 8, generator=g), dim=-1) * 3
    y = torch.arange(4).repeat(10)
    x = centres[y] + 0.1 * torch.randn(40, 8, generator=g)
    w, b = fit_logistic(x, y, 4, 1e-4)
    assert ((F.normalize(x, dim=-1) @ w.T + b).argmax(1) == y).all()
    single = fit_logistic(x, y, 4, 1e-2)
    grid = fit_logistic(x, y, 4, [1e-1, 1e-2])
    assert torch.allclose(single[0], grid[0][1], atol=1e-3)
    wd, _, scores = select_weight_decay(x, y, x, y, 4, [1e-1, 1e-3])
    assert scores[1e-1] == scores[1e-3] == 1.0 and wd == 1e-1  # ties: the stronger decay


def test_shots_splits_and_few_shot_accuracy():
    labels = torch.tensor([0] * 5 + [1] * 5 + [2] * 2)
    g = torch.Generator().manual_seed(0)
    first, second = stratified_split(labels, 0.2, g)
    assert len(first) + len(second) == 12 and not set(first.tolist()) & set(second.tolist())
    assert sorted(labels[second].tolist()) == [0, 1, 2]  # at least one per class
    shots = sample_shots(labels, 3, g)
    assert sorted(labels[shots].tolist()) == [0, 0, 0, 1, 1, 1, 2, 2]  # class 2 has only two
    assert len(sample_shots(labels, None, g)) == 12
    centres = torch.eye(3) * 4
    train_y, test_y = torch.arange(3).repeat(10), torch.arange(3).repeat(5)
    train_x = centres[train_y] + 0.2 * torch.randn(30, 3, generator=g)
    test_x = centres[test_y] + 0.2 * torch.randn(15, 3, generator=g)
    result = linear_probe(
        train_x, train_y, test_x, test_y, 3, shots=(1, 5, None), seeds=2, grid=(1e-3, 1e-1)
    )
    assert set(result) == {"1", "5", "all"}
    assert result["all"]["top1"] == 1.0 and len(result["1"]["runs"]) == 2
    assert result["5"]["train_items"] == 15
    folds = [1, 2] * 15
    folded = folded_linear_probe(
        train_x, train_y, folds, num_classes=3, shots=(None,), grid=(1e-2,)
    )
    assert set(folded["per_fold"]) == {"1", "2"} and folded["mean"]["all"]["top1"] == 1.0


def test_pca_sample_rows_and_training_curves(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g) * torch.tensor([5.0, 0.1, 0.1, 2.0, 0.1])
    xy = pca_2d(x)
    assert xy.shape == (200, 2)
    assert xy[:, 0].var() > xy[:, 1].var() > 1.0  # the two strong directions, in order
    rows = sample_rows([0, 0, 0, 1, 1, 2], 4)
    assert len(rows) == 4 and {0, 1, 2} <= {[0, 0, 0, 1, 1, 2][i] for i in rows}
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "logs" / "train"))
    for step in range(1, 6):
        writer.add_scalar("train/loss", 5.0 - step, step)
    writer.close()
    curves = read_training_curves(tmp_path)
    assert curves["train/loss"] == ([1, 2, 3, 4, 5], [4.0, 3.0, 2.0, 1.0, 0.0])
