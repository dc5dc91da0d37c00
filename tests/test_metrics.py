"""Every metric on hand-made embeddings with known answers, and the chunked computations that
evaluate 10,000-item collections against the dense ones."""

import math

import pytest
import torch
import torch.nn.functional as F

from imagebind_lite.evaluation.metrics import (
    alignment,
    alignment_accuracy,
    average_precision,
    chunked_ranks,
    chunked_retrieval_metrics,
    chunked_topk,
    confusion_matrix,
    dense_ranks,
    labels_to_multi_hot,
    mean_average_precision,
    metrics_from_ranks,
    modality_gap,
    per_class_accuracy,
    space_statistics,
    uniformity,
)
from imagebind_lite.evaluation.prompts import IMAGENET_TEMPLATES, get_templates
from imagebind_lite.evaluation.space import (
    cached,
    combine,
    cosine,
    load_embeddings,
    parse_input,
    save_embeddings,
    search,
)
from imagebind_lite.evaluation.zero_shot import class_scores, retrieval_metrics, topk_accuracy

E = torch.eye(4)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_recall_at_k_and_median_rank_known_ranks():
    # Query i's positive (gallery i) is ranked 1, 2, 3 and 4 by construction.
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.0],
            [0.8, 0.5, 0.1, 0.0],
            [0.9, 0.8, 0.7, 0.0],
            [0.9, 0.8, 0.7, 0.6],
        ]
    )
    assert dense_ranks(sim).tolist() == [1, 2, 3, 4]
    r = retrieval_metrics(sim, ks=(1, 2, 3))
    assert r == {"R@1": 0.25, "R@2": 0.5, "R@3": 0.75, "median_rank": 2.0}
    m = metrics_from_ranks(torch.tensor([1, 2, 3, 4]), ks=(1, 2, 3))
    assert m["R@1"] == 0.25 and m["R@3"] == 0.75 and m["mean_rank"] == 2.5
    # torch's median of an even count is the lower middle value: 2, as retrieval_metrics says.
    assert m["median_rank"] == r["median_rank"]


def test_several_positives_rank_by_the_best_one():
    # Two captions per item: query 0 has positives at ranks 3 and 2 -> rank 2.
    sim = torch.tensor([[0.1, 0.5, 0.9, 0.4]])
    positives = torch.tensor([[True, True, False, False]])
    assert dense_ranks(sim, positives).tolist() == [2]
    groups = torch.tensor([7, 7, 8, 9])
    emb_q = torch.tensor([[1.0, 0.0]])
    gallery = torch.tensor([[0.0, 1.0], [0.6, 0.8], [1.0, 0.0], [0.4, 0.9]])
    ranks = chunked_ranks(emb_q, gallery, torch.tensor([7]), groups)
    assert ranks.tolist() == [2]  # positives score 0 and 0.6, item 2 scores 1.0


def test_chunked_ranks_equal_dense_on_10000_random_items():
    # float64: float32 near-ties between two 10,000-item matrix products made by different
    # blockings could swap a rank; the computation is the same, only rounding differs.
    g = torch.Generator().manual_seed(0)
    n, d = 10_000, 16
    queries = torch.randn(n, d, generator=g, dtype=torch.float64)
    gallery = queries + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64)
    chunked = chunked_ranks(queries, gallery, query_chunk=2500, gallery_chunk=4000)
    qn, gn = F.normalize(queries, dim=-1), F.normalize(gallery, dim=-1)
    dense = torch.cat(
        [
            dense_ranks(
                qn[s : s + 2500] @ gn.T,
                torch.arange(s, min(s + 2500, n))[:, None] == torch.arange(n)[None],
            )
            for s in range(0, n, 2500)
        ]
    )
    assert torch.equal(chunked, dense)
    r = metrics_from_ranks(chunked)
    assert 0.05 < r["R@1"] < r["R@10"] < 1.0  # neither trivial nor hopeless
    # The argsort-based R@K of zero_shot agrees on a slice.
    head = retrieval_metrics(
        (qn[:500] @ gn.T).float(), positives=torch.arange(500)[:, None] == torch.arange(n)[None]
    )
    assert head["R@1"] == pytest.approx(metrics_from_ranks(dense[:500])["R@1"])
    # Class-level positives (10 labels) take the two-pass path: still equal.
    labels = torch.randint(10, (n,), generator=g)
    chunked = chunked_retrieval_metrics(
        queries[:1000], gallery, (1, 5), labels[:1000], labels, gallery_chunk=3333
    )
    dense = dense_ranks(qn[:1000] @ gn.T, labels[:1000, None] == labels[None])
    assert chunked == metrics_from_ranks(dense, (1, 5))


