"""encoder.patch_dropout (FLIP): the identity in eval mode, ``1 + max(1, int(n (1 - p)))``
tokens into the trunk in training (the CLS token and a random subset of the patch tokens of
each sample), for every stem the modalities build, and refused where there is nothing to drop."""

import pytest
import torch

from imagebind_lite.modalities import build_encoder
from imagebind_lite.models.encoder import PatchDropout

# (modality, size, overrides, preprocess, one input sample's shape): every kind of stem.
SMALL = {"depth": 1, "width": 32, "heads": 2, "drop_path": 0.0}
STEMS = {
    "audio-patch": ("audio", "tiny", SMALL, {"num_mel_bins": 32, "target_length": 48}, (1, 32, 48)),
    "audio-conv": (
        "audio",
        "tiny-conv",
        SMALL,
        {"num_mel_bins": 32, "target_length": 48},
        (1, 32, 48),
    ),
    "depth": ("depth", "tiny", SMALL, {"image_size": 16}, (1, 16, 16)),
    "imu": ("imu", "tiny", SMALL, {"length": 80}, (6, 80)),
    "pen-conv": ("pen", "tiny", SMALL, {}, (5, 64)),
}


def make(name: str, p: float):
    modality, size, overrides, preprocess, shape = STEMS[name]
    torch.manual_seed(0)
    encoder = build_encoder(modality, 16, size, overrides, preprocess, patch_dropout=p)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1))
    return encoder, x


def trunk_input(encoder, x) -> torch.Tensor:
    """The tokens that reach the first block."""
    seen = []
    hook = encoder.trunk.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        encoder(x)
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize("name", sorted(STEMS))
def test_eval_is_identical_with_and_without_patch_dropout(name):
    plain, x = make(name, 0.0)
    dropping, _ = make(name, 0.5)
    plain.eval(), dropping.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), dropping(x))
    # Not vacuous: in training mode the same weights give other embeddings.
    plain.train(), dropping.train()
    with torch.no_grad():
        assert not torch.allclose(plain(x), dropping(x))


@pytest.mark.parametrize("name", sorted(STEMS))
@pytest.mark.parametrize("p", [0.25, 0.5, 0.9])
def test_training_keeps_cls_and_a_random_subset_of_each_samples_tokens(name, p):
    plain, x = make(name, 0.0)
    dropping, _ = make(name, p)
    plain.eval(), dropping.eval()  # eval: BatchNorm alike in both, so the tokens compare
    n = plain.stem.num_tokens
    with torch.no_grad():
        every = trunk_input(plain, x)
        assert torch.equal(trunk_input(dropping, x), every)  # eval: nothing dropped
        dropping.patch_dropout.train()  # only the dropout in training mode
        torch.manual_seed(5)
        kept = trunk_input(dropping, x)
    assert every.shape[1] == n + 1
    assert kept.shape == (3, 1 + max(1, int(n * (1 - p))), every.shape[2])
    assert torch.equal(kept[:, 0], every[:, 0])  # the CLS token, first and unchanged
    subsets = []
    for b in range(3):
        # Every kept token is one of the sample's own patch tokens, each at most once.
        match = (kept[b, 1:, None] == every[b, None, 1:]).all(-1)
        assert (match.sum(1) == 1).all()
        subsets.append(tuple(sorted(match.float().argmax(1).tolist())))
    assert len(set(subsets)) > 1 or len(subsets[0]) == n  # samples draw their own subsets


def test_the_draw_follows_torchs_seed():
    encoder, x = make("depth", 0.5)
    encoder.train()
    draws = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        draws.append(trunk_input(encoder, x))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


def test_gradients_flow_through_the_kept_tokens_only():
    encoder, x = make("depth", 0.75)
    encoder.train()
    encoder(x).sum().backward()
    # Every sample keeps 4 of its 16 patch positions: the others' positional rows get nothing.
    used = (encoder.pos_embed.grad[0, 1:].abs().sum(-1) > 0).sum()
    assert 4 <= int(used) < 16 and encoder.pos_embed.grad[0, 0].abs().sum() > 0


def test_bad_probabilities_and_a_single_token_stem_are_refused():
    for p in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"patch_dropout: expected a probability in \[0, 1\)"):
            PatchDropout(p)
    with pytest.raises(ValueError, match="patch_dropout: the stem makes 1 token"):
        build_encoder("imu", 16, "tiny", {**SMALL, "window": 80}, {"length": 80}, patch_dropout=0.5)
    build_encoder("imu", 16, "tiny", {**SMALL, "window": 80}, {"length": 80})  # p = 0: fine
