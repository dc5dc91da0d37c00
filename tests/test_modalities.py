"""The modality registry, encoder shapes, and the frozen anchor."""

import pytest
import torch
from conftest import FSDD

from imagebind_lite.anchor import Anchor
from imagebind_lite.config import AnchorConfig
from imagebind_lite.modalities import build_encoder, get_modality, list_modalities


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_registry_lists_anchor_and_new_modalities():
    assert {"vision", "text", "audio", "depth", "thermal", "imu"} <= set(list_modalities())
    assert set(list_modalities(trainable_only=True)) >= {"audio", "depth", "thermal", "imu"}
    assert get_modality("audio").temperature == 0.05
    assert get_modality("depth").temperature == 0.2
    assert get_modality("thermal").temperature == 0.1
    with pytest.raises(KeyError, match="unknown modality"):
        get_modality("smell")
    with pytest.raises(ValueError, match="anchor modality"):
        build_encoder("vision", 64)


@pytest.mark.parametrize(
    "modality, params, tokens",
    # ImageBind's published parameter counts (M) and token grids (reference doc).
    [("audio", 86.2, 12 * 19), ("depth", 21.9, 196), ("thermal", 86.2, 196), ("imu", 19.6, 250)],
)
def test_imagebind_sizes_match_published_shapes(modality, params, tokens):
    encoder = build_encoder(modality, 1024, "imagebind")
    assert encoder.stem.num_tokens == tokens
    assert n_params(encoder) / 1e6 == pytest.approx(params, abs=0.05)
    assert encoder.pos_embed.shape[1] == tokens + 1
    assert encoder.trunk.blocks[0].attn.bias_k is not None  # ImageBind's extra key/value token


def test_forward_shapes_clips_and_unit_norm():
    enc = build_encoder("audio", 48, "tiny", preprocess=dict(num_mel_bins=32, target_length=48))
    assert enc.stem.grid == (4, 6)  # the positional embedding follows the fbank grid
    one = enc(torch.randn(3, 1, 32, 48))
    clips = enc(torch.randn(3, 2, 1, 32, 48))
    assert one.shape == clips.shape == (3, 48)
    torch.testing.assert_close(clips.norm(dim=-1), torch.ones(3))
    with pytest.raises(ValueError, match="expected input of shape"):
        enc(torch.randn(3, 1, 31, 48))
    enc = build_encoder("depth", 16, "tiny", preprocess=dict(image_size=32))
    assert enc(torch.randn(2, 1, 32, 32)).shape == (2, 16)
    assert build_encoder("imu", 16, "tiny")(torch.randn(2, 6, 2000)).shape == (2, 16)


def test_imagebind_scaling_averages_scaled_clips_without_renormalising():
    enc = build_encoder("depth", 16, "tiny", preprocess=dict(image_size=16)).eval()
    x = torch.randn(2, 3, 1, 16, 16)
    unit = torch.nn.functional.normalize(enc.encode_tokens(x.flatten(0, 1)), dim=-1)
    enc.imagebind_scaling = True
    expected = (unit * 5.0).unflatten(0, (2, 3)).mean(1)  # depth scale 1/0.2
    torch.testing.assert_close(enc(x), expected)


def test_anchor_is_frozen_and_stays_in_eval():
    anchor = Anchor(AnchorConfig(pretrained=None))
    assert all(not p.requires_grad for p in anchor.parameters())
    anchor.train()
    assert not anchor.model.training
    emb = anchor.encode_image(torch.randn(2, 3, 32, 32))
    assert not emb.requires_grad and emb.grad_fn is None  # no activation memory kept
    text = anchor.encode_text(["the digit one.", "a photo of a circle."])
    assert text.shape == (2, anchor.embed_dim)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))


def test_conv_stem_size_and_utterance_norm():
    from imagebind_lite.data import avmnist

    opts = dict(num_clips=1, clip_duration=1.12, num_mel_bins=64, target_length=112)
    enc = build_encoder("audio", 64, "tiny-conv", preprocess=opts)
    assert enc.stem.grid == (8, 14)  # three stride-2 convolutions on 64 x 112
    assert enc(torch.randn(2, 1, 1, 64, 112)).shape == (2, 64)
    path = FSDD / "3_theo_0.flac"
    plain = get_modality("audio").load(path, **opts)
    normed = get_modality("audio").load(path, **opts, utterance_norm=True)
    frames = avmnist.valid_frames(path, {**get_modality("audio").preprocess, **opts})
    real = normed[..., :frames]
    torch.testing.assert_close(real.mean(-1), torch.zeros(real.shape[:-1]), atol=1e-5, rtol=0)
    assert (normed[..., frames:] == 0).all()
    expected = plain[..., :frames] - plain[..., :frames].mean(-1, keepdim=True)
    torch.testing.assert_close(real, expected)


def test_register_modality_clash_does_not_depend_on_qualnames(tmp_path):
    from imagebind_lite.registry import ModalitySpec, import_modality_file, register_modality

    def spec(stem, sizes=None):
        return ModalitySpec("clash_probe", 0.1, sizes or {"tiny": {"width": 8}}, stem)

    register_modality(spec(lambda size, options: ("a", size)), overwrite=True)
    # Another lambda (same qualname "<lambda>") with other code is a clash ...
    with pytest.raises(ValueError, match="already registered by other code"):
        register_modality(spec(lambda size, options: ("b", size)))
    # ... and so are the same code with other sizes.
    with pytest.raises(ValueError, match="already registered by other code"):
        register_modality(spec(lambda size, options: ("a", size), {"tiny": {"width": 16}}))
    # The same file imported twice (a model folder's copy of it) is the same definition.
    text = (
        "from imagebind_lite.registry import ModalitySpec, register_modality\n"
        "register_modality(ModalitySpec('copied_probe', 0.1, {'tiny': {'width': 8}},"
        " lambda size, options: size))\n"
    )
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "modality.py").write_text(text)
        import_modality_file(tmp_path / folder / "modality.py")