def test_chunked_topk_equals_dense_topk():
    g = torch.Generator().manual_seed(1)
    queries, gallery = torch.randn(200, 16, generator=g), torch.randn(10_000, 16, generator=g)
    scores, idx = chunked_topk(queries, gallery, k=7, query_chunk=64, gallery_chunk=999)
    dense = F.normalize(queries, dim=-1) @ F.normalize(gallery, dim=-1).T
    ref = dense.topk(7, dim=1)
    assert torch.equal(idx, ref.indices)
    assert torch.allclose(scores, ref.values, atol=1e-6)


def test_a_query_without_positive_is_an_error():
    with pytest.raises(ValueError, match="no positive"):
        chunked_ranks(
            torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 5]), torch.tensor([0, 1, 2])
        )


def test_average_precision_known_values():
    # Positives at ranks 1 and 3 of 4: AP = (1/1 + 2/3) / 2.
    ap = average_precision(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([1, 0, 1, 0]))
    assert ap.item() == pytest.approx(5 / 6)
    # Tied scores are one threshold: precision 1/2 at recall 1.
    assert average_precision(torch.tensor([0.5, 0.5]), torch.tensor([1, 0])).item() == 0.5
    scores = torch.tensor([[0.5, 0.1, 0.9], [0.5, 0.2, 0.1], [0.4, 0.3, 0.2]])
    targets = torch.tensor([[0, 0, 1], [1, 0, 0], [1, 0, 1]])
    ap = average_precision(scores, targets)
    # class 0: threshold 0.5 (1 tp of 2) then 0.4 (2 of 3): 0.5*0.5 + 0.5*2/3
    assert ap[0].item() == pytest.approx(0.25 + 1 / 3)
    assert math.isnan(ap[1].item())  # no positive
    assert ap[2].item() == pytest.approx(1.0)  # both positives ranked first
    m = mean_average_precision(scores, targets)
    assert m["classes_scored"] == 2
    assert m["mAP"] == pytest.approx((0.25 + 1 / 3 + 1.0) / 2)


def test_multi_hot_topk_confusion_and_per_class():
    assert labels_to_multi_hot([[0, 2], 1], 3).tolist() == [[1, 0, 1], [0, 1, 0]]
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5], [0.6, 0.4, 0.0]])
    labels = torch.tensor([1, 2, 2, 1])
    acc = topk_accuracy(scores, labels, (1, 2))
    assert acc == {"top1": 0.5, "top2": 1.0}
    pred = scores.argmax(1)
    assert confusion_matrix(pred, labels, 3).tolist() == [[0, 0, 0], [1, 1, 0], [1, 0, 1]]
    per = per_class_accuracy(pred, labels, 3)
    assert math.isnan(per[0]) and per[1] == 0.5 and per[2] == 0.5


def test_class_scores_take_the_best_name_of_a_class():
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    names = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])  # class 0, class 1, class 1
    scores = class_scores(emb, names, torch.tensor([0, 1, 1]), 2)
    assert torch.allclose(scores, torch.tensor([[1.0, 0.6], [0.0, 1.0]]))


def test_alignment_accuracy_counts_strict_wins_over_every_negative():
    items = E[:3]
    positives = torch.stack([E[0], E[1], E[0]])  # item 2's positive is orthogonal to it
    negatives = torch.stack(
        [
            torch.stack([E[1], E[2]]),
            torch.stack([E[0], 0.5 * E[1] + 0.5 * E[2]]),  # cosine 0.71 < 1: still beaten
            torch.stack([E[2], E[3]]),  # cosine 1 to item 2: beats its positive
        ]
    )
    assert alignment_accuracy(items, positives, negatives) == pytest.approx(2 / 3)
    ragged = [negatives[0], negatives[1][:1], negatives[2]]
    assert alignment_accuracy(items, positives, ragged) == pytest.approx(2 / 3)


def test_modality_gap_alignment_and_uniformity_known_values():
    a, b = E[[0, 0]], E[[1, 1]]
    assert modality_gap(a, b) == pytest.approx(math.sqrt(2))
    assert modality_gap(a, 3 * a) == pytest.approx(0.0)  # normalised first
    assert alignment(a, a) == pytest.approx(0.0)
    assert alignment(a, b) == pytest.approx(2.0)  # ||e0 - e1||^2
    assert alignment(E[[0]], -E[[0]], alpha=1) == pytest.approx(2.0)
    # Two antipodal points: log exp(-2 * 4).
    assert uniformity(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-8.0)
    # The four axes: all pairwise squared distances are 2.
    assert uniformity(E) == pytest.approx(-4.0)
    x = torch.randn(301, 8, generator=torch.Generator().manual_seed(0))
    assert uniformity(x, chunk=37) == pytest.approx(uniformity(x), abs=1e-5)
    stats = space_statistics({"audio": E[:2], "vision": E[:2], "text": E[2:]})
    assert stats["alignment"]["audio-vision"] == pytest.approx(0.0)
    assert stats["modality_gap"]["audio-text"] == pytest.approx(1.0)  # (0.5,0.5,0,0) vs (0,0,.5,.5)
    assert stats["uniformity"]["text"] == pytest.approx(-4.0)


def test_imagenet_templates_are_clips_eighty():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    assert len(IMAGENET_TEMPLATES) == 80
    assert IMAGENET_TEMPLATES == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    assert get_templates("imagenet")[0] == "a bad photo of a {}."
    assert get_templates("a {}.|the {}.") == ["a {}.", "the {}."]
    assert get_templates("digits")[0] == "a photo of the digit {}."
    with pytest.raises(ValueError, match="unknown template set"):
        get_templates("nonsense")


def test_embeddings_file_roundtrip_cache_and_search(tmp_path):
    emb = F.normalize(torch.randn(5, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    path = tmp_path / "c.safetensors"
    save_embeddings(path, emb, [f"item{i}" for i in range(5)], {"modality": "audio"})
    loaded, items, info = load_embeddings(path)
    assert torch.equal(loaded, emb) and items[3] == "item3" and info["modality"] == "audio"
    assert (tmp_path / "c.safetensors.json").is_file()
    hits = search(emb[2], loaded, items, k=2)
    assert hits[0][0] == "item2" and hits[0][1] == pytest.approx(1.0)
    calls = []

    def compute():
        calls.append(1)
        return emb, [f"item{i}" for i in range(5)]

    ids = [f"item{i}" for i in range(5)]
    cache = tmp_path / "cache.safetensors"
    assert not cached(cache, ids, "model-a", compute)[2]
    assert cached(cache, ids, "model-a", compute)[2] and len(calls) == 1
    assert not cached(cache, ids, "model-b", compute)[2]  # another model: recomputed
    assert not cached(cache, ids[:4], "model-b", compute)[2]  # other items: recomputed
    assert len(calls) == 3


def test_arithmetic_and_inputs():
    summed = combine([E[0], 2 * E[1]])
    assert torch.allclose(summed, F.normalize(E[0] + E[1], dim=0))
    assert torch.allclose(
        combine([E[0] + E[1]], [E[1]]), F.normalize(F.normalize(E[0] + E[1], dim=0) - E[1], dim=0)
    )
    assert cosine(E[0], E[0] + E[1]) == pytest.approx(1 / math.sqrt(2))
    assert parse_input("text:a dog: barking") == ("text", "a dog: barking")
    assert parse_input("depth:x.png") == ("depth", "x.png")
    assert parse_input("image:x.png") == ("vision", "x.png")


def test_class_retrieval_top1_and_map_by_hand():
    from imagebind_lite.evaluation.metrics import class_retrieval

    # Gallery on a circle at known angles; queries point at chosen directions. Classes: 0 0 1 1 2.
    angles = torch.tensor([0.0, 0.3, 1.0, 1.2, 3.0])
    gallery = torch.stack([angles.cos(), angles.sin()], 1).double()
    labels = torch.tensor([0, 0, 1, 1, 2])
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]).double()
    result = class_retrieval(queries, torch.tensor([0, 0, 2]), gallery, labels)
    # Query 0 (angle 0): ranking 0, 1, 2, 3, 4 -> relevant at ranks 1, 2: AP 1; nearest class 0.
    # Query 1 (angle pi/2): cosines 0, .296, .841, .932, .141 -> ranking 3, 2, 1, 4, 0;
    # relevant (class 0) at ranks 3 and 5: AP = (1/3 + 2/5) / 2; nearest is class 1: a miss.
    # Query 2 (angle pi): ranking 4, ... -> class 2 at rank 1: AP 1; nearest class 2.
    assert result["top1"] == pytest.approx(2 / 3)
    assert result["mAP"] == pytest.approx((1 + (1 / 3 + 2 / 5) / 2 + 1) / 3)
    assert (result["queries"], result["gallery"]) == (3, 5)
    # A query whose class is absent from the gallery is left out of the mean, not scored 0.
    absent = class_retrieval(queries[:1], torch.tensor([7]), gallery, labels)
    assert absent["top1"] == 0.0 and math.isnan(absent["mAP"])
